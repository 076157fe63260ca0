from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from stream_distill.bus import codec
from stream_distill.bus.base import TopicPartition
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import TeacherSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import RequestEvent, SoftLabel, Turn
from stream_distill.metrics.hooks import Hooks
from stream_distill.models.factory import default_tokenizer_json, set_threads, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.teacher import scorer as scorer_module
from stream_distill.teacher.bootstrap import bootstrap_teacher
from stream_distill.teacher.model import TeacherModel, TeacherOutput, label_set_version
from stream_distill.teacher.scorer import TeacherScorer

set_threads(1)

LABELS = tuple(sorted(INTENTS[:6]))


def _teacher(seed: int = 0) -> TeacherModel:
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=32)
    return TeacherModel(tiny_classifier(LABELS, layers=2, seed=seed), encoder)


def _dialogues(n: int, seed: int = 1) -> list[tuple[Turn, ...]]:
    return [e.turns for e in labelled_examples(n, seed=seed)]


# -- TeacherModel ------------------------------------------------------------------------------


def test_predict_shapes_and_attention() -> None:
    teacher = _teacher()
    dialogues = _dialogues(70)  # more than one internal chunk
    out = teacher.predict(dialogues)
    assert out.logits.shape == (70, len(LABELS))
    assert out.logits.dtype == np.float32
    assert np.isfinite(out.logits).all()
    assert len(out.attention) == 70
    for dialogue, weights in zip(dialogues, out.attention, strict=True):
        real = int(teacher.encoder.encode([dialogue]).attention_mask.sum())
        assert len(weights) == real
        assert math.isclose(sum(weights), 1.0, abs_tol=1e-4)
        assert min(weights) >= 0.0
    # batching and padding do not change a dialogue's scores
    alone = teacher.predict(dialogues[3:4]).logits[0]
    assert np.allclose(alone, out.logits[3], atol=1e-5)
    bare = teacher.predict(dialogues[:5], attention=False)
    assert bare.attention == []
    assert np.allclose(bare.logits, out.logits[:5], atol=1e-6)


def test_identity_attributes() -> None:
    a, b, c = _teacher(seed=0), _teacher(seed=0), _teacher(seed=1)
    assert a.labels == LABELS
    assert a.max_length == 32
    assert a.version.startswith("t-") and len(a.version) == 14
    assert a.version == b.version != c.version
    assert a.label_set_version == label_set_version(LABELS) != label_set_version(LABELS[::-1])
    assert len(a.label_set_version) == 12
    assert a.predict_labels(_dialogues(3))[0] in LABELS


def test_save_load_round_trip(tmp_path: Path) -> None:
    teacher = _teacher()
    teacher.metrics["holdout_accuracy"] = 0.5
    target = teacher.save(tmp_path / "teacher")
    meta = json.loads((target / "teacher.json").read_text())
    assert meta["version"] == teacher.version
    assert meta["labels"] == list(LABELS)
    assert meta["max_length"] == 32
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    loaded = TeacherModel.load(target, teacher_id="t2")
    assert loaded.teacher_id == "t2"
    assert (loaded.version, loaded.labels, loaded.max_length) == (teacher.version, LABELS, 32)
    assert loaded.metrics == {"holdout_accuracy": 0.5}
    dialogues = _dialogues(10)
    assert np.allclose(loaded.predict(dialogues).logits, teacher.predict(dialogues).logits)
    # saving over an existing teacher replaces it whole and leaves no temp dirs behind
    _teacher(seed=3).save(target)
    assert TeacherModel.load(target).version == _teacher(seed=3).version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]
    with pytest.raises(FileNotFoundError):
        TeacherModel.load(tmp_path / "nothing")


# -- bootstrap ---------------------------------------------------------------------------------


def _tiny_factory(labels: Sequence[str]) -> PreTrainedModel:
    return tiny_classifier(labels, layers=2, hidden=64, heads=4)


