"""Request events toward Kafka, off the request path.

Answers go into a bounded queue; a background task encodes the events (redaction
included) and sends them in batches. When the queue is full or the bus fails, the
event is dropped and counted, never turned into an HTTP error. While the broker is
away the queue holds what arrives (the producer retries the batch in hand until
``kafka.request_timeout_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import orjson

from stream_distill.bus.base import Producer
from stream_distill.bus.codec import KIND_HEADER, SCHEMA_HEADER
from stream_distill.events import SCHEMA_VERSION, RequestEvent, TopIntent, Turn, utc_now
from stream_distill.metrics.hooks import Hooks
from stream_distill.serving.answer import ClassifyResult

log = logging.getLogger(__name__)

HEADERS = ((KIND_HEADER, RequestEvent.kind.encode()), (SCHEMA_HEADER, str(SCHEMA_VERSION).encode()))
"""``headers_for`` any request event."""

BATCH = 512
"""Events sent concurrently at most."""


@dataclass(frozen=True, slots=True)
class _Answered:
    """What a request event is made of, queued as is: the event is built off the request path."""

    result: ClassifyResult
    turns: Sequence[Turn]
    conversation_id: str
    at: datetime


class EventPublisher:
    """Bounded queue + background sender of :class:`RequestEvent`. ``start()``/``aclose()``."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        hooks: Hooks,
        redactor: Callable[[str], str],
        queue_size: int,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.hooks = hooks
        self.redactor = redactor
        self._queue: asyncio.Queue[_Answered] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sd-events")

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        """Give queued events ``drain_timeout_s`` to reach the bus, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), drain_timeout_s)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    def enqueue(self, r: ClassifyResult, turns: Sequence[Turn], conversation_id: str) -> None:
        try:
            self._queue.put_nowait(_Answered(r, turns, conversation_id, utc_now()))
        except asyncio.QueueFull:
            self.hooks.on_event_dropped("queue-full")

    def _event(self, a: _Answered) -> RequestEvent:
        """The event itself (what :meth:`_encode` writes without building it)."""
        r = a.result
        return RequestEvent(
            request_id=r.request_id,
            conversation_id=a.conversation_id,
            turns=tuple(Turn(role=t.role, text=self.redactor(t.text)) for t in a.turns),
            served_intent=r.intent,
            top=tuple(TopIntent(intent=t.intent, p=t.p) for t in r.top),
            entropy=r.entropy,
            margin=r.margin,
            model_version=r.model_version,
            latency_ms=r.latency_ms,
            ts=a.at,
        )

    def _encode(self, a: _Answered) -> bytes:
        """``encode(self._event(a))`` without the model, which cost the loop about as
        much as the rest of the request. Every value already holds what the event's
        fields demand (the request was validated, the answer summarised); consumers
        validate what they read as always, and a test keeps the two equal."""
        r = a.result
        return orjson.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "ts": a.at,
                "request_id": r.request_id,
                "conversation_id": a.conversation_id,
                "turns": [{"role": t.role, "text": self.redactor(t.text)} for t in a.turns],
                "served_intent": r.intent,
                "top": [{"intent": t.intent, "p": t.p} for t in r.top],
                "entropy": r.entropy,
                "margin": r.margin,
                "model_version": r.model_version,
                "latency_ms": r.latency_ms,
            },
            option=orjson.OPT_UTC_Z,
        )

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            results: list[BaseException | None]
            if len(batch) == 1:  # no task to run a lone send in
                try:
                    await self._send(batch[0])
                    results = [None]
                except Exception as exc:
                    results = [exc]
            else:
                results = await asyncio.gather(
                    *(self._send(a) for a in batch), return_exceptions=True
                )
            failed = [r for r in results if isinstance(r, BaseException)]
            for _ in failed:
                self.hooks.on_event_dropped("bus-error")
            if failed:
                log.warning("dropped %d request events: %s", len(failed), failed[0])
            for _ in batch:
                self._queue.task_done()

    async def _send(self, answered: _Answered) -> None:
        await self.producer.send(
            self.topic,
            self._encode(answered),
            key=answered.conversation_id.encode(),
            headers=HEADERS,
        )
