"""``stream-distill replay``: send a replay file back to serve (HTTP) or to the topics (Kafka).

Pacing is open-loop, like real traffic: each item is due at its recorded offset from the
first one divided by ``speed`` (``inf``: no waiting), or at ``i / rate`` seconds; at most
``concurrency`` are in flight, and a saturated target shows up as schedule lag in the
summary rather than as silently slower pacing.

With a fixed model, serve answers the same dialogue with the same intent, so a replay that
reports no changed intent is a regression test (``--expect-same``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from stream_distill.bus.base import Bus
from stream_distill.bus.codec import encode, headers_for
from stream_distill.events import HardLabel, RequestEvent, new_id, utc_now
from stream_distill.replay.format import RecordedLabel, RecordedRequest, ReplayFile, ReplayWriter
from stream_distill.replay.summary import Outcome, ReplaySummary

T = TypeVar("T")
OnDone = Callable[[bool], None]
"""Called once per finished item with whether it succeeded."""


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    speed: float = 1.0
    """Recorded timing divided by this; ``math.inf`` sends as fast as concurrency allows."""
    rate: float | None = None
    """Fixed items per second instead of recorded timing."""
    concurrency: int = 16
    feedback: bool = False
    """HTTP: post each recorded label as feedback for the replayed request."""
    feedback_token: str | None = None
    timeout_s: float = 10.0
    new_ids: bool = False
    """Kafka: fresh request/feedback ids and timestamps, so consumers that de-duplicate by
    id (the trainer) take a second replay of the same file as new traffic."""
    expect_same: bool = False

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"speed must be > 0, got {self.speed}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number, got {self.rate}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


def offsets(stamps: Sequence[datetime], options: ReplayOptions) -> list[float]:
    """Seconds after the start at which each item is due."""
    if options.rate is not None:
        return [i / options.rate for i in range(len(stamps))]
    if not stamps or math.isinf(options.speed):
        return [0.0] * len(stamps)
    first = stamps[0]
    return [max(0.0, (ts - first).total_seconds() / options.speed) for ts in stamps]


async def _drive(
    items: Sequence[T],
    due: Sequence[float],
    send: Callable[[T], Awaitable[bool]],
    concurrency: int,
    progress: OnDone | None,
    stop: asyncio.Event | None,
) -> tuple[float, float, bool]:
    """Send every item at its time; returns (seconds, worst schedule lag in ms, interrupted)."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    crashed: list[Exception] = []
    worst_lag = 0.0
    interrupted = False

    async def one(item: T) -> None:
        ok = False
        try:
            ok = await send(item)
        except Exception as exc:  # a bug, not a target failure: surfaced once all are done
            crashed.append(exc)
        finally:
            slots.release()
            if progress is not None:
                progress(ok)

    start = loop.time()
    for item, at in zip(items, due, strict=True):
        delay = start + at - loop.time()
        if delay > 0 and stop is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        elif delay > 0:
            await asyncio.sleep(delay)
        if stop is not None and stop.is_set():
            interrupted = True
            break
        await slots.acquire()
        worst_lag = max(worst_lag, loop.time() - start - at)
        task = asyncio.create_task(one(item))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    if crashed:
        raise crashed[0]
    return loop.time() - start, worst_lag * 1e3, interrupted


def _outcome(rr: RecordedRequest, **kw: Any) -> Outcome:
    ev = rr.event
    return Outcome(
        line=rr.line,
        request_id=ev.request_id,
        conversation_id=ev.conversation_id,
        recorded=ev.served_intent,
        label=rr.label.intent if rr.label else None,
        redacted=rr.redacted,
        **kw,
    )


# -- HTTP --------------------------------------------------------------------------------------
async def replay_http(
    replay: ReplayFile,
    url: str,
    options: ReplayOptions | None = None,
    *,
    progress: OnDone | None = None,
    stop: asyncio.Event | None = None,
) -> ReplaySummary:
    """Post every recorded dialogue to ``url``'s ``/v1/classify`` and compare the answers."""
    opts = options or ReplayOptions()
    outcomes: dict[int, Outcome] = {}
    label_errors: Counter[str] = Counter()
    labels_sent = 0
    auth = {"Authorization": f"Bearer {opts.feedback_token}"} if opts.feedback_token else {}

    async def send(rr: RecordedRequest) -> bool:
        nonlocal labels_sent
        outcome, request_id = await _classify(client, rr)
        outcomes[rr.line] = outcome
        if request_id is not None and rr.label is not None and opts.feedback:
            error = await _feedback(client, request_id, rr.label, auth)
            if error is None:
                labels_sent += 1
            else:
                label_errors[f"feedback_{error}"] += 1
        return outcome.error is None

    limits = httpx.Limits(
        max_connections=opts.concurrency, max_keepalive_connections=opts.concurrency
    )
    async with httpx.AsyncClient(base_url=url, timeout=opts.timeout_s, limits=limits) as client:
        requests = replay.requests
        due = offsets([r.ts for r in requests], opts)
        seconds, lag, interrupted = await _drive(
            requests, due, send, opts.concurrency, progress, stop
        )
    return ReplaySummary(
        file=str(replay.path),
        target=url,
        mode="http",
        outcomes=tuple(outcomes[r.line] for r in replay.requests if r.line in outcomes),
        seconds=seconds,
        labels_sent=labels_sent,
        label_errors=tuple(label_errors.items()),
        max_schedule_lag_ms=lag,
        expect_same=opts.expect_same,
        interrupted=interrupted,
    )


