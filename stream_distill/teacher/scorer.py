"""The ``teacher`` role: requests in, soft labels out, at least once.

A member of consumer group ``settings.group_id`` on the requests topic, so N
processes share the partitions. Per batch: decode (poison → dead letters), score
off the event loop so the consumer keeps heart-beating, publish one
:class:`~stream_distill.events.SoftLabel` per request and wait for the acks, and
only then commit. A crash between publish and commit re-scores the batch; the
trainer drops the duplicates by request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from stream_distill.bus import codec
from stream_distill.bus.base import Bus, Consumer, Producer, Record, TopicPartition, dead_letter
from stream_distill.config import TeacherSettings
from stream_distill.errors import PoisonRecord
from stream_distill.events import RequestEvent, SoftLabel
from stream_distill.metrics.hooks import Hooks
from stream_distill.models.factory import set_threads
from stream_distill.teacher.model import TeacherModel, TeacherOutput

log = logging.getLogger(__name__)

POLL_MS = 200  # how long an idle poll blocks: bounds how late ``stop`` is noticed
RETRY_S = 1.0


class TeacherScorer:
    """Scores every request on the bus with one :class:`TeacherModel`."""

    def __init__(
        self,
        bus: Bus,
        model: TeacherModel,
        settings: TeacherSettings,
        hooks: Hooks | None = None,
    ) -> None:
        self.bus = bus
        self.model = model
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.scored = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the batch in hand is finished (or left uncommitted)."""
        set_threads(self.settings.threads)
        topics = self.bus.topics
        await self.bus.ensure_topics([topics.requests, topics.soft_labels, topics.dead_letters])
        consumer = self.bus.consumer([topics.requests], group_id=self.settings.group_id)
        async with self.bus.producer() as producer, consumer:
            while not stop.is_set():
                records = await self._collect(consumer)
                if not records:
                    continue
                if await self._handle(records, producer, stop):
                    offsets = _next_offsets(records, consumer.assignment())
                    if offsets:
                        await consumer.commit(offsets)

    async def _collect(self, consumer: Consumer) -> list[Record]:
        """Up to ``batch_size`` records, waiting at most ``batch_wait_ms`` after the first."""
        size = self.settings.batch_size
        records = await consumer.getmany(timeout_ms=POLL_MS, max_records=size)
        if not records:
            return records
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while len(records) < size:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            records += await consumer.getmany(timeout_ms=left_ms, max_records=size - len(records))
        return records

    async def _handle(self, records: list[Record], producer: Producer, stop: asyncio.Event) -> bool:
        """Score and publish a batch; False when stopped before the labels were acknowledged."""
        good: list[tuple[Record, RequestEvent]] = []
        for record in records:
            try:
                good.append((record, codec.decode(RequestEvent, record.value)))
            except PoisonRecord as exc:
                await self._park(producer, record, "poison", str(exc))
        if not good:
            return True
        labels = await self._score(good, producer)
        while True:
            try:
                await asyncio.gather(*(self._send(producer, e, label) for e, label in labels))
                break
            except Exception:
                # Nothing is committed, so nothing is lost: retry until the broker is back.
                log.exception("publishing %d soft labels failed; retrying", len(labels))
                if stop.is_set():
                    return False
                await asyncio.sleep(RETRY_S)
        self.scored += len(labels)
        return True

    async def _score(
        self, good: list[tuple[Record, RequestEvent]], producer: Producer
    ) -> list[tuple[RequestEvent, SoftLabel]]:
        started = time.perf_counter()
        events = [event for _, event in good]
        try:
            pairs = list(
                zip(events, self._labels(events, await self._predict(events)), strict=True)
            )
        except Exception:
            # One bad request must not stall the partition: score one by one, park the failures.
            log.exception("teacher batch of %d failed; scoring one by one", len(good))
            pairs = []
            for record, event in good:
                try:
                    one = self._labels([event], await self._predict([event]))
                except Exception as exc:
                    await self._park(producer, record, "scoring_failed", repr(exc))
                    continue
                pairs.append((event, one[0]))
        self.hooks.on_teacher_batch(len(good), time.perf_counter() - started)
        return pairs

    async def _predict(self, events: Sequence[RequestEvent]) -> TeacherOutput:
        dialogues = [e.turns for e in events]
        attention = self.settings.emit_attention
        return await asyncio.to_thread(self.model.predict, dialogues, attention=attention)

    def _labels(self, events: Sequence[RequestEvent], out: TeacherOutput) -> list[SoftLabel]:
        m = self.model
        labels: list[SoftLabel] = []
        for i, event in enumerate(events):
            # Six decimals keep the JSON short and sit far below what a KD loss can feel.
            logits = tuple(round(float(x), 6) for x in out.logits[i])
            attn = tuple(round(x, 5) for x in out.attention[i]) if out.attention else None
            labels.append(
                SoftLabel(
                    request_id=event.request_id,
                    teacher_id=self.settings.teacher_id,
                    teacher_version=m.version,
                    labels=m.labels,
                    label_set_version=m.label_set_version,
                    logits=logits,
                    attention=attn,
                )
            )
        return labels

    async def _send(self, producer: Producer, event: RequestEvent, label: SoftLabel) -> None:
        # Same key as the request, so a conversation's labels share a partition too.
        await producer.send(
            self.bus.topics.soft_labels,
            codec.encode(label),
            key=event.conversation_id.encode(),
            headers=codec.headers_for(label),
        )

    async def _park(self, producer: Producer, record: Record, kind: str, detail: str) -> None:
        log.warning(
            "dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, detail
        )
        await dead_letter(producer, self.bus.topics.dead_letters, record, detail)
        self.hooks.on_dead_letter(record.topic, kind)


def _next_offsets(
    records: Sequence[Record], assigned: set[TopicPartition]
) -> dict[TopicPartition, int]:
    """Offset after the last handled record, per partition still ours (a rebalance may revoke)."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        if r.tp in assigned:
            out[r.tp] = max(out.get(r.tp, 0), r.offset + 1)
    return out
