"""Micro-batching: concurrent requests share model runs, with answers as if run alone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from stream_distill.config import ServeSettings
from stream_distill.errors import NotReady
from stream_distill.events import Turn
from stream_distill.registry.store import ModelVersion, Registry
from stream_distill.serving import session as session_module
from stream_distill.serving.service import ServingCore
from stream_distill.serving.session import (
    FloatArray,
    StudentSession,
    length_runs,
    session_options,
)
from stream_distill.testing import (
    RecordingHooks,
    eventually,
    minilm_tokenizer_json,
    publish_bow,
    serve_for_test,
)

LABELS = ("order_status", "refund", "cancel_order", "greeting")
# Lengths differ a lot, so every batch pads most of its rows.
TEXTS = [
    "hi",
    "where is my order",
    "i want my money back for the blender that arrived broken last week",
    "cancel it",
    "the parcel says delivered but nothing is at my door and the neighbours have not seen it",
    "refund",
    "hello there, can you help me with something about an order i placed on monday",
    "?",
]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def one_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch as one model run padded to its longest row (no grouping by length)."""
    monkeypatch.setattr(session_module, "PAD_SLACK", 1e9)


def dialogues(texts: Sequence[str]) -> list[list[Turn]]:
    return [[Turn(role="user", text=t)] for t in texts]


def one_by_one(session: StudentSession, texts: Sequence[str]) -> FloatArray:
    return np.concatenate([session.predict(d) for d in (dialogues([t]) for t in texts)])


def instrument(
    session: StudentSession, delay_s: float, seen: list[tuple[int, str]] | None = None
) -> None:
    """Make every model run take ``delay_s`` longer and record (rows, thread name)."""
    real: Callable[[Sequence[Sequence[Turn]]], FloatArray] = session.predict

    def predict(batch: Sequence[Sequence[Turn]]) -> FloatArray:
        if seen is not None:
            seen.append((len(batch), threading.current_thread().name))
        time.sleep(delay_s)
        return real(batch)

    session.predict = predict  # type: ignore[method-assign]


def test_padding_leaves_bow_probabilities_unchanged(registry: Registry, one_run: None) -> None:
    session = StudentSession.from_version(publish_bow(registry, LABELS, seed=3), ServeSettings())
    batched = session.predict(dialogues(TEXTS))
    assert np.abs(batched - one_by_one(session, TEXTS)).max() <= 1e-5


@pytest.mark.slow
def test_padding_leaves_bert_probabilities_unchanged(registry: Registry, one_run: None) -> None:
    """A real exported BERT (attention mask, position ids, pooler) is padding-invariant too."""
    torch = pytest.importorskip("torch")
    from stream_distill.models.export import export_onnx
    from stream_distill.models.factory import tiny_classifier

    model = tiny_classifier(LABELS, layers=2, hidden=32, heads=2, seed=4)
    with torch.no_grad():  # a confident head, so probabilities are far from uniform
        model.classifier.weight.mul_(40.0)
    onnx = export_onnx(model, 48)
    mv: ModelVersion = registry.publish(onnx, LABELS, minilm_tokenizer_json(), max_length=48)
    session = StudentSession.from_version(mv, ServeSettings())
    session.verify()
    batched = session.predict(dialogues(TEXTS))
    alone = one_by_one(session, TEXTS)
    assert np.abs(batched - alone).max() <= 1e-5
    # rows differ well beyond the tolerance, so a padding leak would show
    assert np.ptp(alone, axis=0).max() > 1e-3


async def test_concurrent_requests_form_batches_with_unbatched_answers(
    registry: Registry, one_run: None
) -> None:
    mv = publish_bow(registry, LABELS, seed=3)
    reference = one_by_one(StudentSession.from_version(mv, ServeSettings()), TEXTS)
    hooks = RecordingHooks()
    seen: list[tuple[int, str]] = []
    async with serve_for_test(registry, hooks=hooks, batch_max_size=8, top_k=4) as (serve, c):
        assert await serve.core.wait_ready(10)
        assert serve.core.session is not None
        instrument(serve.core.session, 0.02, seen)
        texts = TEXTS * 4
        replies = await asyncio.gather(
            *(c.post("/v1/classify", json={"text": t, "deadline_ms": 10_000}) for t in texts)
        )
    sizes = [size for (size,) in hooks.named("on_batch")]
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert sum(sizes) == len(texts) and max(sizes) > 1 and max(sizes) <= 8
    assert sorted(s for s, _ in seen) == sorted(sizes)
    # tokenisation and inference ran on the batch worker, never on the event loop
    assert {name.split("_")[0] for _, name in seen} == {"sd-batch"}
    for text, r in zip(texts, replies, strict=True):
        want = reference[TEXTS.index(text)]
        got = {t["intent"]: t["p"] for t in r.json()["top"]}
        assert got == pytest.approx(
            {lb: float(p) for lb, p in zip(LABELS, want, strict=True)}, abs=1e-5
        )


