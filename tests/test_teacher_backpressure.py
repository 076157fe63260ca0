"""A slow teacher on the real broker: bounded memory, no rebalance, nothing lost."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from stream_distill.bus import codec
from stream_distill.bus.base import TopicPartition
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.kafka import KafkaBus
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings, TeacherSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import RequestEvent, SoftLabel, Turn
from stream_distill.models.factory import default_tokenizer_json, set_threads, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.teacher.model import TeacherModel, TeacherOutput
from stream_distill.teacher.scorer import TeacherScorer
from stream_distill.testing import RecordingHooks, eventually

LABELS = tuple(sorted(INTENTS[:4]))
MAX_POLL_MS = 2000
SLOW_S = 2.5  # longer than MAX_POLL_MS: a scorer that stops polling while scoring gets dropped


def _slow_teacher(slow_calls: int) -> TeacherModel:
    """A real tiny teacher whose first ``slow_calls`` predictions each take ``SLOW_S``."""
    set_threads(1)
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=32)
    teacher = TeacherModel(tiny_classifier(LABELS, layers=1), encoder)
    real = teacher.predict
    calls = [0]
    lock = threading.Lock()

    def predict(dialogues: Sequence[Sequence[Turn]], *, attention: bool = True) -> TeacherOutput:
        with lock:
            calls[0] += 1
            slow = calls[0] <= slow_calls
        if slow:
            time.sleep(SLOW_S)
        return real(dialogues, attention=attention)

    teacher.predict = predict  # type: ignore[method-assign]
    return teacher


def _events(n: int) -> list[RequestEvent]:
    return [
        RequestEvent(
            request_id=f"r{i}",
            conversation_id=f"c{i}",
            turns=ex.turns,
            served_intent=LABELS[0],
            entropy=0.5,
            margin=0.1,
            model_version="v1",
            latency_ms=1.0,
        )
        for i, ex in enumerate(labelled_examples(n, seed=4))
    ]


async def test_slow_teacher_pauses_fetching_without_a_rebalance(
    broker: EmbeddedBroker, prefix: str
) -> None:
    n, bound = 60, 16
    bus = KafkaBus(
        KafkaSettings(topic_prefix=prefix, max_poll_interval_ms=MAX_POLL_MS), broker.bootstrap
    )
    await bus.ensure_topics()
    events = _events(n)
    async with bus.producer() as p:
        for e in events:
            await p.send(bus.topics.requests, codec.encode(e), key=e.conversation_id.encode())
    settings = TeacherSettings(
        batch_size=8,
        batch_wait_ms=5,
        max_in_flight=bound,
        emit_attention=False,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
    )
    hooks = RecordingHooks()
    scorer = TeacherScorer(bus, _slow_teacher(slow_calls=2), settings, hooks)
    stop = asyncio.Event()
    task = asyncio.create_task(scorer.run(stop))
    seen: list[tuple[frozenset[TopicPartition], Any]] = []

    def joined() -> bool:
        return scorer.intake is not None and bool(scorer.intake.consumer.assignment())

    try:
        await eventually(joined, timeout_s=30)
        assert scorer.intake is not None
        consumer = scorer.intake.consumer
        # aiokafka keeps the group generation private; it is the surest sign of a rebalance
        # (after a poll-interval expiry the assignment looks unchanged, the generation does not)
        coordinator = consumer._c._coordinator  # type: ignore[attr-defined]

        def watch() -> bool:
            seen.append((frozenset(consumer.assignment()), coordinator.generation))
            return scorer.scored >= n

        await eventually(watch, timeout_s=60, every_s=0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)

    intake = scorer.intake
    assert intake is not None
    # memory stayed bounded, and the bound was what held it (the slow batches filled it)
    assert intake.peak == bound
    assert max(c for (c,) in hooks.named("on_teacher_in_flight")) == bound
    assert intake.pauses >= 1
    # one assignment, one generation, from join to the last label: no rebalance
    assert len(set(seen)) == 1, sorted({(len(a), g) for a, g in seen})
    assert len(seen[0][0]) == KafkaSettings().partitions

    # every request was scored (at least once), and the labels reached the broker
    got: set[str] = set()
    async with bus.consumer([bus.topics.soft_labels]) as c:
        end = time.monotonic() + 20
        while len(got) < n and time.monotonic() < end:
            for r in await c.getmany(timeout_ms=200):
                got.add(codec.decode(SoftLabel, r.value).request_id)
    assert got == {e.request_id for e in events}


async def test_in_flight_bound_on_the_memory_twin() -> None:
    """Same bound, no broker: the peak never passes ``max_in_flight`` and drains to zero."""
    bus = MemoryBus()
    await bus.ensure_topics()
    async with bus.producer() as p:
        for e in _events(40):
            await p.send(bus.topics.requests, codec.encode(e), key=e.conversation_id.encode())
    settings = TeacherSettings(
        batch_size=4, batch_wait_ms=1, max_in_flight=6, emit_attention=False, group_id="g"
    )
    scorer = TeacherScorer(bus, _slow_teacher(slow_calls=0), settings)
    stop = asyncio.Event()
    task = asyncio.create_task(scorer.run(stop))
    try:
        await eventually(lambda: scorer.scored >= 40, timeout_s=30)
        await eventually(lambda: scorer.intake is not None and scorer.intake.in_flight == 0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert scorer.intake is not None
    assert scorer.intake.peak == 6 and scorer.intake.pauses >= 1
    assert sum(bus.log.committed["g"].values()) == 40


async def test_bfloat16_scoring_stays_close_to_float32() -> None:
    """``precision="bfloat16"`` scores under autocast; labels stay near the float32 ones."""
    events = _events(12)
    teacher = _slow_teacher(slow_calls=0)
    expected = teacher.predict([e.turns for e in events], attention=False).logits
    bus = MemoryBus()
    await bus.ensure_topics()
    async with bus.producer() as p:
        for e in events:
            await p.send(bus.topics.requests, codec.encode(e), key=e.conversation_id.encode())
    settings = TeacherSettings(
        batch_size=4, batch_wait_ms=1, emit_attention=False, group_id="g", precision="bfloat16"
    )
    scorer = TeacherScorer(bus, teacher, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(scorer.run(stop))
    try:
        await eventually(lambda: scorer.scored >= len(events), timeout_s=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    by_id = {
        label.request_id: label.logits
        for label in (codec.decode(SoftLabel, r.value) for r in bus.records(bus.topics.soft_labels))
    }
    got = [by_id[e.request_id] for e in events]
    diff = float(np.abs(np.array(got) - expected).max())
    assert 0 < diff < 0.1  # bfloat16 did run (not bit-identical) and stayed close
