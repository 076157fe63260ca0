"""The trainer over the in-memory bus: join → learn → checkpoint → publish, and resume."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from stream_distill.bus.base import Topics
from stream_distill.bus.codec import decode, encode
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import ModelSettings, TrainerSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import HardLabel, ModelPublished, RequestEvent, SoftLabel, Turn
from stream_distill.models.factory import default_tokenizer_json, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.registry.store import Registry
from stream_distill.teacher.model import TeacherModel
from stream_distill.testing import RecordingHooks, teacher_soft
from stream_distill.trainer.build import learner_from_teacher
from stream_distill.trainer.join import Example
from stream_distill.trainer.loop import Trainer
from stream_distill.trainer.publish import eval_set
from stream_distill.trainer.rehearsal import MAX_REPEAT

torch.set_num_threads(1)
LABELS = INTENTS[:6]


def _teacher() -> TeacherModel:
    enc = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), 32)
    return TeacherModel(tiny_classifier(LABELS, layers=2, hidden=32, heads=2, intermediate=64), enc)


def _soft(teacher: TeacherModel, rid: str, logits: Sequence[float]) -> SoftLabel:
    """The teacher's soft label for ``rid`` over its own labels."""
    return teacher_soft(teacher, rid, logits, LABELS)


def _settings(tmp_path: Path, **kw: object) -> TrainerSettings:
    base: dict[str, object] = dict(
        checkpoint_dir=tmp_path / "ckpt",
        batch_size=8,
        publish_every_steps=3,
        publish_every_s=3600,
        min_examples_to_train=4,
        lr=1e-3,
        holdout_fraction=0.0,
    )
    base.update(kw)
    return TrainerSettings.model_validate(base)


async def _feed(bus: MemoryBus, teacher: TeacherModel, n: int, seed: int = 0) -> list[str]:
    examples = [e for e in labelled_examples(n * 3, seed=seed) if e.intent in LABELS][:n]
    out = teacher.predict([e.turns for e in examples], attention=False)
    rids = []
    async with bus.producer() as p:
        for i, (ex, logits) in enumerate(zip(examples, out.logits, strict=True)):
            rid = f"r{seed}-{i}"
            rids.append(rid)
            req = RequestEvent(
                request_id=rid,
                conversation_id=ex.conversation_id,
                turns=ex.turns,
                served_intent=LABELS[0],
                entropy=1.0,
                margin=0.1,
                model_version="v1",
                latency_ms=1.0,
            )
            soft = _soft(teacher, rid, logits)
            # a wrong confirmation may name an intent outside LABELS: keep the label space fixed
            label = ex.confirmed_intent if ex.confirmed_intent in LABELS else ex.intent
            hard = HardLabel(feedback_id=f"f{rid}", request_id=rid, intent=label)
            await p.send(bus.topics.requests, encode(req), key=ex.conversation_id.encode())
            await p.send(bus.topics.soft_labels, encode(soft), key=rid.encode())
            if i % 2 == 0:
                await p.send(bus.topics.hard_labels, encode(hard), key=rid.encode())
    return rids


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


