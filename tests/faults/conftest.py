"""Shared pieces of the fault suite: a real-broker bus per test and event builders."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import KafkaSettings
from stream_distill.data.synthetic import labelled_examples
from stream_distill.events import HardLabel, RequestEvent, SoftLabel
from stream_distill.teacher.model import META_FILE, label_set_version

EventMaker = Callable[..., list[tuple[RequestEvent, SoftLabel, HardLabel]]]


@pytest.fixture
async def kbus(broker: EmbeddedBroker, prefix: str) -> AsyncIterator[KafkaBus]:
    """A bus on the shared real broker, with this test's own topics created."""
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix, partitions=2), broker.bootstrap)
    await bus.ensure_topics()
    yield bus


@pytest.fixture(scope="session")
def labels(tiny_teacher_dir: Path) -> tuple[str, ...]:
    """The tiny teacher's (and so the student's) label list."""
    meta = json.loads((tiny_teacher_dir / META_FILE).read_text(encoding="utf-8"))
    return tuple(meta["labels"])


@pytest.fixture(scope="session")
def events() -> EventMaker:
    return make_events


def make_events(
    labels: tuple[str, ...], n: int, *, seed: int, tag: str
) -> list[tuple[RequestEvent, SoftLabel, HardLabel]]:
    """``n`` requests with a soft label and a hard label each (random logits, true intents)."""
    rng = random.Random(seed)
    pool = [e for e in labelled_examples(n * 3, seed=seed) if e.intent in labels][:n]
    out = []
    for i, ex in enumerate(pool):
        rid = f"{tag}-r{i}"
        req = RequestEvent(
            request_id=rid,
            conversation_id=ex.conversation_id,
            turns=ex.turns,
            served_intent=labels[0],
            entropy=1.0,
            margin=0.1,
            model_version="v1",
            latency_ms=1.0,
        )
        soft = SoftLabel(
            request_id=rid,
            teacher_id="t",
            teacher_version="t-fault",
            labels=labels,
            label_set_version=label_set_version(labels),
            logits=tuple(rng.gauss(0.0, 2.0) for _ in labels),
        )
        hard = HardLabel(feedback_id=f"{tag}-f{i}", request_id=rid, intent=ex.confirmed_intent)
        out.append((req, soft, hard))
    return out
