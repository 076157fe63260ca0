"""The replay file: versioned JSONL, one event a line, requests joined to their labels on load.

Layout (version 1)::

    {"format": "stream-distill-replay", "version": 1, "created": "...", "source": {...}}
    {"topic": "sd.requests", "kind": "request", "partition": 0, "offset": 7,
     "timestamp_ms": 1718000000000, "event": {...RequestEvent...}}
    {"topic": "sd.hard-labels", "kind": "hard-label", ..., "event": {...HardLabel...}}

Events are written as they arrive rather than joined at write time: a label can come
minutes after its request, so a streaming (``--follow``) recording would otherwise hold
every request back, and a recording cut short would lose them. :func:`load` does the
join, so a loaded file carries, per request, the dialogue, conversation id, original
timestamp, served intent and version, and the confirmed label when one was recorded.

serve redacts e-mail addresses, card and phone numbers (and configured order ids) before a
dialogue leaves it, so for a request whose recorded text carries a redaction mark the
recorded intent was served on words the file no longer holds: such requests are flagged
``redacted``. A *baseline* file (``source.baseline`` in the header, written by
``replay --save``) holds intents served on the stored text itself, so nothing in it is
flagged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from stream_distill.bus.codec import decode
from stream_distill.errors import PoisonRecord, StreamDistillError
from stream_distill.events import HardLabel, RequestEvent, utc_now

FORMAT = "stream-distill-replay"
VERSION = 1
REDACTION_MARKS = ("[email]", "[number]", "[phone]", "[order]")
"""What :mod:`stream_distill.serving.redact` leaves in place of what it removes (built-in rules)."""
KINDS: dict[str, type[RequestEvent] | type[HardLabel]] = {
    RequestEvent.kind: RequestEvent,
    HardLabel.kind: HardLabel,
}


class ReplayFileError(StreamDistillError):
    """A replay file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One recorded request with the label confirmed for it, if the recording holds one."""

    line: int
    event: RequestEvent
    label: HardLabel | None = None
    topic: str = ""
    redacted: bool = False
    """The recorded intent was served on text that redaction has since changed."""

    @property
    def ts(self) -> datetime:
        return self.event.ts


@dataclass(frozen=True, slots=True)
class RecordedLabel:
    line: int
    event: HardLabel
    topic: str = ""

    @property
    def ts(self) -> datetime:
        return self.event.ts


@dataclass(frozen=True, slots=True)
class ReplayFile:
    """A loaded replay file; ``requests`` and ``labels`` are in recorded time order."""

    path: Path
    header: Mapping[str, Any]
    requests: tuple[RecordedRequest, ...]
    labels: tuple[RecordedLabel, ...]
    duplicates: int = 0
    """Request lines whose request id was already seen (redelivered records), ignored."""

    @property
    def baseline(self) -> bool:
        """Written by ``replay --save``: the intents were served on the text as stored."""
        source = self.header.get("source")
        return isinstance(source, dict) and source.get("baseline") is True

    @property
    def orphan_labels(self) -> tuple[RecordedLabel, ...]:
        """Labels for requests the file does not hold."""
        known = {r.event.request_id for r in self.requests}
        return tuple(lb for lb in self.labels if lb.event.request_id not in known)

    @property
    def labelled(self) -> int:
        return sum(r.label is not None for r in self.requests)


def header(source: Mapping[str, Any]) -> dict[str, Any]:
    """The first line of every replay file."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": utc_now().isoformat(),
        "source": dict(source),
    }


class ReplayWriter:
    """Writes a replay file line by line to an open text stream (flushed per batch)."""

    def __init__(self, out: IO[str], source: Mapping[str, Any]) -> None:
        self.out = out
        self._line(header(source))

    def write(
        self,
        event: RequestEvent | HardLabel,
        *,
        topic: str,
        partition: int = 0,
        offset: int = -1,
        timestamp_ms: int = 0,
    ) -> None:
        self._line(
            {
                "topic": topic,
                "kind": event.kind,
                "partition": partition,
                "offset": offset,
                "timestamp_ms": timestamp_ms,
                "event": event.model_dump(mode="json"),
            }
        )

    def flush(self) -> None:
        self.out.flush()

    def _line(self, obj: Mapping[str, Any]) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def write_file(
    path: Path,
    events: Iterable[RequestEvent | HardLabel],
    *,
    source: Mapping[str, Any] | None = None,
    prefix: str = "sd.",
) -> Path:
    """A replay file holding ``events`` (handy to build regression files in code)."""
    with path.open("w", encoding="utf-8") as out:
        writer = ReplayWriter(out, source or {"written_by": "write_file"})
        for event in events:
            name = "requests" if isinstance(event, RequestEvent) else "hard-labels"
            writer.write(event, topic=prefix + name)
    return path


def load(path: Path) -> ReplayFile:
    """Read, validate and join a replay file; :class:`ReplayFileError` names the bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayFileError(f"{path}: cannot read: {exc}") from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ReplayFileError(f"{path}:1: empty file, expected a {FORMAT!r} header line")
    head = _header(path, lines[0])
    source = head.get("source")
    baseline = isinstance(source, dict) and source.get("baseline") is True
    requests: dict[str, RecordedRequest] = {}
    labels: list[RecordedLabel] = []
    duplicates = 0
    for n, raw in enumerate(lines[1:], start=2):
        if not raw.strip():
            continue
        topic, event = _event(path, n, raw)
        if isinstance(event, HardLabel):
            labels.append(RecordedLabel(n, event, topic))
        elif event.request_id in requests:
            duplicates += 1
        else:
            redacted = not baseline and any(
                mark in t.text for t in event.turns for mark in REDACTION_MARKS
            )
            requests[event.request_id] = RecordedRequest(n, event, None, topic, redacted)
    labels.sort(key=lambda lb: lb.ts)
    for lb in labels:  # in time order, so a later correction wins
        found = requests.get(lb.event.request_id)
        if found is not None:
            requests[lb.event.request_id] = dataclasses.replace(found, label=lb.event)
    ordered = sorted(requests.values(), key=lambda r: (r.ts, r.line))
    return ReplayFile(path, head, tuple(ordered), tuple(labels), duplicates)


def _header(path: Path, raw: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ReplayFileError(f"{path}:1: header is not JSON: {exc.msg}") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ReplayFileError(f"{path}:1: not a replay file (want a {FORMAT!r} header line)")
    version = obj.get("version")
    if type(version) is not int or version != VERSION:
        raise ReplayFileError(
            f"{path}:1: unsupported replay file version {version!r} (this reader knows {VERSION})"
        )
    return obj


def _event(path: Path, n: int, raw: str) -> tuple[str, RequestEvent | HardLabel]:
    where = f"{path}:{n}"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ReplayFileError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise ReplayFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    event_type = KINDS.get(kind) if isinstance(kind, str) else None
    if event_type is None:
        raise ReplayFileError(f"{where}: unknown kind {kind!r} (want one of {sorted(KINDS)})")
    body = obj.get("event")
    if not isinstance(body, dict):
        raise ReplayFileError(f"{where}: missing 'event' object")
    try:
        event = decode(event_type, json.dumps(body).encode())
    except PoisonRecord as exc:
        raise ReplayFileError(f"{where}: {exc}") from exc
    topic = obj.get("topic")
    return topic if isinstance(topic, str) else "", event
