"""``/dashboard`` and ``/v1/stats`` on a real serve, read by headless Chromium.

The browser test needs Debian's ``chromium`` (``make tools`` installs it); it skips
only when that is absent outside CI. ``SD_UPDATE_SCREENSHOT=1`` also writes the
screenshot to ``docs/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream_distill.bus.base import Topics
from stream_distill.bus.memory import MemoryBus
from stream_distill.metrics.prometheus import PrometheusHooks
from stream_distill.registry.store import Registry
from stream_distill.serving.dashboard import quantile
from stream_distill.serving.http import HttpServer
from stream_distill.testing import announce_model, eventually, publish_bow, serve_for_test

LABELS = ("order_status", "refund", "cancel_order", "greeting")
DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def bus(prefix: str) -> MemoryBus:
    return MemoryBus(Topics(prefix))


def test_quantile_matches_histogram_quantile() -> None:
    # 10 in (0, 1], 30 in (1, 2], 60 in (2, 4]: hand-computed like PromQL's histogram_quantile.
    cumulative = {1.0: 10.0, 2.0: 40.0, 4.0: 100.0, float("inf"): 100.0}
    assert quantile(0.05, cumulative) == pytest.approx(0.5)
    assert quantile(0.5, cumulative) == pytest.approx(2.0 + 2.0 * (50 - 40) / 60)
    assert quantile(0.99, cumulative) == pytest.approx(2.0 + 2.0 * (99 - 40) / 60)
    assert quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.99, {1.0: 1.0, float("inf"): 10.0}) == 1.0  # beyond the last bound


class FakeRoles:
    """The trainer's and teacher's ``/metrics`` on a real port, driven by the test."""

    def __init__(self) -> None:
        self.hooks = PrometheusHooks()
        app = FastAPI()

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self.hooks.registry), media_type=CONTENT_TYPE_LATEST)

        self.server = HttpServer(app)

    def step(self, i: int) -> None:
        """One trainer step and three teacher-scored requests per ten served."""
        self.hooks.on_train_step({"kd": 1.5 / (1 + 0.1 * i), "ce": 0.9 / (1 + 0.05 * i)}, 32, 0.01)
        self.hooks.on_consumer_lag("trainer", 40 + (i * 7) % 25)
        self.hooks.on_consumer_lag("teacher", 10 + (i * 3) % 9)
        self.hooks.on_teacher_batch(3, 0.02)
        self.hooks.on_online_accuracy("v2", min(0.95, 0.80 + 0.002 * i), 10 * i)


@contextlib.asynccontextmanager
async def live_serve(registry: Registry, bus: MemoryBus) -> AsyncIterator[dict[str, Any]]:
    """serve with traffic flowing, a swap, a rejection and a rollback on its timeline."""
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    roles = FakeRoles()
    async with (
        roles.server,
        serve_for_test(
            registry,
            bus,
            poll_interval_s=60,
            deadline_ms=5000,  # only the requests that ask for 0.001 ms should miss
            dashboard_sources=[f"{roles.server.url}/metrics", "http://127.0.0.1:9/metrics"],
            dashboard_source_timeout_s=0.5,
        ) as (serve, client),
    ):
        assert await serve.core.wait_ready(10)
        stop = asyncio.Event()
        served = 0

        async def traffic() -> None:
            nonlocal served
            i = 0
            while not stop.is_set():
                i += 1
                deadline = {"deadline_ms": 0.001} if i % 40 == 0 else {}
                r = await client.post(
                    "/v1/classify", json={"text": f"where is order {i}", **deadline}
                )
                # A missed deadline may be answered late (200) or refused (503): both count.
                assert r.status_code == 200 or (deadline and r.status_code == 503), r.text
                served += 1
                if i % 10 == 0:
                    roles.step(i // 10)
                await asyncio.sleep(0.004)

        worker = asyncio.create_task(traffic())
        await client.get("/v1/stats")  # history starts at the first poll
        await eventually(lambda: served >= 50)
        v2 = publish_bow(registry, LABELS, seed=2, bias_label=1)
        v3 = publish_bow(registry, LABELS, seed=3)
        async with bus.producer() as producer:
            await announce_model(producer, bus.topics, v2)
            await eventually(lambda: serve.core.version == "v2")
            await announce_model(producer, bus.topics, v3, sha256="0" * 64)
            await eventually(lambda: "v3" in serve.core.rejected)
        for _ in range(2):
            await asyncio.sleep(0.55)
            await client.get("/v1/stats")
        try:
            yield {"serve": serve, "client": client, "url": serve.url}
        finally:
            stop.set()
            await worker


async def test_stats_json_from_a_live_serve(registry: Registry, bus: MemoryBus) -> None:
    async with live_serve(registry, bus) as live:
        client: httpx.AsyncClient = live["client"]
        await asyncio.sleep(0.55)
        r = await client.get("/v1/stats")
        assert r.status_code == 200
        s = r.json()
        page = await client.get("/dashboard")

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "no outside resources"
    assert s["serving"] == "v2" and s["ready"] is True
    cur = s["current"]
    assert cur["rps"] > 10
    assert 0 < cur["p50_ms"] <= cur["p99_ms"] < 1000
    assert cur["requests_total"] >= 50
    assert cur["outcomes"].get("ok", 0) > 0
    series = s["series"]
    assert len(series["t"]) >= 4 and series["t"] == sorted(series["t"])
    assert sum(1 for v in series["rps"] if v) >= 3
    assert any(v for v in series["deadline_misses"]), "deadline_ms=0.001 requests must miss"
    assert set(series["trainer_loss"]) == {"kd", "ce"}
    assert set(series["lag"]) == {"trainer", "teacher"}
    rates = [v for v in series["teacher_sampling"] if v is not None]
    assert rates and all(0 <= v <= 1 for v in rates)
    assert 0.15 < sorted(rates)[len(rates) // 2] < 0.5  # 3 scored per 10 served
    kinds = [(e["kind"], e["version"]) for e in s["timeline"]]
    assert kinds[:2] == [("load", "v1"), ("swap", "v2")]
    assert ("rejected", "v3") in kinds
    rows = {row["version"]: row for row in s["versions"]}
    assert rows["v2"]["serving"] and rows["v2"]["online_accuracy"] > 0.8
    sources = {x["url"].rsplit(":", 1)[-1]: x for x in s["sources"]}
    assert sources["9/metrics"]["ok"] is False and sources["9/metrics"]["error"]
    assert sum(x["ok"] for x in s["sources"]) == 1


async def test_rollback_is_marked(registry: Registry, bus: MemoryBus) -> None:
    publish_bow(registry, LABELS, seed=1)
    async with serve_for_test(registry, bus, poll_interval_s=60) as (serve, client):
        assert await serve.core.wait_ready(10)
        v2 = publish_bow(registry, LABELS, seed=2)
        assert await serve.core.load_version(v2.version)
        assert await serve.core.load_version("v1")  # an operator rolls back
        s = (await client.get("/v1/stats")).json()
    assert [(e["kind"], e["version"]) for e in s["timeline"]] == [
        ("load", "v1"),
        ("swap", "v2"),
        ("rollback", "v1"),
    ]
    assert s["series"]["trainer_loss"] == {} and s["sources"] == []


class _Charts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "data-chart" in a:
            self.charts[a["data-chart"]] = a
        self._id = a.get("id")

    def handle_endtag(self, tag: str) -> None:
        self._id = None

    def handle_data(self, data: str) -> None:
        if self._id is not None:
            self.ids[self._id] = self.ids.get(self._id, "") + data


async def _chromium(*args: str, profile: Path, timeout_s: float = 60.0) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


@pytest.mark.integration
async def test_dashboard_in_headless_chromium(
    registry: Registry, bus: MemoryBus, tmp_path: Path
) -> None:
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("chromium is required under CI (make tools installs it)")
        pytest.skip("chromium not installed (make tools: apt-get install chromium)")
    png = tmp_path / "dashboard.png"
    async with live_serve(registry, bus) as live:
        url = f"{live['url']}/dashboard"
        dom, _ = await asyncio.gather(
            _chromium("--dump-dom", url, profile=tmp_path / "p1"),
            _chromium(
                f"--screenshot={png}", "--window-size=1400,1000", url, profile=tmp_path / "p2"
            ),
        )

    page = _Charts()
    page.feed(dom)
    charts = page.charts
    for name in ("latency", "throughput", "loss", "lag", "teacher", "timeline"):
        assert charts[name].get("data-state") == "data", (name, charts[name])
        assert int(charts[name]["data-points"]) >= 2, (name, charts[name])
    assert float(charts["latency"]["data-latest"]) > 0
    assert int(charts["timeline"]["data-swaps"]) == 1
    assert int(charts["timeline"]["data-rejected"]) == 1
    assert int(charts["versions"]["data-points"]) >= 1
    assert page.ids["kpi-version"] == "v2"
    assert float(page.ids["kpi-p99"]) > 0
    assert "ready" in page.ids["status-text"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    if os.environ.get("SD_UPDATE_SCREENSHOT") == "1":
        DOCS_PNG.parent.mkdir(exist_ok=True)
        shutil.copyfile(png, DOCS_PNG)
