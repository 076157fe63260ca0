"""``stream-distill record``: tap the requests and hard-labels topics into a replay file.

The recorder assigns itself every partition (no consumer group, so it never steals work
from the teacher or trainer and commits nothing), starts at the earliest or latest
offsets, and writes each decodable event as one line. Records that do not decode are
skipped and counted by topic. Without ``follow`` it stops once the topics stay quiet
for ``idle_s``: the bus seam has no end-offset query, and a quiet spell is what
"caught up" looks like from a consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from stream_distill.bus.base import Bus, OffsetReset, Record
from stream_distill.bus.codec import decode
from stream_distill.errors import PoisonRecord
from stream_distill.events import HardLabel, RequestEvent
from stream_distill.replay.format import ReplayWriter

log = logging.getLogger(__name__)

POLL_MS = 200


@dataclass(frozen=True, slots=True)
class RecordOptions:
    offset_reset: OffsetReset = "earliest"
    follow: bool = False
    """Keep recording after catching up, until ``max_records``, ``duration_s`` or a stop."""
    max_records: int | None = None
    duration_s: float | None = None
    idle_s: float = 2.0
    """Without ``follow``: stop after this long without a record."""


@dataclass
class RecordStats:
    requests: int = 0
    labels: int = 0
    poison: Counter[str] = field(default_factory=Counter)
    """Skipped records by topic."""
    joined: int = 0
    """Labels whose request is in the same recording."""
    seconds: float = 0.0
    stopped_by: str = ""
    _request_ids: set[str] = field(default_factory=set, repr=False)
    _label_ids: list[str] = field(default_factory=list, repr=False)

    @property
    def records(self) -> int:
        return self.requests + self.labels + sum(self.poison.values())

    def describe(self) -> str:
        skipped = sum(self.poison.values())
        by_topic = ", ".join(f"{t}: {n}" for t, n in sorted(self.poison.items()))
        return (
            f"recorded {self.requests} requests and {self.labels} labels "
            f"({self.joined} joined to a recorded request) in {self.seconds:.1f} s; "
            f"skipped {skipped} undecodable records" + (f" ({by_topic})" if skipped else "")
        )


async def record(
    bus: Bus,
    out: IO[str],
    options: RecordOptions | None = None,
    *,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[RecordStats], None] | None = None,
    source: Mapping[str, Any] | None = None,
) -> RecordStats:
    """Record until caught up (or ``max_records``/``duration_s``/``stop``); return the counts."""
    opts = options or RecordOptions()
    topics: dict[str, type[RequestEvent] | type[HardLabel]] = {
        bus.topics.requests: RequestEvent,
        bus.topics.hard_labels: HardLabel,
    }
    await bus.ensure_topics(list(topics))
    writer = ReplayWriter(
        out,
        {
            "topics": list(topics),
            "from": opts.offset_reset,
            "follow": opts.follow,
            **(source or {}),
        },
    )
    stats = RecordStats()
    loop = asyncio.get_running_loop()
    async with bus.consumer(list(topics), offset_reset=opts.offset_reset) as consumer:
        started = last_seen = loop.time()
        while True:
            now = loop.time()
            stopped_by = _should_stop(opts, stats, stop, now - started, now - last_seen)
            if stopped_by:
                stats.stopped_by = stopped_by
                break
            wait_ms = POLL_MS
            if opts.duration_s is not None:
                wait_ms = max(1, min(wait_ms, int((started + opts.duration_s - now) * 1000)))
            left = None if opts.max_records is None else opts.max_records - stats.records
            batch = await consumer.getmany(timeout_ms=wait_ms, max_records=left)
            if not batch:
                continue
            last_seen = loop.time()
            for rec in batch[:left]:
                _write_one(rec, topics, writer, stats)
            writer.flush()
            if on_progress is not None:
                on_progress(stats)
        stats.seconds = loop.time() - started
    stats.joined = sum(rid in stats._request_ids for rid in stats._label_ids)
    return stats


def _should_stop(
    opts: RecordOptions,
    stats: RecordStats,
    stop: asyncio.Event | None,
    elapsed: float,
    idle: float,
) -> str:
    if stop is not None and stop.is_set():
        return "stop"
    if opts.max_records is not None and stats.records >= opts.max_records:
        return "max-records"
    if opts.duration_s is not None and elapsed >= opts.duration_s:
        return "duration"
    if not opts.follow and idle >= opts.idle_s:
        return "caught-up"
    return ""


def _write_one(
    rec: Record,
    topics: Mapping[str, type[RequestEvent] | type[HardLabel]],
    writer: ReplayWriter,
    stats: RecordStats,
) -> None:
    try:
        event = decode(topics[rec.topic], rec.value)
    except PoisonRecord as exc:
        log.debug("skipped %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)
        stats.poison[rec.topic] += 1
        return
    writer.write(
        event,
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        timestamp_ms=rec.timestamp_ms,
    )
    if isinstance(event, RequestEvent):
        stats.requests += 1
        stats._request_ids.add(event.request_id)
    else:
        stats.labels += 1
        stats._label_ids.append(event.request_id)
