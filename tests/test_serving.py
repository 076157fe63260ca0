"""serve end to end: real ONNX files, real HTTP (uvicorn on a free port + httpx), real buses.

Hot swaps and rejected candidates are in ``test_serving_swap.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream_distill.bus.base import Topics
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings, ServeSettings
from stream_distill.events import RequestEvent, Turn
from stream_distill.metrics.prometheus import PrometheusHooks
from stream_distill.registry.store import ModelVersion, Registry
from stream_distill.serving.service import ServingCore, redact
from stream_distill.serving.session import StudentSession
from stream_distill.testing import (
    RecordingHooks,
    announce_model,
    eventually,
    publish_bow,
    serve_for_test,
)

LABELS = ("order_status", "refund", "cancel_order", "greeting")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def bus(prefix: str) -> MemoryBus:
    return MemoryBus(Topics(prefix))


def reference_probs(mv: ModelVersion, texts: list[str]) -> np.ndarray:
    session = StudentSession.from_version(mv, ServeSettings())
    return session.predict([[Turn(role="user", text=t)] for t in texts])


# -- answers --------------------------------------------------------------------------------


async def test_classify_text_and_multi_turn(registry: Registry, bus: MemoryBus) -> None:
    mv = publish_bow(registry, LABELS, seed=3)
    async with serve_for_test(registry, bus) as (_, client):
        r = await client.post("/v1/classify", json={"text": "where is my order A123?"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"request_id", "intent", "confidence", "top", "model_version",
                             "latency_ms"}  # fmt: skip
        assert body["model_version"] == "v1"
        assert body["top"][0]["intent"] == body["intent"]
        assert len(body["top"]) == 3
        ps = [t["p"] for t in body["top"]]
        assert ps == sorted(ps, reverse=True) and sum(ps) <= 1.0 + 1e-6
        want = reference_probs(mv, ["where is my order A123?"])[0]
        assert body["intent"] == LABELS[int(np.argmax(want))]
        assert body["confidence"] == pytest.approx(float(want.max()), abs=1e-6)
        assert 0 < body["latency_ms"] < 1000

        turns = [
            {"role": "user", "text": "hi"},
            {"role": "agent", "text": "hello! how can i help?"},
            {"role": "user", "text": "i want my money back, mail me at jo@example.com"},
        ]
        r = await client.post(
            "/v1/classify", json={"conversation_id": "c1", "turns": turns, "deadline_ms": 150}
        )
        assert r.status_code == 200, r.text
        multi = r.json()
        assert multi["model_version"] == "v1"

        topic = bus.topics.requests
        await eventually(lambda: len(bus.records(topic)) == 2)
    events = {decode(RequestEvent, rec.value).request_id: rec for rec in bus.records(topic)}
    rec = events[multi["request_id"]]
    event = decode(RequestEvent, rec.value)
    assert rec.key == b"c1" and event.conversation_id == "c1"
    assert [t.role for t in event.turns] == ["user", "agent", "user"]
    assert event.turns[-1].text == "i want my money back, mail me at [email]"
    assert event.served_intent == multi["intent"] and event.model_version == "v1"
    assert event.top[0].p == pytest.approx(multi["confidence"])
    assert 0 <= event.margin <= 1 and event.entropy >= 0
    single = decode(RequestEvent, events[body["request_id"]].value)
    assert single.conversation_id == body["request_id"]  # no conversation id: its own


def test_redact_masks_emails_and_card_numbers() -> None:
    assert redact("me@x.org paid 4111 1111 1111 1111") == "[email] paid [number]"
    assert redact("order A12345, last 4 digits 1234") == "order A12345, last 4 digits 1234"


@pytest.mark.parametrize(
    "payload",
    [
        {"text": ""},
        {"text": "   "},
        {"text": "x" * 51},
        {},
        {"text": "hi", "turns": [{"role": "user", "text": "hi"}]},
        {"text": "hi", "unknown": 1},
        {"turns": []},
        {"turns": [{"role": "user", "text": "hi"}, {"role": "agent", "text": "yes?"}]},
        {"turns": [{"role": "user", "text": ""}]},
        {"turns": [{"role": "user", "text": "a"}] * 4},
        {"turns": [{"role": "boss", "text": "a"}]},
        {"text": "hi", "deadline_ms": -1},
        {"text": "hi", "conversation_id": ""},
    ],
)
async def test_invalid_requests_get_422(registry: Registry, payload: dict[str, Any]) -> None:
    publish_bow(registry, LABELS)
    async with serve_for_test(registry, max_text_chars=50, max_turns=3) as (serve, client):
        assert await serve.core.wait_ready(10)
        r = await client.post("/v1/classify", json=payload)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert detail and all("msg" in d and "loc" in d for d in detail)


async def test_not_json_and_too_large_bodies(registry: Registry) -> None:
    publish_bow(registry, LABELS)
    async with serve_for_test(registry, max_body_bytes=1024) as (serve, client):
        assert await serve.core.wait_ready(10)
        r = await client.post("/v1/classify", content=b"{not json")
        assert r.status_code == 422
        r = await client.post("/v1/classify", json={"text": "y" * 2000})
        assert r.status_code == 413, "Content-Length over the limit"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
            yield b'{"text": "'
            for _ in range(10):
                yield b"z" * 200
            yield b'"}'

        r = await client.post("/v1/classify", content=chunks())
        assert r.status_code == 413, "streamed body over the limit"
        r = await client.post("/v1/classify", json={"text": "still fine"})
        assert r.status_code == 200


async def test_ready_only_once_a_model_is_loaded(registry: Registry) -> None:
    async with serve_for_test(registry) as (serve, client):
        assert (await client.get("/v2/health/live")).status_code == 200
        r = await client.get("/v2/health/ready")
        assert r.status_code == 503
        r = await client.post("/v1/classify", json={"text": "hello"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert (await client.get("/v1/models")).json()["serving"] is None

        mv = publish_bow(registry, LABELS)  # the registry poll finds it
        await eventually(lambda: serve.core.ready)
        r = await client.get("/v2/health/ready")
        assert r.status_code == 200 and r.json()["model_version"] == "v1"
        r = await client.post("/v1/classify", json={"text": "hello"})
        assert r.status_code == 200 and r.json()["model_version"] == "v1"
        models = (await client.get("/v1/models")).json()
        assert models["serving"] == {"version": "v1", "sha256": mv.sha256, "labels": list(LABELS)}
        assert [(m["version"], m["sha256"]) for m in models["loaded"]] == [("v1", mv.sha256)]
        metrics = (await client.get("/metrics")).text
        assert 'sd_requests_total{outcome="ok"} 1.0' in metrics
        assert 'sd_requests_total{outcome="shed"} 1.0' in metrics
        assert 'sd_model_info{version="v1"} 1.0' in metrics
        assert "sd_model_swaps_total 1.0" in metrics


async def test_bus_down_never_fails_a_request(registry: Registry, bus: MemoryBus) -> None:
    publish_bow(registry, LABELS)
    hooks = RecordingHooks()
    async with serve_for_test(registry, bus, hooks=hooks) as (serve, client):
        assert await serve.core.wait_ready(10)
        bus.log.down = True
        for _ in range(5):
            assert (await client.post("/v1/classify", json={"text": "hi"})).status_code == 200
        await eventually(lambda: len(hooks.named("on_event_dropped")) == 5)
        bus.log.down = False
    assert hooks.named("on_event_dropped") == [("bus-error",)] * 5


class StuckProducer:
    """A producer whose broker never answers."""

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> StuckProducer:
        return self

    async def __aexit__(self, *exc: object) -> None: ...
    async def send(self, topic: str, value: bytes, **kw: Any) -> tuple[int, int]:
        await asyncio.Event().wait()
        raise AssertionError


async def test_full_event_queue_drops_events(registry: Registry) -> None:
    publish_bow(registry, LABELS)
    hooks = RecordingHooks()
    core = ServingCore(registry, ServeSettings(event_queue_size=2), hooks, producer=StuckProducer())
    await core.start()
    try:
        assert await core.wait_ready(10)
        turns = [Turn(role="user", text="hello")]
        for _ in range(5):  # the first is taken by the stuck publisher, two wait in the queue
            await core.classify(turns, "c1")
            await asyncio.sleep(0.01)
        assert hooks.named("on_event_dropped") == [("queue-full",), ("queue-full",)]
    finally:
        await core.aclose(drain_timeout_s=0.1)


def test_prometheus_hooks_cover_every_hook_on_their_own_registry() -> None:
    a, b = PrometheusHooks(CollectorRegistry()), PrometheusHooks(CollectorRegistry())
    a.on_request("ok", 3.0, "v1")
    a.on_request("deadline", 250.0, "v1")
    a.on_batch(4)
    a.on_swap("v2", 0.2, ok=True)
    a.on_swap("v3", 0.1, ok=False, reason="integrity: v3/model.onnx sha256 differs")
    a.on_model_serving("v1")
    a.on_model_serving("v2")
    a.on_event_dropped("queue-full")
    a.on_feedback("accepted")
    a.on_dead_letter("sd.models", "not JSON: Expecting value")
    a.on_teacher_batch(16, 0.05)
    a.on_train_step({"kd": 0.7, "ce": 0.4}, 32, 0.02)
    a.on_publish("v2", accepted=True)
    a.on_consumer_lag("teacher", 12)
    text = generate_latest(a.registry).decode()
    for line in (
        'sd_requests_total{outcome="deadline"} 1.0',
        "sd_deadline_misses_total 1.0",
        'sd_request_latency_seconds_bucket{le="0.0005",outcome="ok"} 0.0',
        'sd_request_latency_seconds_bucket{le="0.005",outcome="ok"} 1.0',
        'sd_request_latency_seconds_bucket{le="1.0",outcome="deadline"} 1.0',
        "sd_batch_size_sum 4.0",
        "sd_model_swaps_total 1.0",
        'sd_model_swap_failures_total{reason="integrity"} 1.0',
        "sd_model_swap_duration_seconds_count 2.0",
        'sd_model_info{version="v2"} 1.0',
        'sd_events_dropped_total{reason="queue-full"} 1.0',
        'sd_feedback_total{result="accepted"} 1.0',
        'sd_dead_letters_total{reason="not_json",topic="sd.models"} 1.0',
        "sd_teacher_scored_total 16.0",
        "sd_teacher_batch_seconds_count 1.0",
        "sd_trainer_steps_total 1.0",
        'sd_trainer_loss{component="kd"} 0.7',
        "sd_trainer_examples_total 32.0",
        'sd_publishes_total{result="accepted"} 1.0',
        'sd_consumer_lag{role="teacher"} 12.0',
    ):
        assert line in text, line
    assert 'sd_model_info{version="v1"}' not in text  # only the serving version
    assert "sd_requests_total{" not in generate_latest(b.registry).decode()


def test_serving_imports_no_torch() -> None:
    code = (
        "import stream_distill.serving.http, stream_distill.serving.service, "
        "stream_distill.serving.runner, stream_distill.feedback.collector, sys; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.integration
async def test_over_the_real_broker(
    registry: Registry, broker: EmbeddedBroker, prefix: str
) -> None:
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix), broker.bootstrap)
    await bus.ensure_topics()
    publish_bow(registry, LABELS, seed=1, bias_label=0)
    async with serve_for_test(registry, bus, poll_interval_s=60) as (serve, client):
        assert await serve.core.wait_ready(10)
        ids = set()
        for i in range(5):
            r = await client.post(
                "/v1/classify",
                json={"conversation_id": f"c{i % 2}", "turns": [{"text": f"hi {i}"}]},
            )
            assert r.status_code == 200
            ids.add(r.json()["request_id"])
        v2 = publish_bow(registry, LABELS, seed=2, bias_label=1)
        async with bus.producer() as producer:
            await announce_model(producer, bus.topics, v2)
        await eventually(lambda: serve.core.version == "v2", 20)
        r = await client.post("/v1/classify", json={"text": "after"})
        assert (r.json()["model_version"], r.json()["intent"]) == ("v2", LABELS[1])

    got: dict[str, RequestEvent] = {}
    async with bus.consumer([bus.topics.requests]) as consumer:
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while len(got) < 6 and loop.time() < end:
            for rec in await consumer.getmany(timeout_ms=200):
                event = decode(RequestEvent, rec.value)
                assert rec.key == event.conversation_id.encode()
                got[event.request_id] = event
    assert ids <= set(got) and len(got) == 6
    assert {e.model_version for e in got.values()} == {"v1", "v2"}
    assert json.loads(rec.value)["schema_version"] == 1
