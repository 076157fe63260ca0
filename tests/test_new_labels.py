"""New labels in the student: imprinted rows (optional) and faster candidates after growth."""

from __future__ import annotations

from pathlib import Path

import torch
from test_label_growth import GROWN, LABELS, PROMO, _oracle, _request, _soft, _teacher, _trainer

from stream_distill.bus.base import Topics
from stream_distill.bus.codec import encode
from stream_distill.bus.memory import MemoryBus
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import HardLabel
from stream_distill.models.factory import head_of
from stream_distill.models.imprint import classifier_inputs
from stream_distill.trainer.join import JoinState
from stream_distill.trainer.loop import Trainer


async def _ingest_all(trainer: Trainer, bus: MemoryBus) -> None:
    topics = [bus.topics.requests, bus.topics.soft_labels, bus.topics.hard_labels]
    async with (
        bus.producer() as producer,
        bus.consumer(topics, group_id=None, assign={}) as consumer,
    ):
        records = await consumer.getmany(timeout_ms=500, max_records=1000)
        order = {t: i for i, t in enumerate(topics)}  # requests first, as a join would see
        await trainer._ingest(producer, sorted(records, key=lambda r: order[r.topic]))


def _expected_row(trainer: Trainer, dialogues: list[object], old: torch.Tensor) -> torch.Tensor:
    learner = trainer.learner
    features = classifier_inputs(learner.model, learner.encoder, dialogues)  # type: ignore[arg-type]
    mean = features.mean(dim=0)
    return mean / mean.norm() * old[: len(LABELS)].norm(dim=1).mean()


async def test_growth_from_soft_labels_imprints_from_the_teachers_examples(
    tmp_path: Path,
) -> None:
    bus = MemoryBus(Topics("i."))
    await bus.ensure_topics()
    trainer = _trainer(bus, tmp_path, _teacher(), imprint_new_labels=True)
    before = head_of(trainer.learner.model).weight.detach().clone()
    promo = labelled_examples(12, seed=2, intents=(PROMO, LABELS[1]))
    async with bus.producer() as p:
        for i, ex in enumerate(promo):
            rid = f"n{i}"
            await p.send(bus.topics.requests, encode(_request(rid, ex)), key=b"k")
            soft = _soft(rid, GROWN, _oracle(GROWN, ex.intent))
            await p.send(bus.topics.soft_labels, encode(soft), key=b"k")
    await _ingest_all(trainer, bus)
    assert trainer.learner.labels == GROWN
    row = head_of(trainer.learner.model).weight.detach()[len(LABELS)]
    # the growth came with the third soft label of the grown list: the PROMO ones among
    # the first three requests are what the row was made of
    first = [ex.turns for ex in promo[:3] if ex.intent == PROMO]
    assert first, "the seeded traffic starts with a PROMO request"
    assert torch.allclose(row, _expected_row(trainer, first, before), atol=1e-5)
    assert torch.equal(head_of(trainer.learner.model).weight[: len(LABELS)], before)


async def test_growth_from_a_hard_label_uses_it_but_never_a_held_out_one(tmp_path: Path) -> None:
    bus = MemoryBus(Topics("h."))
    await bus.ensure_topics()
    trainer = _trainer(bus, tmp_path, _teacher(), holdout_fraction=0.5, imprint_new_labels=True)
    join: JoinState = trainer.join
    ex = labelled_examples(1, seed=5, intents=(INTENTS[10],))[0]
    trained = next(f"r{i}" for i in range(100) if not join.is_holdout(f"r{i}"))
    held = next(f"r{i}" for i in range(100) if join.is_holdout(f"r{i}"))
    before = head_of(trainer.learner.model).weight.detach().clone()
    async with bus.producer() as p:
        await p.send(bus.topics.requests, encode(_request(held, ex)), key=b"k")
        label = HardLabel(feedback_id="f-held", request_id=held, intent=INTENTS[10])
        await p.send(bus.topics.hard_labels, encode(label), key=b"k")
    await _ingest_all(trainer, bus)
    assert trainer.learner.labels == (*LABELS, INTENTS[10])
    row = head_of(trainer.learner.model).weight.detach()[len(LABELS)]
    imprinted = _expected_row(trainer, [ex.turns], before)
    assert not torch.allclose(row, imprinted, atol=1e-3)  # held out: not imprinted

    bus2 = MemoryBus(Topics("h2."))
    await bus2.ensure_topics()
    trainer2 = _trainer(
        bus2, tmp_path / "2", _teacher(), holdout_fraction=0.5, imprint_new_labels=True
    )
    async with bus2.producer() as p:
        await p.send(bus2.topics.requests, encode(_request(trained, ex)), key=b"k")
        label = HardLabel(feedback_id="f-trained", request_id=trained, intent=INTENTS[10])
        await p.send(bus2.topics.hard_labels, encode(label), key=b"k")
    await _ingest_all(trainer2, bus2)
    row = head_of(trainer2.learner.model).weight.detach()[len(LABELS)]
    assert torch.allclose(row, _expected_row(trainer2, [ex.turns], before), atol=1e-5)


async def test_without_imprinting_a_new_row_starts_from_noise(tmp_path: Path) -> None:
    bus = MemoryBus(Topics("o."))
    await bus.ensure_topics()
    trainer = _trainer(bus, tmp_path, _teacher())  # the default
    before = head_of(trainer.learner.model).weight.detach().clone()
    ex = labelled_examples(1, seed=5, intents=(INTENTS[10],))[0]
    async with bus.producer() as p:
        await p.send(bus.topics.requests, encode(_request("r1", ex)), key=b"k")
        label = HardLabel(feedback_id="f1", request_id="r1", intent=INTENTS[10])
        await p.send(bus.topics.hard_labels, encode(label), key=b"k")
    await _ingest_all(trainer, bus)
    assert trainer.learner.labels == (*LABELS, INTENTS[10])
    row = head_of(trainer.learner.model).weight.detach()[len(LABELS)]
    assert not torch.allclose(row, _expected_row(trainer, [ex.turns], before), atol=1e-3)


async def test_candidates_come_faster_right_after_an_intent_was_added(tmp_path: Path) -> None:
    bus = MemoryBus(Topics("p."))
    await bus.ensure_topics()
    trainer = _trainer(
        bus,
        tmp_path,
        _teacher(),
        publish_every_s=60.0,
        new_class_publish_every_s=10.0,
        new_class_publish_steps=100,
    )
    assert trainer._publish_interval_s() == 60.0
    trainer.learner.steps = 40
    trainer._grow([INTENTS[10]], "test")
    assert trainer._publish_interval_s() == 10.0
    trainer.learner.steps = 139
    assert trainer._publish_interval_s() == 10.0
    trainer.learner.steps = 140  # the window is over
    assert trainer._publish_interval_s() == 60.0
    trainer._grow([INTENTS[11]], "test")  # another one opens it again
    assert trainer._publish_interval_s() == 10.0