async def test_trainer_publishes_versions_and_resumes(tmp_path: Path) -> None:
    bus = MemoryBus(Topics("x."))
    await bus.ensure_topics()
    teacher = _teacher()
    registry = Registry(tmp_path / "reg")
    settings = _settings(tmp_path)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings
    )
    hooks = RecordingHooks()
    trainer = Trainer(bus, registry, learner, settings, teacher.encoder.to_str(), hooks)
    await _feed(bus, teacher, 60)
    await _run_until(trainer, lambda: len(trainer.stats.published) >= 3)
    lags = hooks.named("on_consumer_lag")
    assert lags and lags[0] == ("trainer", 150)  # reported before the first fetch: all of it
    assert {name for name, _ in hooks.calls} >= {"on_train_step", "on_publish"}

    assert registry.list_versions()[:3] == ["v1", "v2", "v3"]
    events = [decode(ModelPublished, r.value) for r in bus.records(bus.topics.models)]
    assert [e.version for e in events][:3] == ["v1", "v2", "v3"]
    for e in events:
        mv = registry.load(e.version)
        assert mv.sha256 == e.sha256 and mv.labels == LABELS
        assert e.metrics.max_abs_logit_diff is not None and e.metrics.max_abs_logit_diff <= 1e-4
    assert trainer.join.stats.hard_labels == 30
    assert np.isfinite(trainer.stats.last_losses["total"])

    # A new trainer process resumes from the checkpoint: same offsets, nothing re-applied.
    steps, offsets = trainer.learner.steps, dict(trainer.offsets)
    assert sum(offsets.values()) == 60 + 60 + 30
    learner2 = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings, seed=9
    )
    t2 = Trainer(bus, registry, learner2, settings, teacher.encoder.to_str())
    assert t2.restore()
    assert t2.learner.steps == steps and t2.offsets == offsets
    assert t2.join.stats.hard_labels == 30
    for a, b in zip(learner.model.parameters(), learner2.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # replaying the same hard labels again is de-duplicated by feedback id
    async with bus.producer() as p:
        for r in bus.records(bus.topics.hard_labels)[:5]:
            await p.send(bus.topics.hard_labels, r.value, key=r.key)
    await _run_until(t2, lambda: t2.offsets != offsets, timeout_s=10)
    assert t2.join.stats.hard_labels == 30 and t2.join.stats.duplicates >= 5


async def test_poison_records_go_to_dead_letters(tmp_path: Path) -> None:
    bus = MemoryBus(Topics("y."))
    await bus.ensure_topics()
    teacher = _teacher()
    settings = _settings(tmp_path)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    trainer = Trainer(bus, Registry(tmp_path / "reg"), learner, settings, teacher.encoder.to_str())
    async with bus.producer() as p:
        await p.send(bus.topics.requests, b"not json", key=b"k")
        await p.send(bus.topics.soft_labels, b'{"schema_version": 1, "request_id": "r"}', key=b"k")
    await _run_until(trainer, lambda: trainer.stats.dead_letters >= 2, timeout_s=20)
    dlq = bus.records(bus.topics.dead_letters)
    assert len(dlq) == 2
    reasons = [dict(r.headers)["sd-error"].decode() for r in dlq]
    assert reasons[0].startswith("not JSON") and "invalid soft-label" in reasons[1]


@pytest.mark.parametrize("fraction", [0.5])
def test_holdout_is_never_trained(fraction: float) -> None:
    from stream_distill.trainer.join import JoinState

    js = JoinState(holdout_fraction=fraction)
    teacher_labels = ("a", "b")
    for i in range(200):
        rid = f"r{i}"
        js.add_request(
            RequestEvent(
                request_id=rid,
                conversation_id="c",
                turns=({"role": "user", "text": "hi"},),  # type: ignore[arg-type]
                served_intent="a",
                entropy=0.0,
                margin=0.0,
                model_version="v",
                latency_ms=0.0,
            )
        )
        js.add_hard(HardLabel(feedback_id=f"f{i}", request_id=rid, intent="b"))
    trained = {ex.request_id for ex in js.take_ready(1000)}
    held = len(js.holdout)
    assert 60 < held < 140 and len(trained) + held == 200
    assert not any(js.is_holdout(r) for r in trained)
    assert teacher_labels


async def test_gate_holds_back_a_worse_candidate(tmp_path: Path) -> None:
    """A candidate scoring below the serving version on held-out labels is not published."""
    bus = MemoryBus(Topics("g."))
    await bus.ensure_topics()
    teacher = _teacher()
    registry = Registry(tmp_path / "reg")
    settings = _settings(tmp_path, holdout_fraction=0.5, publish_every_steps=10**6)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings
    )
    trainer = Trainer(bus, registry, learner, settings, teacher.encoder.to_str())
    await _feed(bus, teacher, 200)
    await _run_until(trainer, lambda: len(trainer.join.holdout) >= 30)
    serving = registry.latest()
    assert serving is not None
    holdout = list(trainer.join.holdout)
    dialogues, intents = [t for t, _ in holdout], [y for _, y in holdout]
    serving_scores = trainer.publisher._serving_scores(
        eval_set(learner, trainer.join), learner.encoder
    )
    assert serving_scores is not None
    before = serving_scores.accuracy
    # Sabotage the student: every input now maps to the label the held-out set never has.
    rare = min(LABELS, key=intents.count)
    head = learner.model.classifier
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([100.0 if y == rare else 0.0 for y in LABELS]))
    after = learner.accuracy(dialogues, intents)
    assert before is not None and after < before - 0.02  # the precondition of this test
    async with bus.producer() as p:
        accepted = await trainer.publish_now(p)
    assert not accepted and trainer.stats.rejected == 1
    assert registry.latest() == serving  # a bad model never replaces a good one