async def _classify(client: httpx.AsyncClient, rr: RecordedRequest) -> tuple[Outcome, str | None]:
    ev = rr.event
    body = {
        "conversation_id": ev.conversation_id,
        "turns": [{"role": t.role, "text": t.text} for t in ev.turns],
    }
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/classify", json=body)
    except httpx.HTTPError as exc:
        return _outcome(rr, error=type(exc).__name__), None
    took_ms = (time.perf_counter() - t0) * 1e3
    if r.status_code != 200:
        return _outcome(rr, error=f"http_{r.status_code}", latency_ms=took_ms), None
    try:
        out = r.json()
        served, version, server_ms = (
            str(out["intent"]),
            str(out["model_version"]),
            out["latency_ms"],
        )
        new_request_id = str(out["request_id"])
    except (ValueError, KeyError, TypeError):
        return _outcome(rr, error="bad_response", latency_ms=took_ms), None
    outcome = _outcome(
        rr,
        served=served,
        model_version=version,
        latency_ms=took_ms,
        server_latency_ms=float(server_ms),
    )
    return outcome, new_request_id


async def _feedback(
    client: httpx.AsyncClient, request_id: str, label: HardLabel, auth: dict[str, str]
) -> str | None:
    # No feedback_id: the label is for a new request, so it is a new piece of feedback.
    body = {"request_id": request_id, "intent": label.intent, "source": label.source}
    try:
        r = await client.post("/v1/feedback", json=body, headers=auth)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None if r.status_code == 202 else f"http_{r.status_code}"


def save_baseline(path: Path, replay: ReplayFile, summary: ReplaySummary) -> int:
    """Write ``replay`` back with the intents ``summary`` was served; returns requests kept.

    The result is a baseline for ``--expect-same`` in which every intent was served on the
    text as stored, redacted requests included. Requests that failed are left out.
    """
    served = {o.line: o for o in summary.outcomes if o.served is not None}
    source = {"baseline": True, "replayed_from": str(replay.path), "target": summary.target}
    with path.open("w", encoding="utf-8") as out:
        writer = ReplayWriter(out, source)
        for rr in replay.requests:
            o = served.get(rr.line)
            if o is not None:
                update = {"served_intent": o.served, "model_version": o.model_version}
                writer.write(rr.event.model_copy(update=update), topic=rr.topic)
        for lb in replay.labels:
            writer.write(lb.event, topic=lb.topic)
    return len(served)


# -- Kafka -------------------------------------------------------------------------------------
async def replay_kafka(
    replay: ReplayFile,
    bus: Bus,
    options: ReplayOptions | None = None,
    *,
    progress: OnDone | None = None,
    stop: asyncio.Event | None = None,
    target: str = "kafka",
) -> ReplaySummary:
    """Produce the recorded requests and labels to ``bus``'s topics, in recorded order."""
    opts = options or ReplayOptions()
    items: list[RecordedRequest | RecordedLabel] = [*replay.requests, *replay.labels]
    items.sort(key=lambda it: it.ts)
    fresh = {r.event.request_id: new_id() for r in replay.requests} if opts.new_ids else {}
    outcomes: dict[int, Outcome] = {}
    label_errors: Counter[str] = Counter()
    labels_sent = 0
    topics = bus.topics
    await bus.ensure_topics([topics.requests, topics.hard_labels])

    async def send(item: RecordedRequest | RecordedLabel) -> bool:
        nonlocal labels_sent
        event, topic, key = _for_kafka(
            item.event, fresh, opts.new_ids, topics.requests, topics.hard_labels
        )
        t0 = time.perf_counter()
        try:
            await producer.send(topic, encode(event), key=key, headers=headers_for(event))
            error = None
        except Exception as exc:  # any broker failure is a result to count, not a crash
            error = type(exc).__name__
        took_ms = (time.perf_counter() - t0) * 1e3
        if isinstance(item, RecordedRequest):
            outcomes[item.line] = _outcome(item, error=error, latency_ms=took_ms)
        elif error is None:
            labels_sent += 1
        else:
            label_errors[f"label_{error}"] += 1
        return error is None

    async with bus.producer() as producer:
        due = offsets([it.ts for it in items], opts)
        seconds, lag, interrupted = await _drive(items, due, send, opts.concurrency, progress, stop)
    return ReplaySummary(
        file=str(replay.path),
        target=target,
        mode="kafka",
        outcomes=tuple(outcomes[r.line] for r in replay.requests if r.line in outcomes),
        seconds=seconds,
        labels_sent=labels_sent,
        label_errors=tuple(label_errors.items()),
        max_schedule_lag_ms=lag,
        interrupted=interrupted,
    )


def _for_kafka(
    event: RequestEvent | HardLabel,
    fresh: dict[str, str],
    new_ids: bool,
    requests_topic: str,
    labels_topic: str,
) -> tuple[RequestEvent | HardLabel, str, bytes]:
    if isinstance(event, RequestEvent):
        if new_ids:
            event = event.model_copy(
                update={"request_id": fresh[event.request_id], "ts": utc_now()}
            )
        return event, requests_topic, event.conversation_id.encode()
    if new_ids:
        event = event.model_copy(
            update={
                "feedback_id": new_id(),
                "request_id": fresh.get(event.request_id, event.request_id),
                "ts": utc_now(),
            }
        )
    return event, labels_topic, event.request_id.encode()
