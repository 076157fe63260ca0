"""Redaction: personal data never reaches Kafka, while answers use the words as said."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import KafkaSettings, ServeSettings
from stream_distill.errors import ConfigError
from stream_distill.events import RequestEvent, Turn
from stream_distill.registry.store import Registry
from stream_distill.serving.redact import Redactor, redact
from stream_distill.serving.session import StudentSession
from stream_distill.testing import publish_bow, serve_for_test

LABELS = ("order_status", "refund", "cancel_order", "greeting")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("mail jo.smith+shop@mail.example.co.uk now", "mail [email] now"),
        ("card 4111 1111 1111 1111 please", "card [number] please"),
        ("card 4111-1111-1111-1111", "card [number]"),
        ("card 4111111111111111.", "card [number]."),
        ("call +44 20 7946 0958 today", "call [phone] today"),
        ("call (555) 123-4567", "call [phone]"),
        ("ring 555.123.4567 or 07911 123456", "ring [phone] or [phone]"),
        ("tel:+1-202-555-0143", "tel:[phone]"),
        # not personal: order ids (unless configured), short numbers, dates, times, amounts
        ("order A12345, last 4 digits 1234", "order A12345, last 4 digits 1234"),
        (
            "delivered 2024-05-01 at 12:30, 1 200 points",
            "delivered 2024-05-01 at 12:30, 1 200 points",
        ),
        ("it cost 129.99 and 3 items", "it cost 129.99 and 3 items"),
    ],
)
def test_default_rules(text: str, want: str) -> None:
    assert redact(text) == want


def test_order_ids_and_custom_patterns_are_configurable() -> None:
    settings = ServeSettings(
        redact_order_ids=(r"#?\b[A-Z]\d{5}\b",),
        redact_patterns={"postcode": r"\b[A-Z]{1,2}\d[A-Z\d]? \d[A-Z]{2}\b"},
    )
    r = Redactor.from_settings(settings)
    text = "order #A12345 to SW1A 1AA, mail a@b.io, call 020 7946 0958"
    assert r(text) == "order [order] to [postcode], mail [email], call [phone]"
    assert r.marks == ("[email]", "[order]", "[postcode]", "[number]", "[phone]")


def test_each_rule_can_be_switched_off() -> None:
    text = "a@b.io 4111 1111 1111 1111 +44 20 7946 0958"
    off = ServeSettings(redact_emails=False, redact_cards=False, redact_phones=False)
    assert Redactor.from_settings(off)(text) == text
    only_cards = ServeSettings(redact_emails=False, redact_phones=False)
    assert Redactor.from_settings(only_cards)(text) == "a@b.io [number] +44 20 7946 0958"


@pytest.mark.parametrize("hostile", ["1" * 20_000 + "a", "1-" * 10_000 + "x", ".1" * 10_000 + "x"])
def test_hostile_text_is_redacted_in_linear_time(hostile: str) -> None:
    t0 = time.perf_counter()
    redact(hostile)
    assert time.perf_counter() - t0 < 0.5  # quadratic backtracking would take seconds


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("redact_order_ids", ("[unclosed",), "invalid regex"),
        ("redact_order_ids", (r"\d*",), "matches the empty string"),
        ("redact_patterns", {"bad name": "x"}, "is not a word"),
    ],
)
def test_unusable_patterns_fail_at_startup(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Redactor.from_settings(ServeSettings.model_validate({field: value}))


@pytest.mark.integration
async def test_events_on_kafka_are_redacted_but_answers_use_the_original(
    tmp_path: Path, broker: EmbeddedBroker, prefix: str
) -> None:
    registry = Registry(tmp_path / "registry")
    mv = publish_bow(registry, LABELS, seed=3)
    said = "refund order #B54321 to jo@example.com, card 4111 1111 1111 1111, call 020 7946 0958"
    masked = "refund order [order] to [email], card [number], call [phone]"
    session = StudentSession.from_version(mv, ServeSettings())
    ask = Turn(role="agent", text="mail?")
    want, redacted = session.predict([[ask, Turn(role="user", text=t)] for t in (said, masked)])
    assert np.abs(want - redacted).max() > 1e-3  # the two texts answer differently
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix), broker.bootstrap)
    await bus.ensure_topics()
    settings = {"redact_order_ids": (r"#[A-Z]\d{5}",), "top_k": 4}
    async with serve_for_test(registry, bus, **settings) as (serve, client):
        assert await serve.core.wait_ready(10)
        r = await client.post(
            "/v1/classify",
            json={"conversation_id": "c9", "turns": [{"role": "agent", "text": "mail?"},
                                                     {"role": "user", "text": said}]},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        got = {t["intent"]: t["p"] for t in r.json()["top"]}
        assert got == pytest.approx(
            {lb: float(p) for lb, p in zip(LABELS, want, strict=True)}, abs=1e-5
        )
    events: list[RequestEvent] = []
    async with bus.consumer([bus.topics.requests]) as consumer:
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        while not events and loop.time() < end:
            events += [
                decode(RequestEvent, rec.value) for rec in await consumer.getmany(timeout_ms=200)
            ]
    (event,) = events
    assert event.request_id == r.json()["request_id"]
    assert [t.text for t in event.turns] == ["mail?", masked]
