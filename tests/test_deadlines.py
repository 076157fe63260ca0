"""Deadlines and load shedding: 503 + Retry-After instead of waiting, 429 on a full queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest

from stream_distill.config import ServeSettings
from stream_distill.errors import DeadlineExceeded
from stream_distill.events import Turn
from stream_distill.registry.store import Registry
from stream_distill.serving.service import ServingCore
from stream_distill.serving.session import FloatArray, StudentSession
from stream_distill.testing import RecordingHooks, eventually, publish_bow, serve_for_test

LABELS = ("order_status", "refund", "cancel_order", "greeting")
TURNS = [Turn(role="user", text="where is my order")]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, LABELS, seed=3)
    return registry


def slow_down(
    session: StudentSession | None, delay_s: float, then: Callable[[], None] | None = None
) -> None:
    """Every model run takes ``delay_s`` (real time) longer, then calls ``then``."""
    assert session is not None
    real = session.predict

    def predict(batch: Sequence[Sequence[Turn]]) -> FloatArray:
        time.sleep(delay_s)
        if then is not None:
            then()
        return real(batch)

    session.predict = predict  # type: ignore[method-assign]


async def timed_post(client: httpx.AsyncClient, body: dict[str, object]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    r = await client.post("/v1/classify", json=body)
    return time.perf_counter() - t0, r.status_code, r.headers.get("retry-after", "")


def outcomes(hooks: RecordingHooks) -> list[str]:
    return [outcome for outcome, _, _ in hooks.named("on_request")]


async def test_hopeless_request_is_refused_at_once_with_retry_after(registry: Registry) -> None:
    hooks = RecordingHooks()
    async with serve_for_test(registry, hooks=hooks, batch_workers=1) as (serve, client):
        assert await serve.core.wait_ready(10)
        slow_down(serve.core.session, 0.3)
        # one request teaches the service-time estimate that a batch takes ~300 ms
        assert (await timed_post(client, {"text": "a", "deadline_ms": 5000}))[1] == 200
        busy = asyncio.create_task(timed_post(client, {"text": "b", "deadline_ms": 5000}))
        await eventually(lambda: serve.core.batcher.running)
        # expected: what is left of b's batch plus its own, well over 300 ms > 250 ms
        took, status, retry = await timed_post(client, {"text": "c", "deadline_ms": 250})
        assert (status, retry) == (503, "1")
        assert took < 0.2  # answered on arrival, not after the 250 ms budget or the batch
        assert (await busy)[1] == 200
    assert outcomes(hooks) == ["ok", "deadline", "ok"]


async def test_a_request_still_waiting_at_its_deadline_gets_503_then(registry: Registry) -> None:
    hooks = RecordingHooks()
    async with serve_for_test(registry, hooks=hooks) as (serve, client):
        assert await serve.core.wait_ready(10)
        slow_down(serve.core.session, 0.5)
        # nothing known yet about service time: it runs, but nobody waits past 100 ms for it
        took, status, retry = await timed_post(client, {"text": "x", "deadline_ms": 100})
        assert (status, retry) == (503, "1")
        assert 0.09 < took < 0.35
        # the abandoned answer is dropped, and the model is free for the next request
        await eventually(lambda: not serve.core.batcher.running)
        assert (await timed_post(client, {"text": "y", "deadline_ms": 5000}))[1] == 200
    assert outcomes(hooks) == ["deadline", "ok"]


async def test_full_queue_sheds_with_429_and_counts_it(registry: Registry) -> None:
    async with serve_for_test(
        registry, queue_max=2, batch_max_size=1, batch_workers=1, deadline_ms=5000
    ) as (serve, client):
        assert await serve.core.wait_ready(10)
        slow_down(serve.core.session, 0.2)
        first = asyncio.create_task(timed_post(client, {"text": "1"}))
        await eventually(lambda: serve.core.batcher.running)
        queued = [asyncio.create_task(timed_post(client, {"text": t})) for t in ("2", "3")]
        await eventually(lambda: serve.core.batcher.queued == 2)
        took, status, retry = await timed_post(client, {"text": "4"})
        assert status == 429 and int(retry) >= 1
        assert took < 0.15
        assert [s for _, s, _ in await asyncio.gather(first, *queued)] == [200, 200, 200]
        metrics = (await client.get("/metrics")).text
    assert 'sd_requests_total{outcome="shed"} 1.0' in metrics
    assert 'sd_requests_total{outcome="ok"} 3.0' in metrics


async def test_late_ok_answers_late_and_counts_the_miss(registry: Registry) -> None:
    hooks = RecordingHooks()
    async with serve_for_test(
        registry, hooks=hooks, deadline_policy="late_ok", batch_workers=1
    ) as (serve, c):
        assert await serve.core.wait_ready(10)
        slow_down(serve.core.session, 0.2)
        took, status, _ = await timed_post(c, {"text": "x", "deadline_ms": 50})
        assert status == 200 and took >= 0.2
        # with late_ok even a request the estimate calls hopeless is answered
        busy = asyncio.create_task(timed_post(c, {"text": "y", "deadline_ms": 5000}))
        await eventually(lambda: serve.core.batcher.running)
        assert (await timed_post(c, {"text": "z", "deadline_ms": 50}))[1] == 200
        await busy
    assert outcomes(hooks) == ["deadline", "ok", "deadline"]


class ManualClock:
    """A clock that moves only when told, so deadlines are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def test_batch_formation_refuses_a_request_whose_budget_ran_out(registry: Registry) -> None:
    clock = ManualClock()
    hooks = RecordingHooks()
    settings = ServeSettings(deadline_ms=150, batch_max_size=1, batch_workers=1)
    core = ServingCore(registry, settings, hooks, poll_interval_s=60, clock=clock)
    await core.start()
    try:
        assert await core.wait_ready(10)
        slow_down(core.session, 0.0, lambda: clock.advance(0.05))
        await core.classify(TURNS)  # every batch "takes" 50 ms: that is the estimate now
        assert core.batcher.service_s == pytest.approx(0.05)
        slow_down(core.session, 0.05, lambda: clock.advance(0.12))  # this one overruns
        busy = asyncio.create_task(core.classify(TURNS, deadline_ms=5000))
        await eventually(lambda: core.batcher.running)
        # admitted: 100 ms expected (50 left of the running batch + its own 50) < 150 ms
        late = asyncio.create_task(core.classify(TURNS))
        with pytest.raises(DeadlineExceeded, match="when its batch formed"):
            await late  # at formation only 30 ms are left, less than a batch takes
        await busy
    finally:
        await core.aclose()
    assert sorted(outcomes(hooks)) == ["deadline", "ok", "ok"]
    assert [s for (s,) in hooks.named("on_batch")] == [1, 1]
