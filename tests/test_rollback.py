"""Kept versions, rollback by API and by online accuracy (real ONNX, real HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from stream_distill.bus.base import Topics
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import encode, headers_for
from stream_distill.bus.kafka import KafkaBus
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings, ServeSettings
from stream_distill.events import HardLabel, new_id
from stream_distill.metrics.hooks import Hooks
from stream_distill.registry.store import Registry
from stream_distill.serving.online import OnlineAccuracy
from stream_distill.serving.service import ServingCore
from stream_distill.testing import announce_model, eventually, publish_bow, serve_for_test

LABELS = ("order_status", "refund", "cancel_order", "greeting")
TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def bus(prefix: str) -> MemoryBus:
    return MemoryBus(Topics(prefix))


async def _answer(client: httpx.AsyncClient, text: str = "where is my parcel") -> dict[str, str]:
    r = await client.post("/v1/classify", json={"text": text})
    assert r.status_code == 200, r.text
    body: dict[str, str] = r.json()
    return body


async def test_rollback_by_api_pins_until_a_newer_version(
    registry: Registry, bus: MemoryBus
) -> None:
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    async with serve_for_test(registry, bus, poll_interval_s=0.05, admin_token=TOKEN) as (
        serve,
        client,
    ):
        core = serve.core
        await eventually(lambda: core.version == "v1")
        v2 = publish_bow(registry, LABELS, seed=2, bias_label=1)
        await eventually(lambda: core.version == "v2")
        assert (await _answer(client))["model_version"] == "v2"

        url = "/v1/admin/rollback"
        r = await client.post(url, json={})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = await client.post(url, json={}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403
        r = await client.post(url, json={"version": "v7"}, headers=AUTH)
        assert r.status_code == 404 and "v7" in r.json()["detail"]
        assert core.version == "v2"

        r = await client.post(url, headers=AUTH)  # no body: back to the predecessor
        assert (r.status_code, r.json()) == (200, {"from": "v2", "to": "v1"})
        assert core.version == "v1"  # a reference swap: no reload to wait for
        answer = await _answer(client)
        assert (answer["model_version"], answer["intent"]) == ("v1", LABELS[0])

        # Neither the registry poll nor a fresh announcement moves forward to v2 again.
        await core.watcher.converge()
        async with bus.producer() as producer:
            await announce_model(producer, bus.topics, v2)
        await asyncio.sleep(0.3)  # several poll intervals
        assert core.version == "v1"
        models = (await client.get("/v1/models")).json()
        assert models["serving"]["version"] == "v1"
        assert models["pinned"] == {"version": "v1", "above": "v2"}
        rows = {m["version"]: m for m in models["versions"]}
        assert set(rows) == {"v1", "v2"} and rows["v2"]["sha256"] == v2.sha256
        assert rows["v1"]["pinned"] and rows["v1"]["serving"] and not rows["v2"]["serving"]
        assert rows["v2"]["predecessor"] == "v1"
        assert [m["version"] for m in models["loaded"]] == ["v1", "v2", "v1"]

        # A version newer than the bad one is still taken, and ends the pin.
        publish_bow(registry, LABELS, seed=3, bias_label=2)
        await eventually(lambda: core.version == "v3")
        assert core.pin is None
        r = await client.post(url, json={"version": "v2"}, headers=AUTH)
        assert (r.status_code, r.json()) == (200, {"from": "v3", "to": "v2"})
        assert (await _answer(client))["intent"] == LABELS[1]
        r = await client.post("/v1/admin/unpin", headers=AUTH)
        assert (r.status_code, r.json()) == (200, {"unpinned": "v2"})
        await eventually(lambda: core.version == "v3")
        metrics = (await client.get("/metrics")).text
    assert 'sd_rollbacks_total{reason="manual"} 2.0' in metrics


async def test_admin_routes_are_off_without_a_token(registry: Registry) -> None:
    publish_bow(registry, LABELS)
    async with serve_for_test(registry) as (serve, client):
        await eventually(lambda: serve.core.ready)
        for path in ("/v1/admin/rollback", "/v1/admin/unpin"):
            r = await client.post(path, headers={"Authorization": "Bearer anything"})
            assert (r.status_code, r.json()["detail"]) == (403, "admin disabled")


async def test_kept_versions_are_bounded(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=1)
    async with serve_for_test(
        registry, poll_interval_s=0.05, admin_token=TOKEN, keep_versions=2
    ) as (serve, client):
        await eventually(lambda: serve.core.version == "v1")
        publish_bow(registry, LABELS, seed=2)
        await eventually(lambda: serve.core.version == "v2")
        publish_bow(registry, LABELS, seed=3)
        await eventually(lambda: serve.core.version == "v3")
        assert [k.version for k in serve.core.kept] == ["v2", "v3"]
        r = await client.post("/v1/admin/rollback", json={"version": "v1"}, headers=AUTH)
        assert r.status_code == 404
        r = await client.post("/v1/admin/rollback", headers=AUTH)
        assert r.json() == {"from": "v3", "to": "v2"}
        r = await client.post("/v1/admin/rollback", headers=AUTH)  # v2's predecessor is gone
        assert r.status_code == 404 and serve.core.version == "v2"


def _labels(core: ServingCore, version: str) -> int:
    stats = core.online.stats(version)
    return stats.labels if stats is not None else 0


async def _label(bus: MemoryBus, request_id: str, intent: str) -> None:
    label = HardLabel(feedback_id=new_id(), request_id=request_id, intent=intent)
    async with bus.producer() as producer:
        await producer.send(bus.topics.hard_labels, encode(label), headers=headers_for(label))


async def test_accuracy_drop_rolls_back_automatically(registry: Registry, bus: MemoryBus) -> None:
    publish_bow(registry, LABELS, seed=1, bias_label=0)  # v1 answers order_status
    settings: dict[str, Any] = {
        "rollback_min_labels": 10,
        "online_window": 20,
        "rollback_margin": 0.05,
    }
    async with serve_for_test(registry, bus, poll_interval_s=0.05, **settings) as (serve, client):
        core = serve.core
        await eventually(lambda: core.version == "v1")
        await asyncio.wait_for(core.online.positioned.wait(), 10)
        async with bus.producer() as producer:  # poison is parked, not fatal
            await producer.send(bus.topics.hard_labels, b"not json")
        for i in range(10):
            await _label(bus, (await _answer(client, f"parcel {i}"))["request_id"], LABELS[0])
        await eventually(lambda: _labels(core, "v1") == 10)
        assert len(bus.records(bus.topics.dead_letters)) == 1

        publish_bow(registry, LABELS, seed=2, bias_label=1)  # v2 answers refund: all wrong
        await eventually(lambda: core.version == "v2")
        answers = [await _answer(client, f"parcel again {i}") for i in range(10)]
        assert {a["model_version"] for a in answers} == {"v2"}
        for a in answers[:9]:
            await _label(bus, a["request_id"], LABELS[0])
        await eventually(lambda: _labels(core, "v2") == 9)
        assert core.version == "v2"  # 9 < rollback_min_labels: no verdict yet
        await _label(bus, answers[9]["request_id"], LABELS[0])
        await eventually(lambda: core.version == "v1")
        assert core.pin is not None and core.pin.above == "v2"
        assert core.pin.reason.startswith("accuracy_drop: v2 0.000")
        await asyncio.sleep(0.2)  # the registry poll does not bring v2 back
        assert core.version == "v1" and (await _answer(client))["model_version"] == "v1"
        rows = {m["version"]: m for m in (await client.get("/v1/models")).json()["versions"]}
        metrics = (await client.get("/metrics")).text
    assert (rows["v1"]["online_accuracy"], rows["v1"]["online_labels"]) == (1.0, 10)
    assert (rows["v2"]["online_accuracy"], rows["v2"]["online_labels"]) == (0.0, 10)
    assert 'sd_rollbacks_total{reason="accuracy_drop"} 1.0' in metrics
    assert 'sd_online_accuracy{version="v1"} 1.0' in metrics
    assert 'sd_online_accuracy{version="v2"} 0.0' in metrics
    assert 'sd_online_labels{version="v2"} 10.0' in metrics


@pytest.mark.integration
async def test_feedback_over_the_real_broker_rolls_back(
    registry: Registry, broker: EmbeddedBroker, prefix: str
) -> None:
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix), broker.bootstrap)
    await bus.ensure_topics()
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    desk = {"Authorization": "Bearer desk-token"}
    settings: dict[str, Any] = {
        "rollback_min_labels": 5,
        "feedback_tokens": {"desk": "desk-token"},
        "admin_token": TOKEN,
    }
    async with serve_for_test(registry, bus, poll_interval_s=0.1, **settings) as (serve, client):
        core = serve.core
        await eventually(lambda: core.version == "v1")
        await asyncio.wait_for(core.online.positioned.wait(), 20)

        async def judged(n: int) -> None:
            for i in range(n):
                rid = (await _answer(client, f"my parcel {i}"))["request_id"]
                body = {"request_id": rid, "intent": LABELS[0]}
                r = await client.post("/v1/feedback", json=body, headers=desk)
                assert r.status_code == 202, r.text

        await judged(5)
        await eventually(lambda: _labels(core, "v1") == 5, 20)
        publish_bow(registry, LABELS, seed=2, bias_label=1)
        await eventually(lambda: core.version == "v2", 20)
        await judged(5)
        await eventually(lambda: core.version == "v1", 20)
        models = (await client.get("/v1/models")).json()
    assert models["pinned"]["above"] == "v2"
    assert [(m["version"], m["online_accuracy"]) for m in models["versions"]] == [
        ("v1", 1.0),
        ("v2", 0.0),
    ]


class _Rollbacks(Hooks):
    def __init__(self) -> None:
        self.accuracy: list[tuple[str, float, int]] = []

    def on_online_accuracy(self, version: str, accuracy: float, labels: int) -> None:
        self.accuracy.append((version, accuracy, labels))


def _tracker(serving: list[str], calls: list[tuple[str, str]], **kw: Any) -> OnlineAccuracy:
    def rollback(to: str, reason: str) -> bool:
        calls.append((to, reason))
        serving.append(to)
        return True

    settings = ServeSettings(rollback_min_labels=10, online_window=10, **kw)
    return OnlineAccuracy(
        settings,
        _Rollbacks(),
        current=lambda: serving[-1],
        predecessor=lambda v: {"v2": "v1"}.get(v),
        rollback=rollback,
    )


def _feed(tracker: OnlineAccuracy, version: str, right: int, wrong: int) -> None:
    for i in range(right + wrong):
        rid = f"{version}-{i}"
        tracker.remember(rid, version, "refund")
        assert tracker.observe(
            HardLabel(feedback_id=rid, request_id=rid, intent="refund" if i < right else "greeting")
        )


@pytest.mark.parametrize(
    ("margin", "v2_right", "rolls_back"),
    [
        (0.1, 9, False),  # 1.0 vs 0.9: exactly the margin is within it
        (0.1, 8, True),
        (0.05, 9, True),
        (0.3, 0, True),
    ],
)
def test_rollback_needs_a_drop_beyond_the_margin(
    margin: float, v2_right: int, rolls_back: bool
) -> None:
    serving: list[str] = ["v1"]
    calls: list[tuple[str, str]] = []
    tracker = _tracker(serving, calls, rollback_margin=margin)
    _feed(tracker, "v1", 10, 0)
    serving.append("v2")
    _feed(tracker, "v2", v2_right, 10 - v2_right)
    assert [to for to, _ in calls] == (["v1"] if rolls_back else [])


def test_no_rollback_below_min_labels_or_when_disabled() -> None:
    serving: list[str] = ["v1"]
    calls: list[tuple[str, str]] = []
    tracker = _tracker(serving, calls)
    _feed(tracker, "v1", 9, 0)  # the predecessor itself lacks labels
    serving.append("v2")
    _feed(tracker, "v2", 0, 12)
    assert calls == []
    assert not tracker.observe(HardLabel(feedback_id="x", request_id="unknown", intent="refund"))

    serving, calls = ["v1"], []
    tracker = _tracker(serving, calls, auto_rollback=False)
    _feed(tracker, "v1", 10, 0)
    serving.append("v2")
    _feed(tracker, "v2", 0, 10)
    stats = tracker.stats("v2")
    assert calls == [] and stats is not None and stats.accuracy == 0.0


def test_each_request_counts_once_and_memory_is_bounded() -> None:
    serving: list[str] = ["v1"]
    calls: list[tuple[str, str]] = []
    tracker = _tracker(serving, calls, online_remember=3)
    for i in range(5):
        tracker.remember(f"r{i}", "v1", "refund")
    label = HardLabel(feedback_id="f", request_id="r4", intent="refund")
    assert tracker.observe(label) and not tracker.observe(label)
    assert not tracker.observe(HardLabel(feedback_id="g", request_id="r0", intent="refund"))
    assert tracker.observe(HardLabel(feedback_id="h", request_id="r2", intent="greeting"))
    stats = tracker.stats("v1")
    assert stats is not None and (stats.labels, stats.accuracy) == (2, 0.5)
    hooks = tracker.hooks
    assert isinstance(hooks, _Rollbacks) and hooks.accuracy == [("v1", 1.0, 1), ("v1", 0.5, 2)]
