"""The offline strategy: record the joined stream to disk, train rounds of epochs, publish."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from stream_distill.bus.base import Bus, Topics
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode, encode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings, ModelSettings, TrainerSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import HardLabel, ModelPublished, RequestEvent, SoftLabel, Turn
from stream_distill.models.factory import default_tokenizer_json, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.registry.store import Registry
from stream_distill.teacher.model import TeacherModel
from stream_distill.testing import RecordingHooks
from stream_distill.trainer.build import learner_from_teacher
from stream_distill.trainer.join import Example
from stream_distill.trainer.loop import Trainer
from stream_distill.trainer.offline import OfflineStore, round_batches

torch.set_num_threads(1)
LABELS = INTENTS[:6]


def _teacher() -> TeacherModel:
    enc = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), 32)
    return TeacherModel(tiny_classifier(LABELS, layers=2, hidden=32, heads=2, intermediate=64), enc)


def _trainer(bus: Bus, tmp_path: Path, teacher: TeacherModel, **kw: object) -> Trainer:
    base: dict[str, object] = dict(
        checkpoint_dir=tmp_path / "ckpt",
        strategy="offline",
        batch_size=8,
        lr=1e-3,
        holdout_fraction=0.0,
        offline_train_after=40,
        offline_epochs=2,
        # The random tiny teacher makes agreement figures arbitrary; the gate has its own
        # tests (test_gate.py), here every round's candidate should go out.
        promotion_margin=1.0,
        agreement_margin=1.0,
    )
    settings = TrainerSettings.model_validate({**base, **kw})
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    tok = teacher.encoder.to_str()
    return Trainer(bus, Registry(tmp_path / "reg"), learner, settings, tok, RecordingHooks())


async def _feed(bus: Bus, teacher: TeacherModel, n: int, seed: int = 0) -> None:
    examples = [e for e in labelled_examples(n * 10, seed=seed) if e.intent in LABELS][:n]
    assert len(examples) == n
    out = teacher.predict([e.turns for e in examples], attention=False)
    async with bus.producer() as p:
        for i, (ex, logits) in enumerate(zip(examples, out.logits, strict=True)):
            rid = f"r{seed}-{i}"
            req = RequestEvent(
                request_id=rid, conversation_id=ex.conversation_id, turns=ex.turns,
                served_intent=LABELS[0], entropy=1.0, margin=0.1, model_version="v1",
                latency_ms=1.0,
            )  # fmt: skip
            soft = SoftLabel(
                request_id=rid, teacher_id="t", teacher_version=teacher.version, labels=LABELS,
                label_set_version=teacher.label_set_version,
                logits=tuple(float(x) for x in logits),
            )  # fmt: skip
            await p.send(bus.topics.requests, encode(req), key=rid.encode())
            await p.send(bus.topics.soft_labels, encode(soft), key=rid.encode())
            if i % 2 == 0:
                hard = HardLabel(feedback_id=f"f{rid}", request_id=rid, intent=ex.intent)
                await p.send(bus.topics.hard_labels, encode(hard), key=rid.encode())


async def _run_until(trainer: Trainer, cond: object, timeout_s: float = 60.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(trainer.run(stop))
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond() and loop.time() < end:  # type: ignore[operator]
        await asyncio.sleep(0.05)
        if task.done():
            task.result()
    stop.set()
    await asyncio.wait_for(task, 30)
    assert cond(), "condition not reached"  # type: ignore[operator]


def _ex(i: int, hard: str | None = None) -> Example:
    return Example(f"e{i}", (Turn(role="user", text=f"t{i}"),), None, hard)


# -- the store -------------------------------------------------------------------------------


def test_store_records_dedupes_bounds_and_cuts_back_to_a_checkpoint(tmp_path: Path) -> None:
    store = OfflineStore(tmp_path, max_examples=5)
    assert store.append([_ex(0), _ex(1)]) == 2
    state = json.loads(json.dumps(store.to_json()))  # what a checkpoint would hold
    assert store.append([_ex(1, hard="refund"), _ex(2), _ex(3), _ex(4)]) == 3  # bound: 5
    assert store.count == 5 and store.dropped == 1
    got = store.examples()
    assert [e.request_id for e in got] == ["e0", "e1", "e2", "e3"]  # one per request id
    assert got[1].hard == "refund"  # the later record (a late hard label) wins
    # a restart from the earlier checkpoint cuts what was recorded after it
    again = OfflineStore(tmp_path, max_examples=5)
    again.load_json(state)
    assert again.count == 2 and [e.request_id for e in again.examples()] == ["e0", "e1"]
    assert again.path.stat().st_size == again.size
    # the next round starts empty; the old file goes once pruned
    old = again.path
    again.rotate()
    assert again.examples() == [] and old.exists()
    again.prune()
    assert not old.exists()


def test_store_without_a_checkpoint_starts_empty(tmp_path: Path) -> None:
    store = OfflineStore(tmp_path, max_examples=10)
    store.append([_ex(0)])
    store.rotate()
    store.append([_ex(1)])
    fresh = OfflineStore(tmp_path, max_examples=10)
    fresh.load_json(None)
    assert fresh.round == 0 and fresh.examples() == [] and list(tmp_path.glob("*.jsonl")) == []


def test_round_batches_are_shuffled_epochs() -> None:
    examples = [_ex(i) for i in range(10)]
    batches = round_batches(examples, epochs=3, batch_size=4, seed=7)
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    for epoch in range(3):
        ids = [e.request_id for b in batches[3 * epoch : 3 * epoch + 3] for e in b]
        assert sorted(ids) == sorted(e.request_id for e in examples)
    assert batches == round_batches(examples, epochs=3, batch_size=4, seed=7)
    assert batches != round_batches(examples, epochs=3, batch_size=4, seed=8)


# -- end to end ------------------------------------------------------------------------------


async def test_offline_records_first_then_trains_a_round_and_publishes(tmp_path: Path) -> None:
    bus = MemoryBus(Topics("o."))
    await bus.ensure_topics()
    teacher = _teacher()
    trainer = _trainer(bus, tmp_path, teacher, offline_train_after=1000)
    await _feed(bus, teacher, 30)
    await _run_until(trainer, lambda: trainer.offline.count == 30)
    # recording only: no step yet, only the first version (serve needs one) is out
    assert trainer.learner.steps == 0 and trainer.stats.published == ["v1"]
    recorded = trainer.offline.examples()
    assert len(recorded) == 30 and sum(e.hard is not None for e in recorded) == 15
    assert all(e.soft is not None for e in recorded)
    before = [p.detach().clone() for p in trainer.learner.model.parameters()]

    # 30 more make 60 >= offline_train_after, in a fresh process resuming the checkpoint
    trainer = _trainer(bus, tmp_path, teacher, offline_train_after=60)
    await _feed(bus, teacher, 30, seed=1)
    await _run_until(trainer, lambda: trainer.stats.rounds >= 1)
    assert trainer.learner.steps == 2 * math.ceil(60 / 8)  # two epochs over the record
    assert trainer.stats.last_losses["kd"] > 0.0
    assert any(
        not torch.equal(a, b)
        for a, b in zip(before, trainer.learner.model.parameters(), strict=True)
    )
    events = [decode(ModelPublished, r.value) for r in bus.records(bus.topics.models)]
    assert [e.version for e in events] == ["v1", "v2"] and events[1].metrics.steps == 16
    # the round's record is gone; the checkpoint is in round 1
    assert trainer.offline.round == 1 and trainer.offline.count == 0
    assert isinstance(trainer.hooks, RecordingHooks)
    assert trainer.hooks.named("on_offline_record")[-2:] == [(60,), (0,)]
    assert [p.name for p in trainer.offline.dir.glob("*.jsonl")] == []
    state = json.loads((trainer.store.dir / trainer.store.latest_name() / "state.json").read_text())  # type: ignore[operator]
    assert state["offline"]["round"] == 1 and state["steps"] == 16


async def test_an_explicit_request_trains_what_is_recorded(tmp_path: Path) -> None:
    bus = MemoryBus(Topics("x."))
    await bus.ensure_topics()
    teacher = _teacher()
    trainer = _trainer(bus, tmp_path, teacher, offline_train_after=10**6, offline_epochs=1)
    await _feed(bus, teacher, 12)

    def recorded_then_asked() -> bool:
        if trainer.offline.count == 12 and trainer.stats.rounds == 0:
            trainer.request_round()
        return trainer.stats.rounds == 1

    await _run_until(trainer, recorded_then_asked)
    assert trainer.learner.steps == 2 and len(trainer.stats.published) == 2


async def test_records_after_the_checkpoint_are_recorded_once_after_a_crash(
    tmp_path: Path,
) -> None:
    bus = MemoryBus(Topics("c."))
    await bus.ensure_topics()
    teacher = _teacher()
    trainer = _trainer(bus, tmp_path, teacher, offline_train_after=10**6)
    await _feed(bus, teacher, 10)
    await _run_until(trainer, lambda: trainer.offline.count == 10)  # checkpointed on stop
    # A crash: more is consumed and recorded, but no checkpoint follows.
    await _feed(bus, teacher, 10, seed=1)
    async with bus.consumer(
        [bus.topics.requests, bus.topics.soft_labels, bus.topics.hard_labels],
        group_id=None,
        assign=trainer.offsets,
    ) as consumer:
        records = await consumer.getmany(timeout_ms=500, max_records=2000)
    async with bus.producer() as producer:
        await trainer._ingest(producer, records)
    trainer.offline.append(trainer.join.take_ready(100))
    assert trainer.offline.count == 20
    # The restart cuts the file back to the checkpoint and reads the rest from the log.
    again = _trainer(bus, tmp_path, teacher, offline_train_after=10**6)
    await _run_until(again, lambda: again.offline.count >= 20)
    lines = again.offline.path.read_text().splitlines()
    ids = [json.loads(line)[0] for line in lines]
    assert len(ids) == 20 == len(set(ids))  # each request recorded exactly once


async def test_offline_round_on_the_real_broker(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix, partitions=2), broker.bootstrap)
    await bus.ensure_topics()
    teacher = _teacher()
    trainer = _trainer(bus, tmp_path, teacher, offline_train_after=20, offline_epochs=1)
    await _feed(bus, teacher, 20)
    await _run_until(trainer, lambda: trainer.stats.rounds >= 1, timeout_s=90)
    assert trainer.learner.steps == math.ceil(20 / 8)
    assert len(trainer.stats.published) == 2
    assert sum(trainer.offsets.values()) == 20 + 20 + 10


async def test_a_round_stopped_midway_is_redone_from_the_last_checkpoint(tmp_path: Path) -> None:
    bus = MemoryBus(Topics("s."))
    await bus.ensure_topics()
    teacher = _teacher()
    trainer = _trainer(bus, tmp_path, teacher, offline_train_after=16, offline_epochs=500)
    untrained = [p.detach().clone() for p in trainer.learner.model.parameters()]
    await _feed(bus, teacher, 16)
    await _run_until(trainer, lambda: trainer.stats.steps >= 3)  # stopped inside the round
    assert trainer.stats.rounds == 0
    # The last checkpoint predates the recording: the restart has the untrained weights,
    # an empty record and the offsets from before, and records and trains it all again.
    again = _trainer(bus, tmp_path, teacher, offline_train_after=16, offline_epochs=1)
    assert again.restore()
    assert again.learner.steps == 0 and again.offline.round == 0 and again.offline.count == 0
    assert sum(again.offsets.values()) == 0
    for a, b in zip(again.learner.model.parameters(), untrained, strict=True):
        assert torch.equal(a, b)
    await _run_until(again, lambda: again.stats.rounds == 1)
    assert again.learner.steps == 2 and again.stats.published == ["v2"]