def test_attention_alignment_reaches_the_student(tmp_path: Path) -> None:
    """Soft labels carrying the teacher's attention add a non-zero, trainable alignment term."""
    from stream_distill.trainer.join import Example
    from stream_distill.trainer.learner import to_torch

    teacher = _teacher()
    settings = _settings(tmp_path, attention_weight=10.0)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    data = [e for e in labelled_examples(40, seed=3) if e.intent in LABELS][:8]
    out = teacher.predict([e.turns for e in data], attention=True)
    examples = [
        Example(
            f"r{i}",
            e.turns,
            SoftLabel(
                request_id=f"r{i}",
                teacher_id="t",
                teacher_version="v",
                labels=LABELS,
                label_set_version="x",
                logits=tuple(float(x) for x in out.logits[i]),
                # a sharp target (most mass on the first word) the student must learn
                attention=tuple(
                    0.9 if j == 1 else 0.1 / (len(out.attention[i]) - 1)
                    for j in range(len(out.attention[i]))
                ),
            ),
            None,
        )
        for i, e in enumerate(data)
    ]

    def gap() -> float:  # measured without dropout
        learner.model.eval()
        batch = learner.encoder.encode([ex.turns for ex in examples])
        with torch.no_grad():
            out = learner.model(**to_torch(batch), output_attentions=True)
        return float(learner._attention_loss(out, batch, examples))

    before = gap()
    assert before > 0.0 and learner.learn_many(examples)["attention"] > 0.0
    for _ in range(30):
        learner.learn_many(examples)
    assert gap() < 0.5 * before  # the student's [CLS] attention moved toward the teacher's
    no_att = [
        Example(ex.request_id, ex.turns, ex.soft.model_copy(update={"attention": None}), None)
        for ex in examples
    ]  # type: ignore[union-attr]
    assert learner.learn_many(no_att)["attention"] == 0.0


@pytest.mark.parametrize("strategy", ["online", "hard_only", "self"])
async def test_strategies_on_the_same_stream(tmp_path: Path, strategy: str) -> None:
    bus = MemoryBus(Topics(f"s{strategy}."))
    await bus.ensure_topics()
    teacher = _teacher()
    settings = _settings(tmp_path, strategy=strategy, publish_every_steps=10**6)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    trainer = Trainer(bus, Registry(tmp_path / "reg"), learner, settings, teacher.encoder.to_str())
    await _feed(bus, teacher, 48)
    await _run_until(trainer, lambda: trainer.stats.steps >= 3)
    js = trainer.join.stats
    last = trainer.stats.last_losses
    if strategy == "online":
        assert js.soft_labels == 48 and last["kd"] > 0.0
    elif strategy == "hard_only":
        # soft labels are validated but never joined: only hard-labelled examples train
        assert js.soft_labels == 0 and last["kd"] == 0.0 and last["ce"] > 0.0
        assert js.hard_labels == 24 and trainer.replay.items
        assert all(ex.hard is not None and ex.soft is None for ex in trainer.replay.items)
    else:
        assert js.soft_labels == 0 and learner.ema is not None and last["kd"] >= 0.0
        # the EMA teacher travels in the checkpoint
        await trainer.checkpoint()
        again = learner_from_teacher(
            teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
        )
        t2 = Trainer(bus, Registry(tmp_path / "reg"), again, settings, teacher.encoder.to_str())
        assert t2.restore() and again.ema is not None
        for a, b in zip(learner.ema.parameters(), again.ema.parameters(), strict=True):
            assert torch.equal(a, b)


def test_online_falls_back_to_the_ema_teacher_without_soft_labels(tmp_path: Path) -> None:
    from stream_distill.trainer.join import Example

    teacher = _teacher()
    settings = _settings(tmp_path, publish_ema=False)  # no EMA until the fallback makes one
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    data = [e for e in labelled_examples(30, seed=4) if e.intent in LABELS][:8]
    examples = [Example(f"r{i}", e.turns, None, None) for i, e in enumerate(data)]
    assert learner.learn_many(examples)["total"] == 0.0  # nothing to learn from
    assert learner.ema is None
    out = learner.learn_many(examples, self_targets=True)
    assert learner.ema is not None and out["kd"] >= 0.0 and out["ce"] == 0.0


