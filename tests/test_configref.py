"""docs/configuration.md stays equal to what the settings tree generates."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from stream_distill import configref
from stream_distill.config import Settings

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _leaves(
    model: type[BaseModel] = Settings, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _leaves(ann, (*path, name))
        else:
            yield (*path, name)


def _get(settings: Settings, path: tuple[str, ...]) -> Any:
    node: Any = settings
    for name in path:
        node = getattr(node, name)
    return node


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("SD_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_committed_reference_is_current() -> None:
    assert DOC.read_text() == configref.render(), (
        f"{DOC.name} is stale: regenerate it with `{configref.REGENERATE}`"
    )


def test_every_leaf_is_documented_with_its_env_var() -> None:
    text = DOC.read_text()
    leaves = list(_leaves())
    assert len(leaves) > 40 and ("registry", "root") in leaves
    assert [e.path for e in configref.entries()] == leaves
    for path in leaves:
        env = "SD_" + "__".join(path).upper()
        assert f"| `{'.'.join(path)}` | `{env}` |" in text, path


def test_documented_env_vars_and_defaults_are_what_settings_read(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """Set every documented variable to its documented default: the tree reads it back."""
    defaults = Settings().model_dump()
    entries = [e for e in configref.entries() if e.default not in ("None", "unset", "***")]
    for e in entries:
        clean_env.setenv(e.env, "" if e.default == '""' else e.default)
    assert Settings().model_dump() == defaults
    # Every int setting moved by one through its documented name: the names are read.
    bumped = [e for e in entries if e.type.startswith("int") and e.default.isdigit()]
    assert len(bumped) > 10
    for e in bumped:
        clean_env.setenv(e.env, str(int(e.default) + 1))
    settings = Settings()
    for e in bumped:
        assert _get(settings, e.path) == int(e.default) + 1, e.env


def test_secrets_are_never_printed(clean_env: pytest.MonkeyPatch) -> None:
    by_key = {e.key: e for e in configref.entries()}
    assert by_key["kafka.sasl_password"].default == "unset"
    assert by_key["serve.feedback_tokens"].default == "unset"
    assert by_key["registry.s3_secret_access_key"].type == "SecretStr | None"
    assert by_key["serve.port"].type == "int (>= 0, <= 65535)"
    assert by_key["model.student_layers"].default == "[0, 5]"