def test_bootstrap_learns_and_caches(tmp_path: Path) -> None:
    examples = [(e.turns, e.intent) for e in labelled_examples(400, seed=3, intents=LABELS)]
    out = tmp_path / "teacher"
    calls: list[tuple[int, int]] = []

    def boot(epochs: int) -> TeacherModel:
        return bootstrap_teacher(
            examples,
            out,
            max_length=32,
            epochs=epochs,
            lr=2e-3,
            batch_size=16,
            model_factory=_tiny_factory,
            progress=lambda done, total: calls.append((done, total)),
        )

    first = boot(epochs=6)
    assert first.labels == tuple(sorted({label for _, label in examples}))
    assert calls and calls[-1][0] == calls[-1][1] == 6 * math.ceil(360 / 16)
    # six intents: chance is about 1/6
    assert first.metrics["holdout_accuracy"] > 0.5
    assert first.metrics["holdout_examples"] == 40
    assert json.loads((out / "teacher.json").read_text())["metrics"] == first.metrics

    calls.clear()
    again = boot(epochs=6)
    assert calls == []  # loaded, not retrained
    assert again.version == first.version
    assert again.metrics == first.metrics

    other = boot(epochs=1)  # other settings: trained afresh, over the old one
    assert calls and other.version != first.version
    assert TeacherModel.load(out).version == other.version


# -- scorer ------------------------------------------------------------------------------------


class Recorder(Hooks):
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.dead: list[tuple[str, str]] = []

    def on_teacher_batch(self, size: int, seconds: float) -> None:
        self.batches.append(size)

    def on_dead_letter(self, topic: str, reason: str) -> None:
        self.dead.append((topic, reason))


def _request(i: int, turns: tuple[Turn, ...]) -> RequestEvent:
    return RequestEvent(
        request_id=f"r{i}",
        conversation_id=f"c{i % 5}",
        turns=turns,
        served_intent=LABELS[0],
        entropy=0.5,
        margin=0.1,
        model_version="v1",
        latency_ms=3.0,
    )


async def _publish(bus: MemoryBus, events: Sequence[RequestEvent]) -> None:
    async with bus.producer() as p:
        for e in events:
            await p.send(bus.topics.requests, codec.encode(e), key=e.conversation_id.encode())


async def _run_until(
    scorer: TeacherScorer, bus: MemoryBus, n_labels: int, timeout_s: float = 10.0
) -> None:
    """Run the scorer until ``n_labels`` soft labels exist (or ``timeout_s`` passed)."""
    stop = asyncio.Event()
    task = asyncio.create_task(scorer.run(stop))
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    try:
        while loop.time() < end and not task.done():
            if len(bus.records(bus.topics.soft_labels)) >= n_labels:
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _settings(**kw: object) -> TeacherSettings:
    return TeacherSettings.model_validate(
        # float32: labels are compared with the teacher's own predictions to 1e-5
        {"batch_size": 4, "batch_wait_ms": 5, "group_id": "g", "precision": "float32", **kw}
    )


async def test_scorer_labels_every_request_and_parks_poison() -> None:
    bus = MemoryBus()
    await bus.ensure_topics()
    teacher = _teacher()
    dialogues = _dialogues(10)
    events = [_request(i, d) for i, d in enumerate(dialogues)]
    await _publish(bus, events[:5])
    async with bus.producer() as p:
        await p.send(bus.topics.requests, b"not json", key=b"c0")
        await p.send(bus.topics.requests, b'{"schema_version": 1, "request_id": "x"}', key=b"c1")
    await _publish(bus, events[5:])
    hooks = Recorder()
    scorer = TeacherScorer(bus, teacher, _settings(), hooks)
    await _run_until(scorer, bus, 10)

    soft = bus.records(bus.topics.soft_labels)
    assert len(soft) == 10 and scorer.scored == 10
    by_id = {codec.decode(SoftLabel, r.value).request_id: r for r in soft}
    assert set(by_id) == {e.request_id for e in events}
    expected = teacher.predict(dialogues)
    for i, event in enumerate(events):
        record = by_id[event.request_id]
        label = codec.decode(SoftLabel, record.value)
        assert record.key == event.conversation_id.encode()
        assert dict(record.headers)["sd-kind"] == b"soft-label"
        assert label.labels == LABELS and label.teacher_id == "teacher"
        assert label.teacher_version == teacher.version
        assert label.label_set_version == teacher.label_set_version
        assert np.allclose(label.logits, expected.logits[i], atol=1e-5)
        assert label.attention is not None
        assert np.allclose(label.attention, expected.attention[i], atol=1e-4)

    dead = bus.records(bus.topics.dead_letters)
    assert sorted(r.value for r in dead) == sorted(
        [b"not json", b'{"schema_version": 1, "request_id": "x"}']
    )
    for r in dead:
        headers = dict(r.headers)
        assert headers["sd-original-topic"] == bus.topics.requests.encode()
        assert headers["sd-error"]
    assert hooks.dead == [(bus.topics.requests, "poison")] * 2
    assert sum(hooks.batches) == 10 and max(hooks.batches) <= 4

    # everything was committed: a new member of the group finds nothing to do
    committed = bus.log.committed["g"]
    for tp_index, part in enumerate(bus.log.ensure(bus.topics.requests)):
        tp = TopicPartition(bus.topics.requests, tp_index)
        assert committed.get(tp, 0) == len(part)
    await _run_until(TeacherScorer(bus, teacher, _settings()), bus, 11, timeout_s=0.5)
    assert len(bus.records(bus.topics.soft_labels)) == 10