async def test_a_new_intent_grows_the_label_space(tmp_path: Path) -> None:
    """A hard label naming an unknown intent extends the head; old rows are untouched."""
    from stream_distill.data.synthetic import PROMO_INTENTS

    bus = MemoryBus(Topics("n."))
    await bus.ensure_topics()
    teacher = _teacher()
    registry = Registry(tmp_path / "reg")
    settings = _settings(tmp_path, publish_every_steps=2)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    old_head = learner.model.classifier.weight.detach().clone()
    trainer = Trainer(bus, registry, learner, settings, teacher.encoder.to_str())
    await _feed(bus, teacher, 24)
    promo = PROMO_INTENTS[0]
    promo_turns = [e for e in labelled_examples(60, seed=8, intents=PROMO_INTENTS)][:8]
    async with bus.producer() as p:
        for i, ex in enumerate(promo_turns):
            rid = f"promo-{i}"
            req = RequestEvent(
                request_id=rid, conversation_id=ex.conversation_id, turns=ex.turns,
                served_intent=LABELS[0], entropy=1.0, margin=0.1, model_version="v1",
                latency_ms=1.0,
            )  # fmt: skip
            await p.send(bus.topics.requests, encode(req), key=b"c")
            hard = HardLabel(feedback_id=f"fp{i}", request_id=rid, intent=ex.intent)
            await p.send(bus.topics.hard_labels, encode(hard), key=b"c")
    await _run_until(trainer, lambda: promo in learner.labels and len(trainer.stats.published) >= 2)
    assert learner.labels[: len(LABELS)] == LABELS and promo in learner.labels
    # the rows of the old labels kept their weights at the moment of growth, then trained on
    assert learner.model.classifier.weight.shape[0] == len(learner.labels)
    assert old_head.shape[0] == len(LABELS)
    latest = registry.load(registry.latest() or "")
    assert promo in latest.labels  # the published model's label list grew; serve reads it
    # KD still applies to rows whose teacher knows only the old labels (masked columns)
    assert trainer.stats.last_losses["kd"] > 0.0 or trainer.stats.last_losses["ce"] > 0.0
    # and a restart rebuilds the grown head from the checkpoint
    await trainer.checkpoint()
    again = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    t2 = Trainer(bus, registry, again, settings, teacher.encoder.to_str())
    assert t2.restore() and again.labels == learner.labels


@pytest.mark.parametrize("factor", [0.0, 1.5])
async def test_idle_replay_learns_from_the_reservoir_within_its_budget(
    tmp_path: Path, factor: float
) -> None:
    bus = MemoryBus(Topics("x."))
    await bus.ensure_topics()
    teacher = _teacher()
    settings = _settings(tmp_path, idle_replay_factor=factor, publish_every_steps=1000)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings
    )
    hooks = RecordingHooks()
    trainer = Trainer(
        bus, Registry(tmp_path / "reg"), learner, settings, teacher.encoder.to_str(), hooks
    )
    await _feed(bus, teacher, 40)
    budget = int(factor * 40) // settings.batch_size * settings.batch_size
    ran_on: list[tuple[int, str, int]] = []  # (batch size, thread name, its niceness)
    learn = learner.learn_many

    def spy(batch: list[Example], **kw: bool) -> dict[str, float]:
        me = threading.current_thread()
        ran_on.append((len(batch), me.name, os.getpriority(os.PRIO_PROCESS, me.native_id or 0)))
        return learn(batch, **kw)

    learner.learn_many = spy  # type: ignore[method-assign]
    await _run_until(trainer, lambda: trainer.fresh_taken == 40 and trainer.idle_replayed >= budget)
    assert trainer.fresh_taken == 40
    replayed = [n for (n,) in hooks.named("on_idle_replay")]
    assert sum(replayed) == trainer.idle_replayed == budget
    if factor:
        assert replayed and all(n == settings.batch_size for n in replayed)
        idle = [(name, nice) for _, name, nice in ran_on if name.startswith("sd-idle-replay")]
        assert len(idle) == len(replayed)  # every replay-only step, and only those, ran there
        base = os.getpriority(os.PRIO_PROCESS, 0)
        if base <= settings.idle_replay_nice:  # raising niceness needs no privilege
            assert {nice for _, nice in idle} == {settings.idle_replay_nice}
    else:
        assert not any(name.startswith("sd-idle-replay") for _, name, _ in ran_on)
    # the budget is spent: the trainer goes quiet until fresh examples arrive
    steps = trainer.learner.steps
    await _run_until(trainer, lambda: False, timeout_s=1.0)
    assert trainer.learner.steps == steps and trainer.idle_replayed == budget
    fresh = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings
    )
    again = Trainer(bus, Registry(tmp_path / "reg"), fresh, settings, teacher.encoder.to_str())
    assert again.restore() and (again.fresh_taken, again.idle_replayed) == (40, budget)


