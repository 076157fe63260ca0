"""The configuration reference, generated from the settings tree.

``python -m stream_distill.configref > docs/configuration.md`` writes every key with
its type, default, environment variable and description; a test keeps the
committed file equal to a fresh generation.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from stream_distill.config import Settings

ENV_PREFIX = "SD_"
ENV_DELIMITER = "__"
REGENERATE = "python -m stream_distill.configref > docs/configuration.md"


@dataclass(frozen=True)
class Entry:
    """One leaf setting."""

    path: tuple[str, ...]
    type: str
    default: str
    description: str

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def env(self) -> str:
        return ENV_PREFIX + ENV_DELIMITER.join(self.path).upper()


def _section(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def type_name(tp: Any) -> str:
    """``str | None``, ``tuple[int, ...]``, ``Literal['a', 'b']``: short and stable."""
    if tp is type(None):
        return "None"
    if tp is Ellipsis:
        return "..."
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in get_args(tp)) + "]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp))}]"
    return str(getattr(tp, "__name__", tp))


def _mentions_secret(tp: Any) -> bool:
    return tp is SecretStr or any(_mentions_secret(a) for a in get_args(tp))


def _plain(value: Any) -> Any:
    """The value as an environment variable would spell it (complex ones as JSON)."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def bounds_text(info: FieldInfo) -> str:
    """``>= 1, <= 65535`` from the field's constraints; empty when it has none."""
    found = []
    for item in info.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return ", ".join(found)


def default_text(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if _mentions_secret(info.annotation):
        return "***" if value else "unset"  # never print a secret, not even a default one
    value = _plain(value)
    if value is None:
        return "None"
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def entries(model: type[BaseModel] = Settings, path: tuple[str, ...] = ()) -> Iterator[Entry]:
    """Every leaf of ``model``, depth first in declaration order."""
    for name, info in model.model_fields.items():
        section = _section(info.annotation)
        if section is not None:
            yield from entries(section, (*path, name))
        else:
            bounds = bounds_text(info)
            yield Entry(
                (*path, name),
                type_name(info.annotation) + (f" ({bounds})" if bounds else ""),
                default_text(info),
                " ".join((info.description or "").split()),
            )


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text else text


def _sections(
    model: type[BaseModel] = Settings, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], type[BaseModel]]]:
    """``(path, model)`` for the root and every nested section, in declaration order."""
    yield path, model
    for name, info in model.model_fields.items():
        section = _section(info.annotation)
        if section is not None:
            yield from _sections(section, (*path, name))


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from stream_distill/config.py: do not edit. Regenerate with",
        f"     {REGENERATE} -->",
        "",
        "Every role reads one settings tree. Each key is set by an environment variable:",
        f"the prefix `{ENV_PREFIX}`, then the section and key in upper case joined by",
        f"`{ENV_DELIMITER}`",
        "(`registry.root` is `SD_REGISTRY__ROOT`). Lists, tuples and maps take JSON",
        '(`SD_SERVE__FEEDBACK_TOKENS=\'{"chatbot": "a-token"}\'`). Command-line flags such as',
        "`--registry` override the environment. Secrets are never shown: `***` marks a default",
        "that is set, `unset` one that is not.",
    ]
    all_entries = list(entries())
    for path, model in _sections():
        rows = [e for e in all_entries if e.path[:-1] == path]
        if not rows:
            continue
        title = ".".join(path) if path else "Top level"
        lines += ["", f"## {title}", ""]
        doc = " ".join((model.__doc__ or "").split()) if path else ""
        if doc:
            lines += [doc, ""]
        lines += [
            "| Key | Environment variable | Type | Default | Description |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_cell(e.key, True)} | {_cell(e.env, True)} | {_cell(e.type, True)} "
            f"| {_cell(e.default, True)} | {_cell(e.description)} |"
            for e in rows
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
