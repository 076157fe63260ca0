"""JSON serialisation of events; the only place that turns bytes into events."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import ValidationError

from stream_distill.errors import PoisonRecord
from stream_distill.events import SCHEMA_VERSION, Event

E = TypeVar("E", bound=Event)

KIND_HEADER = "sd-kind"
SCHEMA_HEADER = "sd-schema"


def encode(event: Event) -> bytes:
    """Event → UTF-8 JSON (the schema version travels inside the value)."""
    return event.model_dump_json().encode()


def headers_for(event: Event) -> tuple[tuple[str, bytes], ...]:
    return ((KIND_HEADER, event.kind.encode()), (SCHEMA_HEADER, str(SCHEMA_VERSION).encode()))


def decode(kind: type[E], value: bytes) -> E:
    """Bytes → event, or :class:`PoisonRecord` with a reason a human can act on."""
    try:
        raw = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # deep nesting
        raise PoisonRecord(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise PoisonRecord(f"expected a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # true == 1 in Python
        raise PoisonRecord(f"unsupported schema_version {version!r} (want {SCHEMA_VERSION})")
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        prefix = f"invalid {kind.kind}: {where}: " if where else f"invalid {kind.kind}: "
        raise PoisonRecord(prefix + first["msg"]) from exc
