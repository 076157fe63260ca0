"""Poison on every consumed topic: dead-lettered with its origin, the consumer moves on.

Consumers: the teacher scorer (requests), the trainer (requests, soft labels, hard
labels) and serve's model watcher (models), each on the real broker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stream_distill.bus.base import Producer, Record, TopicPartition
from stream_distill.bus.codec import encode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import ModelSettings, TeacherSettings, TrainerSettings
from stream_distill.events import SoftLabel
from stream_distill.registry.store import Registry
from stream_distill.teacher.model import TeacherModel, label_set_version
from stream_distill.teacher.scorer import TeacherScorer
from stream_distill.testing import announce_model, eventually, publish_bow, serve_for_test
from stream_distill.trainer.build import learner_from_teacher
from stream_distill.trainer.loop import Trainer

JUNK = b"\x00junk" * 199_000  # ~1 MB: just under the broker's default message size limit


def _soft_json(labels: tuple[str, ...], logits: list[str], rid: str = "r-poison") -> bytes:
    """A soft label written by hand, so non-finite numbers can be spelled as JSON does."""
    body = json.dumps(
        {"schema_version": 1, "request_id": rid, "teacher_id": "t", "teacher_version": "x",
         "labels": list(labels), "label_set_version": label_set_version(labels), "logits": "@"}
    )  # fmt: skip
    return body.replace('"@"', "[" + ", ".join(logits) + "]").encode()


async def _send_all(
    producer: Producer, items: list[tuple[str, bytes, str]]
) -> dict[tuple[str, int, int], str]:
    """Send (topic, value, why); returns where each landed → why."""
    out = {}
    for topic, value, why in items:
        part, off = await producer.send(topic, value, key=why.encode())
        out[(topic, part, off)] = why
    return out


async def _dead_letters(bus: KafkaBus, want: int) -> dict[tuple[str, int, int], Record]:
    """The dead-letter topic, keyed by the origin its headers name."""
    out = {}
    for rec in await _read(bus, bus.topics.dead_letters, want):
        h = dict(rec.headers)
        assert h["sd-error"], h  # a reason a human can act on
        origin = (
            h["sd-original-topic"].decode(),
            int(h["sd-original-partition"]),
            int(h["sd-original-offset"]),
        )
        out[origin] = rec
    return out


async def _read(bus: KafkaBus, topic: str, want: int, timeout_s: float = 20.0) -> list[Record]:
    out: list[Record] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    async with bus.consumer([topic], group_id=None) as consumer:
        while len(out) < want and loop.time() < end:
            out += await consumer.getmany(timeout_ms=200)
    return out


def _check_parked(
    parked: dict[tuple[str, int, int], Record],
    sent: dict[tuple[str, int, int], str],
    values: dict[str, bytes],
) -> None:
    assert set(parked) == set(sent), (sorted(parked), sorted(sent))
    for origin, why in sent.items():
        assert parked[origin].value == values[why], why  # the original bytes, untouched


async def test_teacher_parks_poison_requests_and_scores_on(
    kbus: KafkaBus, tiny_teacher_dir: Path, events: Callable[..., list[Any]]
) -> None:
    teacher = TeacherModel.load(tiny_teacher_dir)
    topics = kbus.topics
    values = {
        "not-json": b"\xff\xfe{{ not json",
        "wrong-schema": b'{"schema_version": 1, "request_id": "r"}',
        "future-schema": b'{"schema_version": 2}',
        "junk-1mb": JUNK,
    }
    (good, _, _), *_ = events(teacher.labels, 1, seed=3, tag="tp")
    scorer = TeacherScorer(kbus, teacher, TeacherSettings(group_id=f"{topics.prefix}teacher"))
    stop = asyncio.Event()
    async with kbus.producer() as producer:
        sent = await _send_all(producer, [(topics.requests, v, k) for k, v in values.items()])
        await producer.send(topics.requests, encode(good), key=b"good")
        task = asyncio.create_task(scorer.run(stop))
        try:
            soft = await _read(kbus, topics.soft_labels, 1)
            assert not task.done()  # no crash loop: it is still consuming
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
    assert [json.loads(r.value)["request_id"] for r in soft] == [good.request_id]
    _check_parked(await _dead_letters(kbus, len(values)), sent, values)


async def test_trainer_parks_poison_on_all_three_topics(
    kbus: KafkaBus,
    tiny_teacher_dir: Path,
    labels: tuple[str, ...],
    events: Callable[..., list[Any]],
    tmp_path: Path,
) -> None:
    topics = kbus.topics
    good = _soft_json(labels, ["0.5"] * len(labels)).decode()
    values = {
        "req-not-json": b"not json at all",
        "req-wrong-schema": b'{"schema_version": 1, "request_id": "r", "turns": []}',
        "req-junk-1mb": JUNK,
        "soft-nan": _soft_json(labels, ["NaN"] * len(labels)),
        "soft-inf": _soft_json(labels, ["Infinity", *["0"] * (len(labels) - 1)]),
        "soft-overflow": _soft_json(labels, ["1e999", *["0"] * (len(labels) - 1)]),
        "soft-width": _soft_json(labels, ["0.1"] * (len(labels) + 1)),
        "soft-wrong-type": good.replace('"labels": [', '"labels": 7, "x": [').encode(),
        "soft-junk-1mb": JUNK,
        "hard-not-json": b"[1, 2",
        "hard-wrong-schema": b'{"schema_version": 1, "feedback_id": "f", "request_id": "r"}',
        "hard-junk-1mb": JUNK,
    }
    where = {"req": topics.requests, "soft": topics.soft_labels, "hard": topics.hard_labels}
    teacher = TeacherModel.load(tiny_teacher_dir)
    settings = TrainerSettings(
        checkpoint_dir=tmp_path / "ckpt",
        batch_size=8,
        min_examples_to_train=1,
        publish_every_steps=10**6,
        publish_every_s=10**6,
    )
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, labels)
    trainer = Trainer(kbus, registry, learner, settings, teacher.encoder.to_str())
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))
    try:
        async with kbus.producer() as producer:
            sent = await _send_all(
                producer, [(where[k.split("-")[0]], v, k) for k, v in values.items()]
            )
            await eventually(lambda: trainer.stats.dead_letters == len(values), timeout_s=30)
            assert not task.done()
            # Poison taught nothing: not one step, the weights as they were.
            assert learner.steps == 0
            assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
            ends = {TopicPartition(t, p): o + 1 for t, p, o in sent}
            assert all(trainer.offsets[tp] >= end for tp, end in ends.items())

            # A soft label over a label set the student does not share: no KD, no crash.
            (req, _, hard), *rest = events(labels, 9, seed=5, tag="tu")
            alien = ("zz_alpha", "zz_beta", "zz_gamma")
            odd = SoftLabel(request_id=req.request_id, teacher_id="t", teacher_version="x",
                            labels=alien, label_set_version=label_set_version(alien),
                            logits=(9.0, -9.0, 0.0))  # fmt: skip
            await producer.send(topics.requests, encode(req), key=b"u")
            await producer.send(topics.soft_labels, encode(odd), key=b"u")
            await eventually(lambda: trainer.join.stats.soft_labels == 1, timeout_s=20)
            await eventually(lambda: trainer.join.ready_count == 0, timeout_s=20)
            assert all(torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
            # Good data after all that still trains.
            for r, s, h in rest:
                await producer.send(topics.requests, encode(r), key=b"g")
                await producer.send(topics.soft_labels, encode(s), key=b"g")
                await producer.send(topics.hard_labels, encode(h), key=b"g")
            await producer.send(topics.hard_labels, encode(hard), key=b"u")
            await eventually(lambda: trainer.join.stats.hard_labels == 9, timeout_s=20)
            await eventually(lambda: learner.steps >= 2, timeout_s=20)
            assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert trainer.stats.dead_letters == len(values)
    assert all(torch.isfinite(v).all() for v in learner.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in learner.model.state_dict().items())
    _check_parked(await _dead_letters(kbus, len(values)), sent, values)


async def test_model_watcher_parks_poison_and_still_swaps(kbus: KafkaBus, tmp_path: Path) -> None:
    labels = ("a", "b", "c")
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, labels, seed=1)
    topics = kbus.topics
    values = {
        "not-json": b"{broken",
        "wrong-schema": b'{"schema_version": 1, "version": "v9", "sha256": "nothex"}',
        "junk-1mb": JUNK,
    }
    async with serve_for_test(registry, kbus, poll_interval_s=60) as (serve, client):
        assert await serve.core.wait_ready(10)
        async with kbus.producer() as producer:
            sent = await _send_all(producer, [(topics.models, v, k) for k, v in values.items()])
            parked = await _dead_letters(kbus, len(values))
            assert serve.core.version == "v1" and not serve.core.rejected  # nothing was tried
            v2 = publish_bow(registry, labels, seed=2)
            await announce_model(producer, topics, v2)  # behind the poison: still heard
        await eventually(lambda: serve.core.version == "v2", timeout_s=20)
        r = await client.post("/v1/classify", json={"text": "still answering?"})
        assert r.status_code == 200 and r.json()["model_version"] == "v2"
    _check_parked(parked, sent, values)
