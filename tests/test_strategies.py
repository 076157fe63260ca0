"""multi_teacher end to end, the temperature schedule in the learner, and their checkpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from stream_distill.bus.base import Topics
from stream_distill.bus.codec import encode
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import ModelSettings, TrainerSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import HardLabel, RequestEvent, SoftLabel
from stream_distill.metrics.prometheus import PrometheusHooks
from stream_distill.models.factory import default_tokenizer_json, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.registry.store import Registry
from stream_distill.teacher.model import TeacherModel
from stream_distill.testing import RecordingHooks
from stream_distill.trainer.build import learner_from_teacher
from stream_distill.trainer.join import Example
from stream_distill.trainer.learner import Learner, to_torch
from stream_distill.trainer.loop import Trainer
from stream_distill.trainer.losses import kd_kl
from stream_distill.trainer.replay import ClassBalancedReplay
from stream_distill.trainer.teachers import MASKED, fuse

torch.set_num_threads(1)
LABELS = INTENTS[:6]
# The oracle knows four of the student's labels (in another order) and one it does not.
ORACLE_LABELS = (LABELS[3], LABELS[1], "zz_unknown", LABELS[0], LABELS[2])


def _teacher() -> TeacherModel:
    enc = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), 32)
    return TeacherModel(tiny_classifier(LABELS, layers=2, hidden=32, heads=2, intermediate=64), enc)


def _settings(tmp_path: Path, **kw: object) -> TrainerSettings:
    base: dict[str, object] = dict(
        checkpoint_dir=tmp_path / "ckpt",
        batch_size=8,
        min_examples_to_train=4,
        lr=1e-3,
        holdout_fraction=0.0,
        publish_every_steps=10**6,
        publish_every_s=3600,
    )
    return TrainerSettings.model_validate({**base, **kw})


def _learner(teacher: TeacherModel, settings: TrainerSettings) -> Learner:
    return learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )


def _oracle_logits(intent: str) -> tuple[float, ...]:
    return tuple(4.0 if y == intent else 0.0 for y in ORACLE_LABELS)


async def _feed_two_teachers(bus: MemoryBus, teacher: TeacherModel, n: int) -> None:
    examples = [e for e in labelled_examples(n * 10, seed=2) if e.intent in LABELS[:4]][:n]
    assert len(examples) == n
    out = teacher.predict([e.turns for e in examples], attention=False)
    async with bus.producer() as p:
        for i, (ex, logits) in enumerate(zip(examples, out.logits, strict=True)):
            rid = f"m{i}"
            req = RequestEvent(
                request_id=rid, conversation_id=ex.conversation_id, turns=ex.turns,
                served_intent=LABELS[0], entropy=1.0, margin=0.1, model_version="v1",
                latency_ms=1.0,
            )  # fmt: skip
            tiny = SoftLabel(
                request_id=rid, teacher_id="tiny", teacher_version="1", labels=LABELS,
                label_set_version="a", logits=tuple(float(x) for x in logits),
            )  # fmt: skip
            oracle = SoftLabel(
                request_id=rid, teacher_id="oracle", teacher_version="1", labels=ORACLE_LABELS,
                label_set_version="b", logits=_oracle_logits(ex.intent),
            )  # fmt: skip
            hard = HardLabel(feedback_id=f"f{rid}", request_id=rid, intent=ex.intent)
            await p.send(bus.topics.requests, encode(req), key=rid.encode())
            await p.send(bus.topics.soft_labels, encode(tiny), key=rid.encode())
            await p.send(bus.topics.soft_labels, encode(oracle), key=rid.encode())
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


async def test_multi_teacher_adaptive_class_balanced_scheduled_and_resumed(
    tmp_path: Path,
) -> None:
    bus = MemoryBus(Topics("mt."))
    await bus.ensure_topics()
    teacher = _teacher()
    settings = _settings(
        tmp_path,
        strategy="multi_teacher",
        teacher_weighting="adaptive",
        teachers_expected=2,
        replay_balance="class_balanced",
        replay_size=12,
        temperature_schedule="linear",
        temperature=4.0,
        temperature_final=1.0,
        temperature_steps=20,
        promotion_margin=1.0,  # the random tiny teacher makes gate figures arbitrary
        agreement_margin=1.0,
    )
    learner = _learner(teacher, settings)
    hooks = RecordingHooks()
    registry = Registry(tmp_path / "reg")
    trainer = Trainer(bus, registry, learner, settings, teacher.encoder.to_str(), hooks)
    await _feed_two_teachers(bus, teacher, 40)
    await _run_until(trainer, lambda: learner.steps >= 6)
    assert trainer.join.stats.soft_labels == 80 and trainer.stats.last_losses["kd"] > 0.0
    assert isinstance(trainer.replay, ClassBalancedReplay) and len(trainer.replay) == 12
    assert all(len(ex.teacher_labels) == 2 for ex in trainer.replay.items)
    # every hard-labelled example scored both teachers; the oracle earns the weight
    panel = learner.teachers
    assert panel.seen["oracle"] == pytest.approx(panel.seen["tiny"]) and panel.seen["tiny"] > 5
    assert panel.accuracy("oracle") > 0.8 > panel.accuracy("tiny")
    w_oracle, w_tiny = panel.weights(["oracle", "tiny"])
    assert w_oracle > 0.9 and w_oracle + w_tiny == pytest.approx(1.0)
    (reported,) = hooks.named("on_teacher_weights")[-1]
    assert reported == {"oracle": w_oracle, "tiny": w_tiny}
    prom = PrometheusHooks()
    prom.on_teacher_weights(reported)
    weight = prom.registry.get_sample_value("sd_trainer_teacher_weight", {"teacher": "oracle"})
    assert weight == w_oracle
    temperature = learner.temperature
    assert temperature == pytest.approx(4.0 - 3.0 * learner.steps / 20)

    await trainer.checkpoint()
    again = _learner(teacher, settings)
    t2 = Trainer(bus, Registry(tmp_path / "reg"), again, settings, teacher.encoder.to_str())
    assert again.temperature == 4.0  # a fresh learner starts the schedule...
    assert t2.restore()
    assert again.temperature == temperature  # ...a restored one continues it
    assert again.teachers.to_json() == panel.to_json()
    assert again.teachers.weights(["oracle", "tiny"]) == [w_oracle, w_tiny]
    assert t2.replay.to_json() == trainer.replay.to_json()


def test_fused_target_and_scheduled_temperature_reach_the_loss(tmp_path: Path) -> None:
    teacher = _teacher()
    settings = _settings(
        tmp_path,
        strategy="multi_teacher",
        teacher_weights={"oracle": 3.0},
        temperature_schedule="cosine",
        temperature=4.0,
        temperature_final=1.0,
        temperature_steps=2,
    )
    learner = _learner(teacher, settings)
    for m in learner.model.modules():  # deterministic forward passes in train mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    data = [e for e in labelled_examples(60, seed=3) if e.intent in LABELS[:4]][:6]
    tiny_logits = teacher.predict([e.turns for e in data], attention=False).logits
    examples = []
    for i, (e, logits) in enumerate(zip(data, tiny_logits, strict=True)):
        softs = (
            SoftLabel(
                request_id=f"x{i}", teacher_id="tiny", teacher_version="1", labels=LABELS,
                label_set_version="a", logits=tuple(float(x) for x in logits),
            ),
            SoftLabel(
                request_id=f"x{i}", teacher_id="oracle", teacher_version="1",
                labels=ORACLE_LABELS, label_set_version="b", logits=_oracle_logits(e.intent),
            ),
        )  # fmt: skip
        examples.append(Example(f"x{i}", e.turns, softs[1], None, softs))

    def expected_kd(t: float) -> float:
        targets = torch.tensor(
            [
                fuse(
                    [(s.labels, s.logits, 3.0 if s.teacher_id == "oracle" else 1.0)
                     for s in ex.teacher_labels],
                    LABELS,
                    t,
                )
                for ex in examples
            ]
        )  # fmt: skip
        learner.model.eval()
        with torch.no_grad():
            feed = to_torch(learner.encoder.encode([ex.turns for ex in examples]))
            student = learner.model(**feed).logits.masked_fill(targets <= MASKED, MASKED)
        return float(kd_kl(student, targets, t))

    for step, t in enumerate((4.0, 2.5)):  # cosine 4 → 1 over 2 steps: 4, 2.5, 1
        assert learner.steps == step and learner.temperature == pytest.approx(t)
        want, other = expected_kd(t), expected_kd(settings.temperature_final)
        assert abs(want - other) > 1e-3  # the temperature makes a visible difference
        assert learner.learn_many(examples)["kd"] == pytest.approx(want, rel=1e-4)
    assert learner.temperature == 1.0