def test_precision_setting_resolves_and_bfloat16_steps_learn_like_float32(
    tmp_path: Path,
) -> None:
    from stream_distill.models.precision import (
        BF16_MIN_ROWS,
        native_bfloat16,
        use_bfloat16,
        use_bfloat16_for,
    )
    from stream_distill.trainer.join import Example

    assert use_bfloat16("bfloat16") and not use_bfloat16("float32")
    assert use_bfloat16("auto") == native_bfloat16()
    # inference: auto keeps a small batch in float32; an explicit choice is kept as given
    assert not use_bfloat16_for("auto", BF16_MIN_ROWS - 1)
    assert use_bfloat16_for("auto", BF16_MIN_ROWS) == native_bfloat16()
    assert use_bfloat16_for("bfloat16", 1) and not use_bfloat16_for("float32", 64)
    teacher = _teacher()
    rows = [e for e in labelled_examples(60, seed=3) if e.intent in LABELS][:16]
    batch = [Example(f"r{i}", e.turns, None, e.intent) for i, e in enumerate(rows)]
    curves = {}
    for precision in ("float32", "bfloat16"):
        settings = _settings(tmp_path, precision=precision, alpha=0.0, lr=3e-3)
        learner = learner_from_teacher(
            teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings
        )
        assert learner.bf16 == (precision == "bfloat16")
        torch.manual_seed(0)  # the same dropout masks for both
        curves[precision] = [learner.learn_many(batch)["ce"] for _ in range(16)]
        assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert all(np.isfinite(bf16)) and bf16[-1] < bf16[0] - 0.1
    assert abs(bf16[-1] - fp32[-1]) < 0.05


def test_publish_ema_exports_the_average_of_the_weights(tmp_path: Path) -> None:
    from stream_distill.models.export import onnx_logits
    from stream_distill.trainer.join import Example, JoinState
    from stream_distill.trainer.learner import to_torch
    from stream_distill.trainer.publish import Publisher

    teacher = _teacher()
    settings = _settings(tmp_path, publish_ema=True, ema_decay=0.5, alpha=0.0, lr=3e-3)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings
    )
    rows = [e for e in labelled_examples(60, seed=5) if e.intent in LABELS][:16]
    for _ in range(4):
        learner.learn_many([Example(f"r{i}", e.turns, None, e.intent) for i, e in enumerate(rows)])
    assert learner.candidate_model() is learner.ema
    publisher = Publisher(
        Registry(tmp_path / "reg"), Topics("x."), teacher.encoder.to_str(), settings
    )
    cand = publisher.evaluate(learner, JoinState(window=100, holdout_fraction=0.0))
    batch = learner.encoder.encode([e.turns for e in rows])
    got = onnx_logits(cand.onnx, [batch])
    with torch.inference_mode():
        ema = learner.ema(**to_torch(batch)).logits.numpy()
        learner.model.eval()
        raw = learner.model(**to_torch(batch)).logits.numpy()
    assert np.abs(got - ema).max() <= 1e-4
    assert np.abs(got - raw).max() > 1e-3  # the latest weights are not what was exported


