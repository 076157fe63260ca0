"""SIGTERM on serve: not ready at once, still answering during the grace, then a clean exit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from stream_distill.app import run_serve
from stream_distill.bus.broker import EmbeddedBroker, free_port
from stream_distill.config import KafkaSettings, RegistrySettings, ServeSettings, Settings
from stream_distill.data.synthetic import INTENTS
from stream_distill.registry.store import Registry
from stream_distill.testing import publish_bow


async def test_drain_reports_not_ready_then_finishes(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, INTENTS)
    port = free_port()
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix=prefix),
        registry=RegistrySettings(root=str(registry.root)),
        serve=ServeSettings(port=port, drain_grace_s=1.5),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_serve(settings, stop))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as c:
        for _ in range(100):
            try:
                if (await c.get("/v2/health/ready")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        assert (await c.post("/v1/classify", json={"text": "refund please"})).status_code == 200

        stop.set()  # what SIGTERM does (see app.stop_on_signals)
        await asyncio.sleep(0.2)
        ready = await c.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        # traffic already routed here is still answered during the grace period
        answers = await asyncio.gather(
            *(c.post("/v1/classify", json={"text": f"where is order {i}"}) for i in range(20))
        )
        assert [r.status_code for r in answers] == [200] * 20
    await asyncio.wait_for(task, 15)  # then it exits by itself, without error
    async with httpx.AsyncClient(base_url=base, timeout=1) as c:
        with pytest.raises(httpx.ConnectError):  # no longer listening
            await c.get("/v2/health/live")
