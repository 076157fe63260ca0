"""The ``teacher`` role: requests in, soft labels out, at least once.

A member of consumer group ``settings.group_id`` on the requests topic, so N
processes share the partitions. Per batch: decode (poison → dead letters), score
off the event loop so the consumer keeps heart-beating, publish one
:class:`~stream_distill.events.SoftLabel` per request and wait for the acks, and
only then commit. A crash between publish and commit re-scores the batch; the
trainer drops the duplicates by request id.

Back-pressure: an :class:`Intake` task keeps polling while the teacher works, so
the group never sees a member that stopped polling (no rebalance however slow a
batch is), and holds at most ``max_in_flight`` fetched-but-unfinished requests:
at the bound it pauses its partitions and polls empty until the scorer catches up.

With ``sampling="adaptive"`` an :class:`~stream_distill.teacher.sampling.AdaptiveSampler`
picks the requests worth scoring; the others are committed unscored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence

from stream_distill.bus import codec
from stream_distill.bus.base import Bus, Consumer, Producer, Record, TopicPartition, dead_letter
from stream_distill.config import TeacherSettings
from stream_distill.errors import PoisonRecord
from stream_distill.events import RequestEvent, SoftLabel, Turn
from stream_distill.metrics.hooks import Hooks
from stream_distill.models.factory import set_threads
from stream_distill.teacher.model import TeacherModel, TeacherOutput
from stream_distill.teacher.sampling import AdaptiveSampler
from stream_distill.teacher.soft import predict, soft_labels

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
        self._offered: TeacherModel | None = None  # swapped in between batches
        self.skipped = 0  # committed unscored by the adaptive sampler
        self.sampler = (
            AdaptiveSampler(settings, hooks=self.hooks) if settings.sampling == "adaptive" else None
        )
        self.intake: Intake | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the batch in hand is finished (or left uncommitted)."""
        set_threads(self.settings.threads)
        topics = self.bus.topics
        await self.bus.ensure_topics([topics.requests, topics.soft_labels, topics.dead_letters])
        consumer = self.bus.consumer([topics.requests], group_id=self.settings.group_id)
        async with self.bus.producer() as producer, consumer:
            intake = self.intake = Intake(consumer, self.settings, self.hooks)
            pump = asyncio.create_task(intake.pump(stop))
            try:
                while not stop.is_set():
                    self._adopt_offered()
                    records = await intake.take(stop, pump)
                    if not records:
                        continue
                    if await self._handle(records, producer, stop):
                        offsets = _next_offsets(records, consumer.assignment())
                        if offsets:
                            await consumer.commit(offsets)
                    intake.release(len(records))
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    def offer(self, model: TeacherModel) -> None:
        """Score with ``model`` from the next batch on; the batch in hand ends on the old one."""
        self._offered = model

    def _adopt_offered(self) -> None:
        model, self._offered = self._offered, None
        if model is not None and model is not self.model:
            log.info(
                "teacher %s -> %s (%d labels)", self.model.version, model.version, len(model.labels)
            )
            self.model = model

    async def _handle(self, records: list[Record], producer: Producer, stop: asyncio.Event) -> bool:
        """Score and publish a batch; False when stopped before the labels were acknowledged."""
        good: list[tuple[Record, RequestEvent]] = []
        for record in records:
            try:
                good.append((record, codec.decode(RequestEvent, record.value)))
            except PoisonRecord as exc:
                await self._park(producer, record, "poison", str(exc))
        if self.sampler is not None and good:
            picks = self.sampler.choose([event for _, event in good])
            kept = [g for g, pick in zip(good, picks, strict=True) if pick.score]
            self.skipped += len(good) - len(kept)
            good = kept
        if not good:
            return True
        labels = await self._score(good, producer)
        if self.sampler is not None:
            for event, label in labels:
                self.sampler.observe(event, _argmax_label(label))
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
        return await asyncio.to_thread(self._predict_now, dialogues, attention)

    def _predict_now(self, dialogues: list[tuple[Turn, ...]], attention: bool) -> TeacherOutput:
        precision = self.settings.precision
        return predict(self.model, dialogues, attention=attention, precision=precision)

    def _labels(self, events: Sequence[RequestEvent], out: TeacherOutput) -> list[SoftLabel]:
        ids = [event.request_id for event in events]
        return soft_labels(self.model, self.settings.teacher_id, ids, out)

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


class Intake:
    """Fetches ahead of the scorer with at most ``max_in_flight`` records unfinished.

    ``pump`` polls all the time (a paused partition just yields nothing), which is what
    keeps the member in its group; ``take`` hands out batches; ``release`` frees room.
    The bound holds except right after a rebalance hands over a partition while full:
    then one poll may bring one record before that partition is paused too.
    """

    def __init__(self, consumer: Consumer, settings: TeacherSettings, hooks: Hooks) -> None:
        self.consumer = consumer
        self.limit = settings.max_in_flight
        self.batch_size = min(settings.batch_size, self.limit)
        self.batch_wait_s = settings.batch_wait_ms / 1000
        self.hooks = hooks
        self.buffer: deque[Record] = deque()
        self.in_flight = 0  # buffered + handed out, not yet released
        self.peak = 0
        self.pauses = 0
        self.paused = False
        self._arrived = asyncio.Event()

    async def pump(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            room = self.limit - self.in_flight
            # Hysteresis: resume once a whole batch fits, not at every freed slot.
            if self.paused and room >= self.batch_size:
                self.consumer.resume(*self.consumer.assignment())
                self.paused = False
            elif not self.paused and room <= 0:
                self.paused = True
                self.pauses += 1
            if self.paused:  # again each time: a rebalance may have brought new partitions
                self.consumer.pause(*self.consumer.assignment())
            records = await self.consumer.getmany(timeout_ms=POLL_MS, max_records=max(room, 1))
            if records:
                self.buffer.extend(records)
                self._moved(len(records))
                self._arrived.set()

    async def take(self, stop: asyncio.Event, pump: asyncio.Task[None]) -> list[Record]:
        """Up to ``batch_size`` records, waiting at most ``batch_wait_ms`` after the first."""
        if pump.done():
            pump.result()  # the pump failed: raise its error here
            return []
        if not self.buffer:
            await self._wait_arrival(POLL_MS / 1000)  # bounds how late ``stop`` is noticed
            if not self.buffer:
                return []
        deadline = time.monotonic() + self.batch_wait_s
        while len(self.buffer) < self.batch_size and not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not await self._wait_arrival(left):
                break
        n = min(self.batch_size, len(self.buffer))
        batch = [self.buffer.popleft() for _ in range(n)]
        # Records of partitions revoked meanwhile are another member's now: drop, not score.
        mine = self.consumer.assignment()
        kept = [r for r in batch if r.tp in mine]
        if len(kept) < len(batch):
            self.release(len(batch) - len(kept))
        return kept

    def release(self, n: int) -> None:
        self._moved(-n)

    def _moved(self, n: int) -> None:
        self.in_flight += n
        self.peak = max(self.peak, self.in_flight)
        self.hooks.on_teacher_in_flight(self.in_flight)

    async def _wait_arrival(self, timeout_s: float) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def _argmax_label(label: SoftLabel) -> str:
    logits = label.logits
    return label.labels[max(range(len(logits)), key=logits.__getitem__)]


def _next_offsets(
    records: Sequence[Record], assigned: set[TopicPartition]
) -> dict[TopicPartition, int]:
    """Offset after the last handled record, per partition still ours (a rebalance may revoke)."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        if r.tp in assigned:
            out[r.tp] = max(out.get(r.tp, 0), r.offset + 1)
    return out