def test_a_hard_label_no_teacher_knows_is_learnt_at_full_weight(tmp_path: Path) -> None:
    from stream_distill.trainer.join import Example

    teacher = _teacher()
    rows = [e for e in labelled_examples(80, seed=6) if e.intent in LABELS][:16]
    logits = teacher.predict([e.turns for e in rows], attention=False).logits
    new = "promo_signup"
    batch = []
    for i, (e, row) in enumerate(zip(rows, logits, strict=True)):
        soft = _soft(teacher, f"r{i}", row)  # the teacher does not know the new intent
        batch.append(Example(f"r{i}", e.turns, soft, new if i % 2 == 0 else e.intent))
    p_new = {}
    for weight in (0.0, 1.0):
        settings = _settings(tmp_path, novel_label_weight=weight, alpha=0.9, lr=3e-3)
        learner = learner_from_teacher(
            teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings
        )
        learner.add_labels([new])
        assert learner._novel(batch[0]) and not learner._novel(batch[1])
        torch.manual_seed(0)
        for _ in range(8):
            learner.learn_many(batch)
        probs = learner.predict_many([ex.turns for ex in batch[::2]])
        p_new[weight] = float(probs[:, learner.labels.index(new)].mean())
    assert p_new[1.0] > p_new[0.0] + 0.05, p_new


async def test_new_intents_are_rehearsed_in_the_training_batches(tmp_path: Path) -> None:
    teacher = _teacher()
    settings = _settings(tmp_path, batch_size=8, replay_ratio=0.5, new_class_replay_share=0.5)
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0,)), settings
    )
    trainer = Trainer(MemoryBus(Topics("q.")), Registry(tmp_path / "reg"), learner, settings, "{}")
    turns = (Turn(role="user", text="hello"),)
    for i in range(400):  # a reservoir of old intents
        trainer.replay.add(Example(f"o{i}", turns, None, LABELS[i % len(LABELS)]))
    trainer._grow(["promo_signup"], "hard label")
    batches: list[list[str]] = []

    async def capture(batch: list[Example], *args: object) -> None:
        batches.append([ex.request_id for ex in batch])

    trainer._learn = capture  # type: ignore[method-assign,assignment]

    def labelled(rid: str, intent: str) -> None:
        trainer.join.add_request(
            RequestEvent(
                request_id=rid,
                conversation_id="c",
                turns=turns,
                served_intent=LABELS[0],
                entropy=0.0,
                margin=0.0,
                model_version="v",
                latency_ms=0.0,
            )
        )
        trainer.join.add_hard(HardLabel(feedback_id=f"f-{rid}", request_id=rid, intent=intent))

    for i in range(MAX_REPEAT):  # enough examples of the new intent to rehearse
        labelled(f"new{i}", "promo_signup")
    while trainer.join.ready_count:
        await trainer._step()
    first = len(batches)
    for i in range(6):  # then fresh examples of old intents only
        labelled(f"fresh{i}", LABELS[0])
        await trainer._step()
    # every later batch rehearses the new intent (8 of 408: one batch in eight otherwise)
    later = batches[first:]
    assert all(any(rid.startswith("new") for rid in b) for b in later)
    assert all(len(b) == 8 for b in batches) and trainer.rehearsal.drawn >= 6


def test_a_confirmed_answer_the_teacher_ranks_lower_can_outweigh_it(tmp_path: Path) -> None:
    from stream_distill.trainer.join import Example

    teacher = _teacher()
    rows = [e for e in labelled_examples(80, seed=7) if e.intent in LABELS][:16]
    logits = teacher.predict([e.turns for e in rows], attention=False).logits
    batch = []
    for i, (e, row) in enumerate(zip(rows, logits, strict=True)):
        soft = _soft(teacher, f"r{i}", row)
        # users confirmed, on every other turn, an intent the teacher does not rank first
        top = LABELS[int(np.argmax(row))]
        hard = next(x for x in LABELS if x != top) if i % 2 == 0 else None
        batch.append(Example(f"r{i}", e.turns, soft, hard))
    p_hard = {}
    for weight in (0.0, 2.0):
        settings = _settings(tmp_path, overruled_label_weight=weight, alpha=0.9, lr=3e-3)
        learner = learner_from_teacher(
            teacher, ModelSettings(max_length=32, student_layers=(0, 1)), settings
        )
        assert learner._overruled(batch[0]) and not learner._overruled(batch[1])
        torch.manual_seed(0)
        for _ in range(8):
            learner.learn_many(batch)
        probs = learner.predict_many([ex.turns for ex in batch[::2]])
        wanted = [learner.labels.index(ex.hard) for ex in batch[::2] if ex.hard]
        p_hard[weight] = float(np.mean([probs[k, j] for k, j in enumerate(wanted)]))
    assert p_hard[2.0] > p_hard[0.0] + 0.05, p_hard
