"""POST /v1/feedback over real HTTP: auth, validation, acknowledgement, de-duplication."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from stream_distill.bus.base import Topics
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings, ServeSettings
from stream_distill.events import HardLabel
from stream_distill.feedback.collector import FeedbackCollector, FeedbackIn
from stream_distill.registry.store import Registry
from stream_distill.serving.runner import run_serve

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# These tests run serve without a model: no request id is ever answered, so accept unknown
# ones (the request-id and intent policy is tested in test_feedback_policy.py).
SETTINGS = ServeSettings(
    feedback_tokens={"agent-desk": SecretStr(TOKEN), "annotators": SecretStr("other-token")},
    feedback_unknown_request="accept",
)


@pytest.fixture
def bus(prefix: str) -> MemoryBus:
    return MemoryBus(Topics(prefix))


@contextlib.asynccontextmanager
async def client_for(
    bus: Any, tmp_path: Path, settings: ServeSettings = SETTINGS
) -> AsyncIterator[httpx.AsyncClient]:
    registry = Registry(tmp_path / "registry")  # feedback needs no model
    async with (
        run_serve(registry, settings, bus, port=0) as serve,
        httpx.AsyncClient(base_url=serve.url, timeout=20.0) as client,
    ):
        yield client


def labels_on(bus: MemoryBus) -> list[HardLabel]:
    return [decode(HardLabel, r.value) for r in bus.records(bus.topics.hard_labels)]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},
    ],
)
async def test_unauthenticated_feedback_is_refused_and_not_written(
    bus: MemoryBus, tmp_path: Path, headers: dict[str, str]
) -> None:
    async with client_for(bus, tmp_path) as client:
        r = await client.post(
            "/v1/feedback", json={"request_id": "r1", "intent": "refund"}, headers=headers
        )
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
    assert bus.records(bus.topics.hard_labels) == []


async def test_accepted_feedback_is_a_hard_label_on_the_bus(bus: MemoryBus, tmp_path: Path) -> None:
    async with client_for(bus, tmp_path) as client:
        r = await client.post(
            "/v1/feedback",
            json={"request_id": "r1", "intent": "refund", "source": "agent"},
            headers=AUTH,
        )
        assert r.status_code == 202, r.text
        body = r.json()
        r2 = await client.post(
            "/v1/feedback",
            json={"request_id": "r2", "intent": "greeting"},
            headers={"Authorization": "bearer other-token"},
        )
        assert r2.status_code == 202
    assert body["duplicate"] is False and body["feedback_id"]
    (rec, rec2) = sorted(bus.records(bus.topics.hard_labels), key=lambda r: r.key or b"")
    label = decode(HardLabel, rec.value)
    assert rec.key == b"r1"
    assert (label.feedback_id, label.request_id, label.intent) == (
        body["feedback_id"],
        "r1",
        "refund",
    )
    assert (label.source, label.principal) == ("agent", "agent-desk")
    assert decode(HardLabel, rec2.value).principal == "annotators"
    assert decode(HardLabel, rec2.value).source == "user_confirmed"


async def test_duplicate_feedback_is_written_once(bus: MemoryBus, tmp_path: Path) -> None:
    payload = {"feedback_id": "fb-1", "request_id": "r1", "intent": "refund"}
    async with client_for(bus, tmp_path) as client:
        first = await client.post("/v1/feedback", json=payload, headers=AUTH)
        again = await client.post("/v1/feedback", json=payload, headers=AUTH)
        burst = await asyncio.gather(
            *(
                client.post("/v1/feedback", json={**payload, "feedback_id": "fb-2"}, headers=AUTH)
                for _ in range(10)
            )
        )
    assert first.status_code == again.status_code == 202
    assert first.json() == {"feedback_id": "fb-1", "duplicate": False}
    assert again.json() == {"feedback_id": "fb-1", "duplicate": True}
    assert all(r.status_code == 202 for r in burst)
    assert sorted(r.json()["duplicate"] for r in burst) == [False] + [True] * 9
    assert sorted(label.feedback_id for label in labels_on(bus)) == ["fb-1", "fb-2"]


@pytest.mark.parametrize(
    "payload",
    [
        {"request_id": "r1", "intent": ""},
        {"request_id": "r1", "intent": "x" * 101},
        {"request_id": "r1"},
        {"intent": "refund"},
        {"request_id": "r1", "intent": "refund", "source": "guess"},
        {"request_id": "r1", "intent": "refund", "extra": True},
    ],
)
async def test_invalid_feedback_gets_422(
    bus: MemoryBus, tmp_path: Path, payload: dict[str, Any]
) -> None:
    async with client_for(bus, tmp_path) as client:
        r = await client.post("/v1/feedback", json=payload, headers=AUTH)
        assert r.status_code == 422, r.text
    assert bus.records(bus.topics.hard_labels) == []


async def test_broker_failure_is_503_and_a_retry_succeeds(bus: MemoryBus, tmp_path: Path) -> None:
    payload = {"feedback_id": "fb-9", "request_id": "r9", "intent": "refund"}
    async with client_for(bus, tmp_path) as client:
        bus.log.down = True
        r = await client.post("/v1/feedback", json=payload, headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        bus.log.down = False
        r = await client.post("/v1/feedback", json=payload, headers=AUTH)
        assert r.status_code == 202 and r.json()["duplicate"] is False
    assert [label.feedback_id for label in labels_on(bus)] == ["fb-9"]


async def test_without_tokens_feedback_is_open_to_anonymous(bus: MemoryBus, tmp_path: Path) -> None:
    async with client_for(
        bus, tmp_path, ServeSettings(feedback_unknown_request="accept")
    ) as client:
        r = await client.post("/v1/feedback", json={"request_id": "r1", "intent": "refund"})
        assert r.status_code == 202
    assert [label.principal for label in labels_on(bus)] == ["anonymous"]


async def test_dedup_memory_is_bounded(bus: MemoryBus) -> None:
    collector = FeedbackCollector(bus.producer(), bus.topics, SETTINGS, dedup_capacity=2)
    for fid in ("a", "b", "c"):
        await collector.submit("p", FeedbackIn(feedback_id=fid, request_id="r", intent="i"))
    assert (
        await collector.submit("p", FeedbackIn(feedback_id="c", request_id="r", intent="i"))
    ).duplicate
    # "a" was evicted: it is written again (the trainer de-duplicates what gets this far)
    assert not (
        await collector.submit("p", FeedbackIn(feedback_id="a", request_id="r", intent="i"))
    ).duplicate
    assert len(labels_on(bus)) == 4


@pytest.mark.integration
async def test_feedback_over_the_real_broker(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix), broker.bootstrap)
    await bus.ensure_topics()
    async with client_for(bus, tmp_path) as client:
        r = await client.post(
            "/v1/feedback",
            json={"feedback_id": "fk-1", "request_id": "r7", "intent": "refund"},
            headers=AUTH,
        )
        assert r.status_code == 202
    async with bus.consumer([bus.topics.hard_labels]) as consumer:
        records = []
        for _ in range(50):
            records += await consumer.getmany(timeout_ms=200)
            if records:
                break
    (rec,) = records
    label = decode(HardLabel, rec.value)
    assert rec.key == b"r7" and (label.feedback_id, label.principal) == ("fk-1", "agent-desk")
