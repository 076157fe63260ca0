"""Hot swaps under load, and candidates that must never serve (real ONNX, real HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stream_distill.bus.base import Topics
from stream_distill.bus.memory import MemoryBus
from stream_distill.registry.store import MODEL_FILE, ModelVersion, Registry
from stream_distill.testing import (
    RecordingHooks,
    announce_model,
    eventually,
    make_bow_onnx,
    minilm_tokenizer_json,
    publish_bow,
    serve_for_test,
)

LABELS = ("order_status", "refund", "cancel_order", "greeting")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def bus(prefix: str) -> MemoryBus:
    return MemoryBus(Topics(prefix))


async def test_hot_swap_under_concurrent_load(registry: Registry, bus: MemoryBus) -> None:
    v1 = publish_bow(registry, LABELS, seed=1, bias_label=0)
    intent_of = {"v1": LABELS[0], "v2": LABELS[1]}
    seen: list[list[tuple[str, str]]] = [[] for _ in range(8)]
    failures: list[str] = []
    stop = asyncio.Event()

    async def stream(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                r = await client.post("/v1/classify", json={"text": f"worker {i} says {n}"})
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text}")
                continue
            body = r.json()
            seen[i].append((body["model_version"], body["intent"]))

    # A long poll interval: the swap must come from the ModelPublished event.
    async with serve_for_test(registry, bus, poll_interval_s=60) as (serve, client):
        assert await serve.core.wait_ready(10)
        workers = [asyncio.create_task(stream(client, i)) for i in range(8)]
        await eventually(lambda: all(len(s) >= 5 for s in seen))
        v2 = publish_bow(registry, LABELS, seed=2, bias_label=1)
        async with bus.producer() as producer:
            await announce_model(producer, bus.topics, v2)
        await eventually(lambda: serve.core.version == "v2")
        marks = [len(s) for s in seen]
        await eventually(lambda: all(len(s) >= m + 5 for s, m in zip(seen, marks, strict=True)))
        stop.set()
        await asyncio.gather(*workers)
        after = [(await client.post("/v1/classify", json={"text": "x"})).json() for _ in range(20)]
        verified = [(v.version, v.sha256) for v in serve.core.verified]

    assert failures == []
    answers = [a for s in seen for a in s]
    assert {v for v, _ in answers} == {"v1", "v2"}
    # every answer came whole from one model: its version and its (biased) intent agree
    assert all(intent == intent_of[v] for v, intent in answers)
    for stream_answers, mark in zip(seen, marks, strict=True):
        versions = [v for v, _ in stream_answers]
        first_v2 = versions.index("v2")  # requests of one worker are sequential: no way back
        assert set(versions[first_v2:]) == {"v2"}
        # once v2 serves, only the one request in flight at that moment may still be v1
        assert set(versions[mark + 1 :]) == {"v2"}
    assert {a["model_version"] for a in after} == {"v2"}
    assert verified == [("v1", v1.sha256), ("v2", v2.sha256)]


def _nan_model() -> bytes:
    model = onnx.load_from_string(make_bow_onnx(LABELS, seed=5))
    for init in model.graph.initializer:
        if init.name == "bias":
            init.CopyFrom(numpy_helper.from_array(np.full(len(LABELS), np.nan, np.float32), "bias"))
    return bytes(model.SerializeToString())


def _candidate(registry: Registry, kind: str) -> tuple[ModelVersion, dict[str, Any]]:
    tok = minilm_tokenizer_json()
    if kind == "file-sha256":
        mv = publish_bow(registry, LABELS, seed=9)
        path = registry.versions_dir / mv.version / MODEL_FILE
        path.write_bytes(make_bow_onnx(LABELS, seed=10))  # swapped behind the manifest's back
        return mv, {}
    if kind == "announced-sha256":
        mv = publish_bow(registry, LABELS, seed=9)
        return mv, {"sha256": "0" * 64}
    if kind == "truncated":
        model = make_bow_onnx(LABELS, seed=9)
        return registry.publish(model[: len(model) // 3], LABELS, tok), {}
    if kind == "width":
        model = make_bow_onnx((*LABELS, "extra"), seed=9)
        return registry.publish(model, LABELS, tok), {}
    if kind == "nan":
        return registry.publish(_nan_model(), LABELS, tok), {}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["file-sha256", "announced-sha256", "truncated", "width", "nan"])
async def test_corrupt_candidate_is_rejected_and_v1_keeps_serve_for_test(
    registry: Registry, bus: MemoryBus, kind: str
) -> None:
    publish_bow(registry, LABELS, seed=1, bias_label=2)
    hooks = RecordingHooks()
    async with serve_for_test(registry, bus, hooks=hooks, poll_interval_s=60) as (serve, client):
        assert await serve.core.wait_ready(10)
        mv, kw = _candidate(registry, kind)
        async with bus.producer() as producer:
            await announce_model(producer, bus.topics, mv, **kw)
        await eventually(lambda: "v2" in serve.core.rejected)
        r = await client.post("/v1/classify", json={"text": "still there?"})
        assert r.status_code == 200
        assert (r.json()["model_version"], r.json()["intent"]) == ("v1", LABELS[2])
        models = (await client.get("/v1/models")).json()
        assert models["serving"]["version"] == "v1" and "v2" in models["rejected"]
        assert [m["version"] for m in models["loaded"]] == ["v1"]
        await serve.core.watcher.converge()  # the poll does not retry a rejected version
        assert serve.core.version == "v1"
    swaps = [(v, ok, reason) for v, _, ok, reason in hooks.named("on_swap")]
    assert swaps[0] == ("v1", True, "")
    (version, ok, reason), *_ = swaps[1:]
    assert (version, ok) == ("v2", False)
    expected = {"file-sha256": "integrity", "announced-sha256": "integrity"}.get(kind, "verify")
    assert reason.startswith(expected + ":"), reason


async def test_newest_good_version_wins_at_start(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=1)
    registry.publish(b"not onnx at all", LABELS, minilm_tokenizer_json())
    async with serve_for_test(registry) as (serve, _):
        assert await serve.core.wait_ready(10)
        assert serve.core.version == "v1" and "v2" in serve.core.rejected


async def test_poison_model_record_goes_to_dead_letters(registry: Registry, bus: MemoryBus) -> None:
    publish_bow(registry, LABELS)
    hooks = RecordingHooks()
    async with serve_for_test(registry, bus, hooks=hooks) as (_, client):
        async with bus.producer() as producer:
            await producer.send(bus.topics.models, b"{broken", key=b"k")
        await eventually(lambda: len(bus.records(bus.topics.dead_letters)) == 1)
        assert (await client.post("/v1/classify", json={"text": "hi"})).status_code == 200
    (dead,) = bus.records(bus.topics.dead_letters)
    headers = dict(dead.headers)
    assert dead.value == b"{broken" and headers["sd-original-topic"] == bus.topics.models.encode()
    ((topic, reason),) = hooks.named("on_dead_letter")
    assert topic == bus.topics.models and reason.startswith("not JSON")