async def test_max_wait_gathers_requests_that_arrive_apart(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=3)
    hooks = RecordingHooks()
    settings = ServeSettings(batch_max_wait_us=300_000, batch_max_size=3, deadline_ms=5000)
    core = ServingCore(registry, settings, hooks, poll_interval_s=60)
    await core.start()
    try:
        assert await core.wait_ready(10)
        t0 = time.perf_counter()
        first = asyncio.create_task(core.classify(dialogues(["hi"])[0]))
        await asyncio.sleep(0.03)
        second = asyncio.create_task(core.classify(dialogues(["where is my order"])[0]))
        await asyncio.sleep(0.03)
        third = asyncio.create_task(core.classify(dialogues(["refund"])[0]))
        results = await asyncio.gather(first, second, third)
        took = time.perf_counter() - t0
    finally:
        await core.aclose()
    assert [s for (s,) in hooks.named("on_batch")] == [3]
    assert {r.model_version for r in results} == {"v1"}
    assert took < 0.25  # a full batch runs at once, without waiting out the 300 ms


async def test_one_bad_input_fails_only_its_own_request(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=3)
    core = ServingCore(registry, ServeSettings(deadline_ms=5000), poll_interval_s=60)
    await core.start()
    try:
        assert await core.wait_ready(10)
        assert core.session is not None
        real = core.session.predict

        def predict(batch: Sequence[Sequence[Turn]]) -> FloatArray:
            time.sleep(0.02)  # lets the requests below queue up into one batch
            if any(d[-1].text == "boom" for d in batch):
                raise ValueError("cannot encode boom")
            return real(batch)

        core.session.predict = predict  # type: ignore[method-assign]
        texts = ["hi", "refund", "boom", "cancel it", "where is my order"]
        out = await asyncio.gather(
            *(core.classify(d) for d in dialogues(texts)), return_exceptions=True
        )
    finally:
        await core.aclose()
    assert [type(o).__name__ for o in out].count("ValueError") == 1
    assert isinstance(out[2], ValueError)
    assert all(not isinstance(o, BaseException) for i, o in enumerate(out) if i != 2)


@pytest.mark.parametrize(
    ("level", "spinning", "want_level", "want_spin"),
    [
        ("all", False, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "0"),
        ("basic", True, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "1"),
        ("disable", False, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "0"),
    ],
)
def test_session_options_follow_settings(
    registry: Registry,
    level: str,
    spinning: bool,
    want_level: ort.GraphOptimizationLevel,
    want_spin: str,
) -> None:
    settings = ServeSettings.model_validate(
        {"graph_optimization": level, "intra_op_spinning": spinning, "intra_op_threads": 2}
    )
    so = session_options(settings)
    assert so.graph_optimization_level == want_level
    assert so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == want_spin
    # and a session built with them answers like the default one
    mv = publish_bow(registry, LABELS, seed=3)
    session = StudentSession.from_version(mv, settings)
    default = StudentSession.from_version(mv, ServeSettings())
    probs = session.predict(dialogues(TEXTS))
    assert np.abs(probs - default.predict(dialogues(TEXTS))).max() <= 1e-5


async def test_shutdown_answers_running_and_queued_requests(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=3)
    settings = ServeSettings(batch_max_size=1, batch_workers=2, deadline_policy="late_ok")
    core = ServingCore(registry, settings, poll_interval_s=60)
    await core.start()
    assert await core.wait_ready(10)
    assert core.session is not None
    instrument(core.session, 0.3)
    running = [
        asyncio.create_task(core.classify(d)) for d in dialogues(["hi", "where is my order"])
    ]
    await eventually(lambda: len(core.batcher._running) == 2)  # one batch on each worker
    queued = asyncio.create_task(core.classify(dialogues(["refund"])[0]))
    await eventually(lambda: core.batcher.queued == 1)
    t0 = time.perf_counter()
    await core.aclose()
    out = await asyncio.gather(*running, queued, return_exceptions=True)
    assert [type(o) for o in out] == [NotReady, NotReady, NotReady]
    assert time.perf_counter() - t0 < 0.25  # none waited for the model to finish