async def test_scorer_without_attention_and_own_id() -> None:
    bus = MemoryBus()
    await bus.ensure_topics()
    await _publish(bus, [_request(i, d) for i, d in enumerate(_dialogues(3))])
    settings = _settings(emit_attention=False, teacher_id="big")
    await _run_until(TeacherScorer(bus, _teacher(), settings), bus, 3)
    labels = [codec.decode(SoftLabel, r.value) for r in bus.records(bus.topics.soft_labels)]
    assert len(labels) == 3
    assert all(lb.attention is None and lb.teacher_id == "big" for lb in labels)


async def test_scorer_retries_publish_and_commits_after(monkeypatch: pytest.MonkeyPatch) -> None:
    bus = MemoryBus()
    await bus.ensure_topics()
    await _publish(bus, [_request(i, d) for i, d in enumerate(_dialogues(3))])
    monkeypatch.setattr(scorer_module, "RETRY_S", 0.01)
    real_send = scorer_module.TeacherScorer._send
    failures = Counter[str]()

    async def flaky(
        self: TeacherScorer, producer: object, event: RequestEvent, label: SoftLabel
    ) -> None:
        if failures[event.request_id] < 2:
            failures[event.request_id] += 1
            raise ConnectionError("broker away")
        await real_send(self, producer, event, label)  # type: ignore[arg-type]

    monkeypatch.setattr(scorer_module.TeacherScorer, "_send", flaky)
    await _run_until(TeacherScorer(bus, _teacher(), _settings()), bus, 3)
    ids = sorted(
        codec.decode(SoftLabel, r.value).request_id for r in bus.records(bus.topics.soft_labels)
    )
    assert set(ids) == {"r0", "r1", "r2"}  # at least once; retries may duplicate a few
    assert failures == {"r0": 2, "r1": 2, "r2": 2}
    assert sum(bus.log.committed["g"].values()) == 3


async def test_scorer_parks_requests_the_model_cannot_score() -> None:
    bus = MemoryBus()
    await bus.ensure_topics()
    dialogues = _dialogues(4)
    await _publish(bus, [_request(i, d) for i, d in enumerate(dialogues)])
    teacher = _teacher()
    real_predict = teacher.predict
    bad = dialogues[2]

    def predict(batch: Sequence[Sequence[Turn]], *, attention: bool = True) -> TeacherOutput:
        if any(tuple(d) == bad for d in batch):
            raise RuntimeError("cannot score this one")
        return real_predict(batch, attention=attention)

    teacher.predict = predict  # type: ignore[method-assign,assignment]
    hooks = Recorder()
    await _run_until(TeacherScorer(bus, teacher, _settings(), hooks), bus, 3)
    ids = {codec.decode(SoftLabel, r.value).request_id for r in bus.records(bus.topics.soft_labels)}
    assert ids == {"r0", "r1", "r3"}
    dead = bus.records(bus.topics.dead_letters)
    assert [codec.decode(RequestEvent, r.value).request_id for r in dead] == ["r2"]
    assert hooks.dead == [(bus.topics.requests, "scoring_failed")]
