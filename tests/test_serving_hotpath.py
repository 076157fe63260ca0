"""The request path's shortcuts: lone requests skip the thread hop, swapped-out models are freed,
the direct route answers like the FastAPI one, loads run on a low-priority thread."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import pytest

from stream_distill.events import Turn
from stream_distill.registry.store import Registry
from stream_distill.serving import batcher as batcher_module
from stream_distill.serving import session as session_module
from stream_distill.serving.session import FloatArray, StudentSession, in_background
from stream_distill.testing import RecordingHooks, publish_bow, serve_for_test

LABELS = ("order_status", "refund", "cancel_order", "greeting")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def record_threads(session: StudentSession, seen: list[tuple[int, str]]) -> None:
    real = session.predict

    def predict(batch: Sequence[Sequence[Turn]]) -> FloatArray:
        seen.append((len(batch), threading.current_thread().name))
        return real(batch)

    session.predict = predict  # type: ignore[method-assign]


async def test_lone_requests_run_inline_and_bursts_on_the_worker(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # any batch time counts as fast: a loaded test machine must not make this flaky
    monkeypatch.setattr(batcher_module, "INLINE_MAX_S", 10.0)
    monkeypatch.setattr(batcher_module, "INLINE_MAX_LOAD", 1.0)
    publish_bow(registry, LABELS, seed=3)
    hooks = RecordingHooks()
    seen: list[tuple[int, str]] = []
    async with serve_for_test(registry, hooks=hooks, batch_max_size=8) as (serve, client):
        assert serve.core.session is not None
        record_threads(serve.core.session, seen)
        for i in range(5):  # one at a time: the model is idle whenever one arrives
            r = await client.post("/v1/classify", json={"text": f"where is order {i}"})
            assert r.status_code == 200, r.text
        lone = list(seen)
        seen.clear()
        burst = await asyncio.gather(
            *(client.post("/v1/classify", json={"text": f"refund {i}"}) for i in range(24))
        )
    assert all(r.status_code == 200 for r in burst)
    # the first batch teaches the batcher how long a batch takes; after it, no thread hop
    assert lone[0] == (1, lone[0][1]) and lone[0][1].startswith("sd-batch")
    assert {name for _, name in lone[1:]} == {threading.main_thread().name}
    # requests that queue up are batched and run on the worker, not on the event loop
    assert any(size > 1 for size, _ in seen)
    assert all(name.startswith("sd-batch") for size, name in seen if size > 1)


async def test_busy_arrivals_keep_the_loop_free() -> None:
    """At high arrival rates the loop must keep reading requests while the model runs."""
    from stream_distill.config import ServeSettings
    from stream_distill.metrics.hooks import Hooks

    now = [0.0]
    batcher = batcher_module.Batcher(lambda: None, ServeSettings(), Hooks(), lambda: now[0])
    batcher.service_s = 0.002  # a 2 ms model
    for _ in range(20):  # 200 req/s: busy 40 % of the time
        now[0] += 0.005
        batcher._arrival(now[0])
    assert batcher._inline_ok()
    for _ in range(40):  # 500 req/s: busy 100 % of the time
        now[0] += 0.002
        batcher._arrival(now[0])
    assert not batcher._inline_ok()
    batcher.service_s = 0.02  # a slow model never runs on the loop
    now[0] += 10.0
    batcher._arrival(now[0])
    assert not batcher._inline_ok()


async def test_swapped_out_sessions_are_freed(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=1)
    publish_bow(registry, LABELS, seed=2)
    # keep_versions=1: a swapped-out model is no longer needed for a rollback
    async with serve_for_test(registry, keep_versions=1, poll_interval_s=60) as (serve, client):
        freed = []
        for version in ("v1", "v2", "v1", "v2"):
            r = await client.post("/v1/classify", json={"text": "where is my order"})
            assert r.status_code == 200, r.text
            assert serve.core.session is not None
            old = weakref.ref(serve.core.session)
            assert await serve.core.load_version(version)
            gc.collect()
            # freed at once: no batch, answer or loop variable keeps the old model alive
            freed.append(old() is None)
    assert freed == [True] * 4


async def test_direct_route_answers_like_the_router(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=3)
    async with serve_for_test(registry) as (_, client):
        ok = await client.post("/v1/classify", json={"text": "refund please"})
        invalid = await client.post("/v1/classify", json={"text": ""})
        wrong_method = await client.get("/v1/classify")
        spec = (await client.get("/openapi.json")).json()
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert set(ok.json()) >= {"request_id", "intent", "confidence", "top", "model_version"}
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["msg"]
    assert wrong_method.status_code == 405  # everything but POST still goes to the router
    assert "post" in spec["paths"]["/v1/classify"]  # and the route is still documented


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread nice values")
async def test_loads_run_on_a_lower_priority_thread() -> None:
    def where() -> tuple[str, int]:
        name = threading.current_thread().name
        return name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    name, nice = await in_background(where)
    assert name.startswith("sd-load")
    assert nice >= min(19, os.getpriority(os.PRIO_PROCESS, 0) + session_module.LOAD_NICE)


async def test_a_lone_request_skips_the_queue_and_a_burst_still_batches() -> None:
    """With no batch wait, a lone request runs in its own task (no queue, no batch task);
    requests that turn up while it yields once are batched, it among them."""
    import numpy as np

    from stream_distill.config import ServeSettings

    calls: list[tuple[int, str]] = []

    class Model:
        labels = LABELS
        version = "v1"
        sha256 = "0" * 64

        def predict(self, dialogues: Sequence[Sequence[Turn]]) -> FloatArray:
            calls.append((len(dialogues), threading.current_thread().name))
            return np.full((len(dialogues), len(LABELS)), 0.25, dtype=np.float32)

    hooks = RecordingHooks()
    batcher = batcher_module.Batcher(
        lambda: Model(), ServeSettings(batch_max_size=8), hooks, asyncio.get_running_loop().time
    )
    batcher.service_s = 0.0005  # a fast model at light load: lone requests run inline
    queued = []
    real_put = batcher._queue.put_nowait
    batcher._queue.put_nowait = lambda p: (queued.append(p), real_put(p))[1]  # type: ignore[method-assign]
    try:
        turns = [Turn(role="user", text="hi")]
        for _ in range(3):
            await asyncio.sleep(0.01)
            answer = await batcher.run(turns, asyncio.get_running_loop().time() + 1.0)
            assert answer.probs.shape == (len(LABELS),)
        assert not queued and calls == [(1, threading.main_thread().name)] * 3
        calls.clear()
        await asyncio.sleep(0.01)
        burst = await asyncio.gather(
            *(batcher.run(turns, asyncio.get_running_loop().time() + 1.0) for _ in range(5))
        )
        assert len(burst) == 5 and len(queued) == 5  # the first one joined the others
        assert sum(n for n, _ in calls) == 5 and max(n for n, _ in calls) > 1
    finally:
        await batcher.aclose()


def test_a_dropped_session_is_freed_right_after_an_answer_left() -> None:
    """Freeing holds the GIL: the dropper waits for an answer to leave, or QUIET_WAIT_S."""
    import time

    freed: list[float] = []

    class Session:
        def __del__(self) -> None:
            freed.append(time.monotonic())

    session_module._dropper()
    for answered in (False, True):
        freed.clear()
        session_module._DROPS.put(Session())
        t0 = time.monotonic()
        time.sleep(0.01)
        assert not freed  # waiting for its moment
        if answered:
            session_module.answer_left()
        deadline = time.monotonic() + 5
        while not freed and time.monotonic() < deadline:
            time.sleep(0.001)
        took = freed[0] - t0
        if answered:
            assert took < session_module.QUIET_WAIT_S
        else:
            assert took >= session_module.QUIET_WAIT_S * 0.9


def test_the_heap_is_trimmed_only_once_it_has_grown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trimming interrupts the event loop's core and refaults pages: not on every load."""
    trims: list[int] = []
    resident = [200.0]

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            trims.append(pad)
            resident[0] -= 20.0  # what it gave back
            return 1

    monkeypatch.setattr(session_module, "_libc", lambda: Libc())
    monkeypatch.setattr(session_module, "_resident_mb", lambda: resident[0])
    monkeypatch.setattr(session_module, "_settled_mb", [])
    session_module.trim_heap()  # the first load trims: 180 MB is the settled size
    assert len(trims) == 1
    for resident[0] in (190.0, 205.0, 180.0 + session_module.TRIM_ABOVE_MB - 1):
        session_module.trim_heap()  # loads come and go within the margin
    assert len(trims) == 1
    resident[0] = 180.0 + session_module.TRIM_ABOVE_MB
    session_module.trim_heap()
    assert len(trims) == 2


def test_resident_memory_is_read() -> None:
    assert 1.0 < session_module._resident_mb() < 1e6
