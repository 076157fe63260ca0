"""The feedback-raw topic on the real broker: inside serve, and as the standalone role."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from stream_distill import app
from stream_distill.bus.base import Headers, Record, Topics
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings, RegistrySettings, ServeSettings, Settings
from stream_distill.events import HardLabel
from stream_distill.feedback.collector import FeedbackCollector
from stream_distill.feedback.raw import GROUP_ID, BadFeedback, RawFeedbackConsumer, parse
from stream_distill.registry.store import Registry
from stream_distill.testing import eventually, publish_bow, serve_for_test

INTENTS = ("refund_request", "delivery_delay", "greeting")


async def read_all(bus: KafkaBus, topic: str, want: int, timeout_s: float = 15.0) -> list[Record]:
    records: list[Record] = []
    async with bus.consumer([topic]) as consumer:
        end = asyncio.get_running_loop().time() + timeout_s
        while len(records) < want and asyncio.get_running_loop().time() < end:
            records += await consumer.getmany(timeout_ms=200)
        records += await consumer.getmany(timeout_ms=300)  # nothing more should come
    return records


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.integration
async def test_raw_feedback_inside_serve_validates_and_dead_letters(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix), broker.bootstrap)
    await bus.ensure_topics()
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, INTENTS, seed=1)
    async with serve_for_test(
        registry,
        bus,
        feedback_consume_raw=True,
        feedback_group_id=f"{prefix}feedback",  # a group of its own on the shared broker
        feedback_intent_admins=("curators",),
        feedback_tokens={"bot": SecretStr("t")},
    ) as (serve, client):
        await eventually(lambda: serve.core.ready)
        r = await client.post("/v1/classify", json={"text": "my parcel is late"})
        rid = r.json()["request_id"]
        by_header: Headers = (("sd-principal", b"chatbot"),)
        sends: list[tuple[bytes, Headers]] = [
            (raw({"request_id": rid, "intent": "greeting", "principal": "chatbot"}), ()),
            (
                raw({"feedback_id": "fb-h", "request_id": rid, "intent": "delivery_delay"}),
                by_header,
            ),
            (
                raw({"feedback_id": "fb-h", "request_id": rid, "intent": "delivery_delay"}),
                by_header,
            ),
            (raw({"request_id": rid, "intent": "weather", "principal": "curators"}), ()),
            (raw({"request_id": rid, "intent": "weather", "principal": "chatbot"}), ()),
            (raw({"request_id": "not-served", "intent": "greeting", "principal": "chatbot"}), ()),
            (raw({"request_id": rid, "intent": "greeting"}), ()),
            (raw({"request_id": rid, "intent": "greeting", "principal": "x", "why": 1}), ()),
            (b"{not json", ()),
        ]
        async with bus.producer() as producer:
            for value, headers in sends:
                # one key: one partition, so the topic's order is the order sent
                await producer.send(bus.topics.feedback_raw, value, key=b"k", headers=headers)
        labels = await read_all(bus, bus.topics.hard_labels, 3)
        dead = await read_all(bus, bus.topics.dead_letters, 5)
    got = [decode(HardLabel, r.value) for r in labels]
    assert [(x.intent, x.principal) for x in got] == [
        ("greeting", "chatbot"),
        ("delivery_delay", "chatbot"),
        ("weather", "curators"),
    ]
    assert got[1].feedback_id == "fb-h" and got[0].feedback_id.startswith(f"raw-{prefix}")
    errors = [dict(r.headers)["sd-error"].decode() for r in dead]
    assert [e.split(":")[0] for e in errors] == [
        "unknown_intent",
        "unknown_request",
        "invalid",
        "invalid",
        "poison",
    ]
    assert "may not add intents" in errors[0] and "not-served" in errors[1]
    assert "principal" in errors[2] and "why" in errors[3]
    assert {dict(r.headers)["sd-original-topic"] for r in dead} == {
        bus.topics.feedback_raw.encode()
    }


@pytest.mark.integration
async def test_standalone_feedback_role_checks_intents_against_the_registry(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, INTENTS, seed=1)
    settings = Settings(
        kafka=KafkaSettings(topic_prefix=prefix, bootstrap_servers=broker.bootstrap),
        registry=RegistrySettings(root=str(tmp_path / "registry")),
        serve=ServeSettings(feedback_unknown_request="reject", feedback_group_id=f"{prefix}fb"),
    )
    bus = app.make_bus(settings)
    await bus.ensure_topics()
    async with bus.producer() as producer:
        for intent in ("refund_request", "weather"):
            body = {"request_id": "r1", "intent": intent, "principal": "chatbot"}
            await producer.send(bus.topics.feedback_raw, raw(body), key=b"k")
    stop = asyncio.Event()
    role = asyncio.create_task(app.run_feedback(settings, stop))
    try:
        labels = await read_all(bus, bus.topics.hard_labels, 1)
        dead = await read_all(bus, bus.topics.dead_letters, 1)
    finally:
        stop.set()
        await asyncio.wait_for(role, 10.0)
    # without serve no request ids are known: that check is skipped, intents still apply
    assert [decode(HardLabel, r.value).intent for r in labels] == ["refund_request"]
    (letter,) = dead
    assert dict(letter.headers)["sd-error"].startswith(b"unknown_intent:")


async def test_offsets_are_committed_once_labels_are_acknowledged(prefix: str) -> None:
    bus = MemoryBus(Topics(prefix))
    async with bus.producer() as producer:
        collector = FeedbackCollector(producer, bus.topics, ServeSettings())
        for intent in ("greeting", ""):
            body = {"request_id": "r1", "intent": intent, "principal": "chatbot"}
            await producer.send(bus.topics.feedback_raw, raw(body), key=b"k")
        consumer = RawFeedbackConsumer(bus, collector)
        await consumer.start()
        await eventually(lambda: consumer.accepted + consumer.dead_lettered == 2)
        await consumer.aclose()
    assert (consumer.accepted, consumer.dead_lettered) == (1, 1)
    # a restarted member of the group starts after both: nothing is handled twice
    async with bus.consumer([bus.topics.feedback_raw], group_id=GROUP_ID) as again:
        assert await again.getmany(timeout_ms=100) == []
    assert (
        len(bus.records(bus.topics.hard_labels)) == len(bus.records(bus.topics.dead_letters)) == 1
    )


@pytest.mark.parametrize(
    ("value", "headers", "kind"),
    [
        (b"[1, 2]", (), "poison"),
        (b"\xff", (), "poison"),
        (raw({"request_id": "r", "intent": "i", "principal": " "}), (), "invalid"),
        (raw({"request_id": "r", "intent": "", "principal": "p"}), (), "invalid"),
        (raw({"request_id": "r", "intent": "i", "principal": 7}), (), "invalid"),
    ],
)
def test_parse_refuses_what_is_not_feedback(value: bytes, headers: Headers, kind: str) -> None:
    record = Record("t", 0, 5, None, value, headers)
    with pytest.raises(BadFeedback) as refused:
        parse(record)
    assert refused.value.kind == kind


def test_parse_field_principal_wins_over_the_header() -> None:
    body = raw({"request_id": "r", "intent": "i", "principal": "field"})
    principal, fb = parse(Record("t", 2, 9, None, body, (("sd-principal", b"header"),)))
    assert (principal, fb.feedback_id) == ("field", "raw-t-2-9")