async def test_workers_run_batches_side_by_side(registry: Registry) -> None:
    """With two workers a second batch starts while the first runs, each on its thread."""
    publish_bow(registry, LABELS, seed=3)
    spans: list[tuple[float, float, str]] = []
    settings = ServeSettings(batch_max_size=2, batch_workers=2, deadline_ms=10_000)
    core = ServingCore(registry, settings, poll_interval_s=60)
    await core.start()
    try:
        assert await core.wait_ready(10)
        session = core.session
        assert session is not None
        real = session.predict

        def predict(batch: Sequence[Sequence[Turn]]) -> FloatArray:
            t0 = time.perf_counter()
            time.sleep(0.2)
            out = real(batch)
            spans.append((t0, time.perf_counter(), threading.current_thread().name))
            return out

        session.predict = predict  # type: ignore[method-assign]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(core.classify(d) for d in dialogues(TEXTS[:4])))
        took = time.perf_counter() - t0
    finally:
        await core.aclose()
    assert [r.intent for r in results] == [
        LABELS[int(np.argmax(real(d)))] for d in (dialogues([t]) for t in TEXTS[:4])
    ]
    assert {name for *_, name in spans} == {"sd-batch_0", "sd-batch_1"}
    (_, first_end, _), (second_start, _, _) = sorted(spans)[:2]
    assert second_start < first_end  # the second batch began before the first one ended
    assert took < 0.55  # four requests, batches of two, two at a time: about 0.2 s, not 0.4+


def test_expected_wait_counts_the_workers() -> None:
    from stream_distill.metrics.hooks import Hooks
    from stream_distill.serving.batcher import Batcher

    now = [10.0]

    def batcher(workers: int) -> Batcher:
        settings = ServeSettings(batch_max_size=4, batch_workers=workers)
        b = Batcher(lambda: None, settings, Hooks(), lambda: now[0])
        b.service_s = 0.1
        return b

    one, two = batcher(1), batcher(2)
    assert one.expected_wait_s() == pytest.approx(0.1)  # idle: its own batch only
    one._running[1] = (9.96, [])  # a batch 40 ms in
    assert one.expected_wait_s() == pytest.approx(0.06 + 0.1)
    two._running[1] = (9.96, [])
    assert two.expected_wait_s() == pytest.approx(0.1)  # the other worker is free
    two._running[2] = (9.98, [])
    assert two.expected_wait_s() == pytest.approx(0.06 + 0.1)  # the sooner one frees
    for b in (one, two):
        for _ in range(8):  # two full batches ahead
            b._queue.put_nowait(None)  # type: ignore[arg-type]
    assert one.expected_wait_s() == pytest.approx(0.06 + 3 * 0.1)
    assert two.expected_wait_s() == pytest.approx(0.06 + 2 * 0.1)  # side by side


def test_rows_of_similar_length_share_a_run() -> None:
    lengths = np.array([40, 5, 6, 41, 5, 12, 39])
    runs = [r.tolist() for r in length_runs(lengths)]
    assert sorted(i for r in runs for i in r) == list(range(7))  # every row, once
    assert runs == [[1, 4, 2], [5], [6, 0, 3]]
    for r in runs:  # padding stays within the slack
        assert lengths[r].max() * len(r) <= 1.15 * lengths[r].sum()
    assert [r.tolist() for r in length_runs(np.array([7]))] == [[0]]


def test_length_runs_answer_each_row_as_if_alone(registry: Registry) -> None:
    session = StudentSession.from_version(publish_bow(registry, LABELS, seed=3), ServeSettings())
    texts = [*TEXTS, "where is my parcel", "hello", *TEXTS]  # equal lengths share runs
    assert any(
        len(r) > 1
        for r in length_runs(session.encoder.encode(dialogues(texts)).attention_mask.sum(axis=1))
    )
    assert np.abs(session.predict(dialogues(texts)) - one_by_one(session, texts)).max() <= 1e-5
