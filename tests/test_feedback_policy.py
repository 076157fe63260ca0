"""Feedback policy over real HTTP and a real ONNX model: request ids, intents, rate limit."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from stream_distill.bus.base import Topics
from stream_distill.bus.codec import decode
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import ServeSettings
from stream_distill.errors import RateLimited, UnknownIntent, UnknownRequest
from stream_distill.events import HardLabel
from stream_distill.feedback.collector import FeedbackCollector, FeedbackIn
from stream_distill.feedback.known import KnownRequests
from stream_distill.registry.store import Registry
from stream_distill.serving.runner import RunningServe
from stream_distill.testing import RecordingHooks, eventually, publish_bow, serve_for_test

INTENTS = ("refund_request", "delivery_delay", "greeting")
AGENT = {"Authorization": "Bearer agent-token"}
ADMIN = {"Authorization": "Bearer admin-token"}
TOKENS = {"agent-desk": SecretStr("agent-token"), "curators": SecretStr("admin-token")}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def live(
    tmp_path: Path, prefix: str, **settings: Any
) -> AsyncIterator[tuple[RunningServe, httpx.AsyncClient, MemoryBus]]:
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, INTENTS, seed=1)
    bus = MemoryBus(Topics(prefix))
    settings = {"feedback_tokens": TOKENS, "feedback_intent_admins": ("curators",)} | settings
    async with serve_for_test(registry, bus, **settings) as (serve, client):
        await eventually(lambda: serve.core.ready)
        yield serve, client, bus


def labels_on(bus: MemoryBus) -> list[HardLabel]:
    return [decode(HardLabel, r.value) for r in bus.records(bus.topics.hard_labels)]


async def classify(client: httpx.AsyncClient) -> str:
    r = await client.post("/v1/classify", json={"text": "where is my parcel"})
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


async def test_feedback_on_an_answered_request_is_accepted_an_unknown_one_is_404(
    tmp_path: Path, prefix: str
) -> None:
    async with live(tmp_path, prefix) as (_, client, bus):
        request_id = await classify(client)
        ok = await client.post(
            "/v1/feedback", json={"request_id": request_id, "intent": "greeting"}, headers=AGENT
        )
        unknown = await client.post(
            "/v1/feedback", json={"request_id": "never-served", "intent": "greeting"}, headers=AGENT
        )
    assert ok.status_code == 202, ok.text
    assert unknown.status_code == 404
    assert "never-served" in unknown.json()["detail"]
    assert "join window" in unknown.json()["detail"]
    assert [(x.request_id, x.intent) for x in labels_on(bus)] == [(request_id, "greeting")]


async def test_accept_policy_takes_unknown_request_ids_but_still_checks_intents(
    tmp_path: Path, prefix: str
) -> None:
    async with live(tmp_path, prefix, feedback_unknown_request="accept") as (_, client, bus):
        body = {"request_id": "other-replica", "intent": "refund_request"}
        elsewhere = await client.post("/v1/feedback", json=body, headers=AGENT)
        bad = await client.post(
            "/v1/feedback", json={"request_id": "other-replica", "intent": "weather"}, headers=AGENT
        )
    assert elsewhere.status_code == 202, elsewhere.text
    assert bad.status_code == 422 and "weather" in bad.json()["detail"]
    assert [(x.request_id, x.intent) for x in labels_on(bus)] == [
        ("other-replica", "refund_request")
    ]


async def test_new_intents_only_from_intent_admins(tmp_path: Path, prefix: str) -> None:
    async with live(tmp_path, prefix) as (_, client, bus):
        request_id = await classify(client)
        body = {"request_id": request_id, "intent": "cancel_subscription"}
        refused = await client.post("/v1/feedback", json=body, headers=AGENT)
        added = await client.post("/v1/feedback", json=body, headers=ADMIN)
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert "cancel_subscription" in detail and "may not add intents" in detail
    assert added.status_code == 202, added.text
    (label,) = labels_on(bus)
    assert (label.intent, label.principal) == ("cancel_subscription", "curators")


async def test_rate_limit_per_principal_is_429_with_retry_after(
    tmp_path: Path, prefix: str
) -> None:
    async with live(tmp_path, prefix, feedback_rate_per_s=0.2, feedback_burst=2) as (
        _,
        client,
        bus,
    ):
        request_id = await classify(client)
        body = {"request_id": request_id, "intent": "greeting"}
        codes = [(await client.post("/v1/feedback", json=body, headers=AGENT)) for _ in range(3)]
        other = await client.post("/v1/feedback", json=body, headers=ADMIN)
    assert [r.status_code for r in codes] == [202, 202, 429]
    assert 4 <= int(codes[2].headers["retry-after"]) <= 5  # one token at 0.2/s
    assert other.status_code == 202  # buckets are per principal
    assert len(labels_on(bus)) == 3


def test_token_bucket_refills_with_the_clock() -> None:
    clock = FakeClock()
    hooks = RecordingHooks()
    settings = ServeSettings(feedback_rate_per_s=2.0, feedback_burst=3)
    collector = FeedbackCollector(MemoryBus().producer(), Topics(), settings, hooks, clock=clock)
    for _ in range(3):
        collector.admit("p")
    with pytest.raises(RateLimited) as refused:
        collector.admit("p")
    assert refused.value.retry_after_s == pytest.approx(0.5)
    clock.now += 0.5
    collector.admit("p")  # one token back after 1 / rate seconds
    with pytest.raises(RateLimited):
        collector.admit("p")
    clock.now += 60
    for _ in range(3):  # never more than the burst
        collector.admit("p")
    with pytest.raises(RateLimited):
        collector.admit("p")
    assert hooks.named("on_feedback") == [("rate_limited",)] * 3


def test_known_requests_are_bounded_by_size_and_age() -> None:
    clock = FakeClock()
    known = KnownRequests(capacity=2, ttl_s=10.0, clock=clock)
    known.record("a", "v1", INTENTS)
    known.record("b", "v1", INTENTS)
    known.record("c", "v2", INTENTS[:2])
    assert known.get("a") is None and len(known) == 2
    served = known.get("c")
    assert served is not None and (served.model_version, served.labels) == ("v2", INTENTS[:2])
    clock.now += 9.9
    known.record("d", "v2", INTENTS)
    assert known.get("c") is not None
    clock.now += 0.2
    assert known.get("b") is None and known.get("c") is None and known.get("d") is not None


async def test_the_join_window_expires_but_a_retry_stays_a_duplicate() -> None:
    clock = FakeClock()
    bus = MemoryBus()
    known = KnownRequests(ttl_s=60.0, clock=clock)
    collector = FeedbackCollector(bus.producer(), bus.topics, ServeSettings(), known=known)
    known.record("r1", "v1", INTENTS)
    known.record("r2", "v1", INTENTS)
    first = await collector.submit(
        "p", FeedbackIn(feedback_id="f1", request_id="r1", intent="greeting")
    )
    # the intent is checked against the labels of the model that answered, not today's
    with pytest.raises(UnknownIntent):
        await collector.submit("p", FeedbackIn(request_id="r2", intent="weather"))
    clock.now += 61
    retry = await collector.submit(
        "p", FeedbackIn(feedback_id="f1", request_id="r1", intent="greeting")
    )
    with pytest.raises(UnknownRequest):
        await collector.submit("p", FeedbackIn(request_id="r2", intent="greeting"))
    assert not first.duplicate and retry.duplicate
    assert [
        decode(HardLabel, r.value).feedback_id for r in bus.records(bus.topics.hard_labels)
    ] == ["f1"]
