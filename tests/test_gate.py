"""The promotion gate: held-out accuracy AND teacher agreement, and the int8 export check."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from tokenizers import Tokenizer

from stream_distill.bus.base import Topics
from stream_distill.bus.codec import decode
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import ModelSettings, ServeSettings, TrainerSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import HardLabel, ModelPublished, RequestEvent, SoftLabel
from stream_distill.models.export import compare_onnx, export_onnx, quantize_int8
from stream_distill.models.factory import default_tokenizer_json, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.registry.store import Registry
from stream_distill.serving.session import StudentSession
from stream_distill.teacher.model import TeacherModel
from stream_distill.trainer.build import learner_from_teacher
from stream_distill.trainer.join import JoinState
from stream_distill.trainer.learner import Learner
from stream_distill.trainer.publish import Publisher

torch.set_num_threads(1)
LABELS = INTENTS[:6]


def _teacher() -> TeacherModel:
    enc = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), 32)
    torch.manual_seed(0)
    return TeacherModel(tiny_classifier(LABELS, layers=2, hidden=32, heads=2, intermediate=64), enc)


def _settings(tmp_path: Path, **kw: object) -> TrainerSettings:
    # The gate is tested on weights set by hand: offer those, not an average of them.
    base = {"checkpoint_dir": tmp_path / "ckpt", "publish_ema": False}
    return TrainerSettings.model_validate({**base, **kw})


def _world(tmp_path: Path, rare_hard: bool = False, n: int = 80) -> tuple[
    TeacherModel, Learner, JoinState, str
]:  # fmt: skip
    """A student identical to the teacher and a join whose requests are all held out.

    Every request carries the teacher's soft label. Its hard label is the true intent,
    or with ``rare_hard`` always the intent the teacher picks least (returned), so that
    accuracy and agreement can be pulled apart.
    """
    teacher = _teacher()
    learner = learner_from_teacher(
        teacher, ModelSettings(max_length=32, student_layers=(0, 1)), _settings(tmp_path)
    )
    join = JoinState(holdout_fraction=0.999)
    data = labelled_examples(n, seed=5)
    out = teacher.predict([e.turns for e in data], attention=False)
    counts = Counter(LABELS[int(i)] for i in out.logits.argmax(axis=1))
    rare = min(LABELS, key=lambda y: counts[y])
    assert counts[rare] < 0.4 * n
    for i, (ex, logits) in enumerate(zip(data, out.logits, strict=True)):
        rid = f"r{i}"
        assert join.is_holdout(rid)
        join.add_request(
            RequestEvent(
                request_id=rid, conversation_id="c", turns=ex.turns, served_intent=LABELS[0],
                entropy=0.0, margin=0.0, model_version="v0", latency_ms=0.0,
            )
        )  # fmt: skip
        join.add_soft(
            SoftLabel(
                request_id=rid, teacher_id="t", teacher_version="1", labels=LABELS,
                label_set_version="x", logits=tuple(float(x) for x in logits),
            )
        )  # fmt: skip
        intent = rare if rare_hard else (ex.intent if ex.intent in LABELS else LABELS[0])
        join.add_hard(HardLabel(feedback_id=f"f{i}", request_id=rid, intent=intent))
    return teacher, learner, join, rare


def _constant(learner: Learner, label: str) -> Learner:
    """A copy of ``learner`` that answers ``label`` to everything."""
    model = copy.deepcopy(learner.model)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([50.0 if y == label else 0.0 for y in LABELS]))
    return Learner(model, learner.encoder, learner.labels, learner.settings)


def _serve(publisher: Publisher, learner: Learner, tokenizer_json: str) -> None:
    mv = publisher.registry.publish(
        export_onnx(learner.model, 32), learner.labels, tokenizer_json, max_length=32
    )
    publisher.published_version = mv.version


def test_an_equal_candidate_passes_and_the_figures_are_recorded(tmp_path: Path) -> None:
    teacher, learner, join, _ = _world(tmp_path)
    bus = MemoryBus(Topics("e."))
    publisher = Publisher(
        Registry(tmp_path / "reg"), bus.topics, teacher.encoder.to_str(), learner.settings
    )
    _serve(publisher, learner, teacher.encoder.to_str())
    cand = publisher.evaluate(learner, join)
    assert cand.accepted, cand.reason
    m = cand.manifest
    assert m["agreement_slice"] == "holdout" and m["agreement_examples"] == 80
    assert m["teacher_agreement"] == 1.0 == m["serving_teacher_agreement"]  # a copy of it
    assert m["holdout_accuracy"] == m["serving_holdout_accuracy"] is not None
    assert cand.metrics.teacher_agreement == 1.0


async def test_gate_rejects_a_candidate_worse_on_teacher_agreement(tmp_path: Path) -> None:
    # Every held-out hard label is the intent the teacher picks least: a student that
    # always answers it wins on accuracy but has left the teacher.
    teacher, learner, join, rare = _world(tmp_path, rare_hard=True)
    bus = MemoryBus(Topics("a."))
    await bus.ensure_topics()
    publisher = Publisher(
        Registry(tmp_path / "reg"), bus.topics, teacher.encoder.to_str(), learner.settings
    )
    _serve(publisher, learner, teacher.encoder.to_str())
    worse = _constant(learner, rare)
    cand = publisher.evaluate(worse, join)
    m = cand.manifest
    assert m["holdout_accuracy"] == 1.0 >= m["serving_holdout_accuracy"]  # not the reason
    assert m["teacher_agreement"] < m["serving_teacher_agreement"] - 0.02
    assert not cand.accepted and cand.reason.startswith("teacher agreement")
    # the same candidate with a margin wide enough passes, and the figures travel
    loose = Publisher(
        publisher.registry,
        bus.topics,
        teacher.encoder.to_str(),
        learner.settings.model_copy(update={"agreement_margin": 1.0}),
    )
    loose.published_version = publisher.published_version
    cand = loose.evaluate(worse, join)
    assert cand.accepted, cand.reason
    async with bus.producer() as p:
        mv = await loose.publish(p, worse, cand)
    event = decode(ModelPublished, bus.records(bus.topics.models)[-1].value)
    assert event.metrics.teacher_agreement == cand.metrics.teacher_agreement < 0.5
    manifest = loose.registry.read_manifest(mv.version)
    assert manifest["metrics"]["serving_teacher_agreement"] == 1.0
    assert manifest["metrics"]["teacher_agreement"] == event.metrics.teacher_agreement


def test_gate_rejects_a_candidate_worse_on_held_out_accuracy(tmp_path: Path) -> None:
    # Serving answers the (constant) hard label; the candidate follows the teacher, which
    # agrees better but is wrong on the held-out labels.
    teacher, learner, join, rare = _world(tmp_path, rare_hard=True)
    publisher = Publisher(
        Registry(tmp_path / "reg"), Topics("b."), teacher.encoder.to_str(), learner.settings
    )
    _serve(publisher, _constant(learner, rare), teacher.encoder.to_str())
    cand = publisher.evaluate(learner, join)
    m = cand.manifest
    assert m["teacher_agreement"] == 1.0 > m["serving_teacher_agreement"]  # not the reason
    assert m["holdout_accuracy"] < m["serving_holdout_accuracy"] - 0.02
    assert not cand.accepted and cand.reason.startswith("held-out accuracy")


def _op_types(model: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_from_string(model).graph.node}


async def test_int8_version_is_checked_published_and_served(tmp_path: Path) -> None:
    teacher, learner, join, _ = _world(tmp_path)
    settings = learner.settings.model_copy(update={"quantize": "int8"})
    learner.settings = settings
    bus = MemoryBus(Topics("q."))
    await bus.ensure_topics()
    publisher = Publisher(
        Registry(tmp_path / "reg"), bus.topics, teacher.encoder.to_str(), settings
    )
    cand = publisher.evaluate(learner, join)
    assert cand.accepted, cand.reason
    assert "MatMulInteger" in _op_types(cand.onnx)  # the int8 graph is what gets published
    assert cand.manifest["quantize"] == "int8"
    assert cand.manifest["int8_agreement"] >= 0.99
    assert 0.0 <= cand.manifest["int8_max_prob_diff"] < 0.05
    async with bus.producer() as p:
        mv = await publisher.publish(p, learner, cand)
    # serve loads the int8 version unchanged and answers like the fp32 student
    session = StudentSession.from_version(publisher.registry.load(mv.version), ServeSettings())
    session.verify()
    dialogues = [turns for turns, _ in join.holdout]
    probs = session.predict(dialogues)
    expected = learner.predict_many(dialogues)
    assert np.mean(probs.argmax(axis=1) == expected.argmax(axis=1)) >= 0.99
    assert float(np.abs(probs - expected).max()) < 0.05


def test_int8_is_held_back_when_it_changes_decisions(tmp_path: Path) -> None:
    """A head deciding on differences finer than int8 activations resolve loses them."""
    teacher, learner, join, _ = _world(tmp_path)
    dialogues = [turns for turns, _ in join.holdout]
    model = learner.model
    model.eval()
    feed = learner.encoder.encode(dialogues)
    with torch.no_grad():
        pooled = model.bert(
            **{k: torch.from_numpy(v) for k, v in feed.as_feed().items()}
        ).pooler_output
        d = int(pooled.std(dim=0).argmax())
        middle = float(pooled[:, d].median())
        model.classifier.weight.zero_()
        model.classifier.weight[0, d], model.classifier.weight[1, d] = 1.0, -1.0
        model.classifier.bias.zero_()
        model.classifier.bias[0], model.classifier.bias[1] = -middle, middle
    fp32 = export_onnx(model, 32)
    batches = [learner.encoder.encode(dialogues)]
    agreement, _ = compare_onnx(fp32, quantize_int8(fp32), batches)
    assert agreement < 0.99  # the precondition: int8 flips some decisions of this head
    settings = learner.settings.model_copy(update={"quantize": "int8"})
    publisher = Publisher(
        Registry(tmp_path / "reg"), Topics("z."), teacher.encoder.to_str(), settings
    )
    cand = publisher.evaluate(learner, join)
    assert not cand.accepted and cand.reason.startswith("int8 agrees with fp32")
    assert cand.manifest["int8_agreement"] < 0.99
    # a lower bar (configurable) lets the same candidate through
    low = settings.model_copy(update={"int8_min_agreement": 0.0})
    cand = Publisher(publisher.registry, Topics("z."), teacher.encoder.to_str(), low).evaluate(
        learner, join
    )
    assert cand.accepted, cand.reason
