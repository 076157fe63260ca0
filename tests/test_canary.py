"""Canary and shadow rollouts (real ONNX files, real HTTP, the in-memory bus twin)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from stream_distill.bus.base import Topics
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode, encode, headers_for
from stream_distill.bus.kafka import KafkaBus
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings
from stream_distill.events import HardLabel, RequestEvent, Turn, new_id
from stream_distill.registry.store import Registry
from stream_distill.serving.rollout import Rollout
from stream_distill.serving.service import ServingCore
from stream_distill.testing import eventually, publish_bow, serve_for_test

LABELS = ("order_status", "refund", "cancel_order", "greeting")
TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Each test model answers (almost) always the label its bias names, so an answer's
# intent tells which version computed it.
# Answers may come late on a busy test machine; deadlines are not what these tests check.
LATE_OK: dict[str, Any] = {"deadline_policy": "late_ok"}
BY_VERSION = {"v1": LABELS[0], "v2": LABELS[1], "v3": LABELS[1], "v4": LABELS[2]}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def bus(prefix: str) -> MemoryBus:
    return MemoryBus(Topics(prefix))


async def _ask(client: httpx.AsyncClient, text: str, cid: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"text": text}
    if cid is not None:
        body["conversation_id"] = cid
    r = await client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    assert answer["intent"] == BY_VERSION[answer["model_version"]]
    return answer


async def _label(bus: MemoryBus, request_id: str, intent: str) -> None:
    label = HardLabel(feedback_id=new_id(), request_id=request_id, intent=intent)
    async with bus.producer() as producer:
        await producer.send(bus.topics.hard_labels, encode(label), headers=headers_for(label))


def _running(core: ServingCore, version: str) -> Rollout:
    r = core.rollout.current
    assert r is not None and r.version == version
    return r


def _labels(core: ServingCore, version: str) -> int:
    stats = core.online.stats(version)
    return stats.labels if stats is not None else 0


def _events(bus: MemoryBus) -> dict[str, str]:
    records = bus.records(bus.topics.requests)
    return {e.request_id: e.model_version for e in (decode(RequestEvent, r.value) for r in records)}


async def test_canary_routes_its_share_and_names_the_answering_version(
    registry: Registry, bus: MemoryBus
) -> None:
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    settings: dict[str, Any] = {"rollout_mode": "canary", "canary_fraction": 0.3}
    async with serve_for_test(registry, bus, poll_interval_s=0.05, **LATE_OK, **settings) as (
        serve,
        client,
    ):
        core = serve.core
        await eventually(lambda: core.version == "v1")
        publish_bow(registry, LABELS, seed=2, bias_label=1)
        await eventually(lambda: core.rollout.current is not None)
        r = _running(core, "v2")
        assert (r.mode, r.fraction, r.live, core.version) == ("canary", 0.3, "v1", "v1")
        await asyncio.sleep(0.2)  # registry polls meanwhile neither reload nor swap it
        assert core.version == "v1" and core.rollout.current is r

        answers = [await _ask(client, f"where is parcel {i}", f"conv-{i}") for i in range(200)]
        served = Counter(a["model_version"] for a in answers)
        assert set(served) == {"v1", "v2"} and 30 <= served["v2"] <= 95, served
        # A conversation stays on one version; a request without one is drawn at random.
        sticky = {(await _ask(client, f"again {i}", "conv-7"))["model_version"] for i in range(8)}
        assert sticky == {answers[7]["model_version"]}
        assert {(await _ask(client, f"solo {i}"))["model_version"] for i in range(60)} == {
            "v1",
            "v2",
        }

        # The live model also ran on a copy of every canary request: they never agree.
        canary = r.of("v2").returned
        await eventually(lambda: r.compared == canary)
        assert (r.agreed, r.of("v1").mirrored, r.of("v2").mirrored) == (0, canary, 0)
        assert r.of("v1").returned + canary == 200 + 8 + 60
        await eventually(lambda: len(_events(bus)) == 268)
        events = _events(bus)
        assert all(events[a["request_id"]] == a["model_version"] for a in answers)

        state = (await client.get("/v1/rollout")).json()
        models = (await client.get("/v1/models")).json()
        metrics = (await client.get("/metrics")).text
    current = state["current"]
    assert (current["version"], current["mode"], current["agreement"]) == ("v2", "canary", 0.0)
    assert current["versions"]["v2"]["returned"] == canary
    assert models["rollout"]["current"]["version"] == "v2"
    assert models["serving"]["version"] == "v1"
    assert f'sd_rollout_answers_total{{path="returned",version="v2"}} {canary}.0' in metrics
    assert f'sd_rollout_comparisons_total{{result="disagree",version="v1"}} {canary}.0' in metrics
    assert 'sd_rollouts_total{action="started",mode="canary"} 1.0' in metrics


async def test_shadow_answers_are_recorded_never_returned(
    registry: Registry, bus: MemoryBus
) -> None:
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    settings: dict[str, Any] = {"rollout_mode": "shadow", "rollout_min_labels": 20}
    async with serve_for_test(registry, bus, poll_interval_s=0.05, **LATE_OK, **settings) as (
        serve,
        client,
    ):
        core = serve.core
        await eventually(lambda: core.version == "v1")
        publish_bow(registry, LABELS, seed=2, bias_label=1)
        await eventually(lambda: core.rollout.current is not None)
        r = _running(core, "v2")
        await asyncio.wait_for(core.rollout.positioned.wait(), 10)

        answers = [await _ask(client, f"refund for order {i}") for i in range(30)]
        assert {a["model_version"] for a in answers} == {"v1"}
        await eventually(lambda: r.compared == 30)
        assert (r.agreed, r.of("v2").mirrored, r.of("v2").returned) == (0, 30, 0)
        await eventually(lambda: len(_events(bus)) == 30)
        assert set(_events(bus).values()) == {"v1"}

        # Hard labels judge the shadow's answers too: here the candidate is right.
        for a in answers[:19]:
            await _label(bus, a["request_id"], LABELS[1])
        await eventually(lambda: r.of("v2").accuracy.labels == 19)
        assert (r.of("v2").accuracy.accuracy, r.of("v1").accuracy.accuracy) == (1.0, 0.0)
        assert core.version == "v1"  # 19 < rollout_min_labels: no verdict yet
        await _label(bus, answers[19]["request_id"], LABELS[1])
        await eventually(lambda: core.version == "v2")
        assert r.state == "promoted"
        assert r.reason.startswith("accuracy_ok: v2 1.000 over 20 labels vs v1 0.000")
        assert (await _ask(client, "refund please"))["model_version"] == "v2"

        # An identical candidate agrees on every copy.
        publish_bow(registry, LABELS, seed=2, bias_label=1)
        await eventually(lambda: core.rollout.current is not None)
        r3 = _running(core, "v3")
        answers = [await _ask(client, f"money back {i}") for i in range(20)]
        assert {a["model_version"] for a in answers} == {"v2"}
        await eventually(lambda: r3.compared == 20)
        state = (await client.get("/v1/rollout")).json()
        metrics = (await client.get("/metrics")).text
    assert state["current"]["agreement"] == 1.0
    assert [h["state"] for h in state["history"]] == ["promoted"]
    assert 'sd_rollout_comparisons_total{result="agree",version="v3"} 20.0' in metrics
    assert 'sd_rollout_accuracy{version="v2"} 1.0' in metrics
    assert 'sd_rollout_labels{version="v2"} 20.0' in metrics
    assert 'sd_rollouts_total{action="promoted",mode="shadow"} 1.0' in metrics


async def test_canary_accuracy_from_hard_labels_aborts_a_worse_candidate(
    registry: Registry, bus: MemoryBus
) -> None:
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    settings: dict[str, Any] = {
        "rollout_mode": "canary",
        "canary_fraction": 0.5,
        "rollout_min_labels": 8,
    }
    async with serve_for_test(registry, bus, poll_interval_s=0.05, **LATE_OK, **settings) as (
        serve,
        client,
    ):
        core = serve.core
        await eventually(lambda: core.version == "v1")
        publish_bow(registry, LABELS, seed=2, bias_label=1)
        await eventually(lambda: core.rollout.current is not None)
        r = _running(core, "v2")
        await asyncio.wait_for(core.rollout.positioned.wait(), 10)
        await asyncio.wait_for(core.online.positioned.wait(), 10)

        for i in range(60):
            answer = await _ask(client, f"where is my order {i}", f"c{i}")
            await _label(bus, answer["request_id"], LABELS[0])  # v1 right, v2 wrong
            if r.state != "running":
                break
        await eventually(lambda: r.state == "aborted")
        assert core.version == "v1" and core.rollout.current is None
        assert re.match(r"accuracy_drop: v2 0\.000 over \d+ labels vs v1 1\.000", r.reason)
        # The serving-wide tracker attributes each label to the version that answered.
        await eventually(lambda: _labels(core, "v2") == r.of("v2").returned)
        v1, v2 = core.online.stats("v1"), core.online.stats("v2")
        assert v1 is not None and v2 is not None and (v1.accuracy, v2.accuracy) == (1.0, 0.0)

        # Aborted: the registry poll does not offer v2 again, a newer version does start.
        await asyncio.sleep(0.3)
        assert core.rollout.current is None and core.pin is not None
        assert (core.pin.version, core.pin.above) == ("v1", "v2")
        publish_bow(registry, LABELS, seed=4, bias_label=2)
        await eventually(lambda: core.rollout.current is not None)
        _running(core, "v3")
        assert core.pin is not None and core.version == "v1"  # the pin ends when v3 goes live


async def test_rollouts_by_the_admin_api(registry: Registry, bus: MemoryBus) -> None:
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    async with serve_for_test(
        registry, bus, poll_interval_s=0.05, admin_token=TOKEN, **LATE_OK
    ) as (
        serve,
        client,
    ):
        core = serve.core
        await eventually(lambda: core.version == "v1")
        publish_bow(registry, LABELS, seed=2, bias_label=1)  # direct mode: swapped at once
        await eventually(lambda: core.version == "v2")
        assert core.rollout.current is None

        start = {"version": "v1", "mode": "canary", "fraction": 1.0}
        url = "/v1/admin/rollout"
        for path in (url, f"{url}/promote", f"{url}/abort"):
            r = await client.post(path, json=start if path == url else {})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            r = await client.post(path, json={}, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 403
        r = await client.post(url, json={**start, "version": "v9"}, headers=AUTH)
        assert r.status_code == 404 and "v9" in r.json()["detail"]
        r = await client.post(url, json={**start, "version": "v2"}, headers=AUTH)
        assert r.status_code == 409  # the live version
        r = await client.post(url, json={**start, "fraction": 2}, headers=AUTH)
        assert r.status_code == 422
        r = await client.post(f"{url}/promote", headers=AUTH)
        assert r.status_code == 409 and core.rollout.current is None

        r = await client.post(url, json=start, headers=AUTH)
        assert r.status_code == 200 and r.json()["live"] == "v2"
        assert {(await _ask(client, f"hi {i}"))["model_version"] for i in range(5)} == {"v1"}
        r = await client.post(f"{url}/abort", json={"reason": "looks off"}, headers=AUTH)
        assert (r.status_code, r.json()) == (200, {"aborted": "v1", "serving": "v2"})
        assert core.pin is None  # an older candidate needs no pin
        assert (await _ask(client, "hi"))["model_version"] == "v2"

        r = await client.post(url, json={"version": "v1", "mode": "shadow"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["fraction"] == 1.0
        assert (await _ask(client, "hi"))["model_version"] == "v2"
        r = await client.post(f"{url}/promote", headers=AUTH)
        assert (r.status_code, r.json()) == (200, {"from": "v2", "to": "v1"})
        assert (await _ask(client, "hi"))["model_version"] == "v1"
        await asyncio.sleep(0.3)  # promoted to an older version: pinned like a rollback
        assert core.version == "v1" and core.pin is not None and core.pin.above == "v2"
        history = (await client.get("/v1/rollout")).json()["history"]
    assert [(h["version"], h["mode"], h["state"]) for h in history] == [
        ("v1", "shadow", "promoted"),
        ("v1", "canary", "aborted"),
    ]
    assert history[1]["reason"] == "manual: looks off"


async def test_admin_rollout_routes_are_off_without_a_token(registry: Registry) -> None:
    publish_bow(registry, LABELS)
    async with serve_for_test(registry, **LATE_OK) as (_, client):
        for path in ("/v1/admin/rollout", "/v1/admin/rollout/promote", "/v1/admin/rollout/abort"):
            r = await client.post(path, json={"version": "v1"}, headers=AUTH)
            assert (r.status_code, r.json()["detail"]) == (403, "admin disabled")


async def test_a_full_copy_queue_drops_and_counts(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    publish_bow(registry, LABELS, seed=2, bias_label=1)
    settings: dict[str, Any] = {"admin_token": TOKEN, "shadow_queue_size": 2}
    async with serve_for_test(registry, **LATE_OK, **settings) as (serve, client):
        core = serve.core
        await eventually(lambda: core.version == "v2")
        r = await core.rollout.begin("v1", "shadow")
        live = core.session
        assert live is not None
        dialogue = (Turn(role="user", text="where is my order"),)
        for i in range(10):  # no await between them: the copy worker cannot drain the queue
            core.rollout.answered(f"r{i}", live, LABELS[1], dialogue)
        assert r.dropped == 8
        await eventually(lambda: r.compared == 2)
        state = (await client.get("/v1/rollout")).json()["current"]
        metrics = (await client.get("/metrics")).text
    assert (state["mirror_dropped"], state["compared"], state["agreed"]) == (8, 2, 0)
    assert 'sd_mirror_dropped_total{reason="queue-full"} 8.0' in metrics


@pytest.mark.integration
async def test_canary_accuracy_from_feedback_over_the_real_broker(
    registry: Registry, broker: EmbeddedBroker, prefix: str
) -> None:
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix), broker.bootstrap)
    await bus.ensure_topics()
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    desk = {"Authorization": "Bearer desk-token"}
    settings: dict[str, Any] = {
        "rollout_mode": "canary",
        "canary_fraction": 0.5,
        "rollout_auto": False,
        "feedback_tokens": {"desk": "desk-token"},
        "admin_token": TOKEN,
    }
    async with serve_for_test(registry, bus, poll_interval_s=0.1, **LATE_OK, **settings) as (
        serve,
        client,
    ):
        core = serve.core
        await eventually(lambda: core.version == "v1")
        publish_bow(registry, LABELS, seed=2, bias_label=1)
        await eventually(lambda: core.rollout.current is not None, 20)
        r = _running(core, "v2")
        await asyncio.wait_for(core.rollout.positioned.wait(), 20)
        for i in range(16):
            rid = (await _ask(client, f"my parcel {i}", f"chat-{i}"))["request_id"]
            body = {"request_id": rid, "intent": LABELS[0]}
            resp = await client.post("/v1/feedback", json=body, headers=desk)
            assert resp.status_code == 202, resp.text
        returned = {v: r.of(v).returned for v in ("v1", "v2")}
        assert min(returned.values()) > 0 and sum(returned.values()) == 16
        await eventually(lambda: r.of("v2").accuracy.labels == returned["v2"], 20)
        await eventually(lambda: r.of("v1").accuracy.labels >= returned["v1"], 20)
        r1 = await client.post("/v1/admin/rollout/promote", headers=AUTH)
        rollout = (await client.get("/v1/rollout")).json()["history"][0]
    assert r1.json() == {"from": "v1", "to": "v2"} and core.version == "v2"
    figures = rollout["versions"]
    assert (figures["v1"]["accuracy"], figures["v2"]["accuracy"]) == (1.0, 0.0)
    assert figures["v2"]["labels"] == figures["v2"]["returned"] == returned["v2"]
