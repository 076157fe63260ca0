"""The wire contract: every event round-trips, and every kind of poison is named."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from stream_distill.bus.codec import KIND_HEADER, SCHEMA_HEADER, decode, encode, headers_for
from stream_distill.errors import PoisonRecord
from stream_distill.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    Event,
    HardLabel,
    ModelMetrics,
    ModelPublished,
    RequestEvent,
    SoftLabel,
    TeacherPublished,
    TopIntent,
    Turn,
    new_id,
    utc_now,
)

TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def _request(**kw: Any) -> RequestEvent:
    base: dict[str, Any] = dict(
        ts=TS,
        request_id="req-1",
        conversation_id="conv-1",
        turns=(Turn(role="agent", text="How can I help?"), Turn(role="user", text="refund pls")),
        served_intent="refund",
        top=(TopIntent(intent="refund", p=0.7), TopIntent(intent="greet", p=0.2)),
        entropy=0.8018,
        margin=0.5,
        model_version="v3",
        latency_ms=4.25,
    )
    base.update(kw)
    return RequestEvent(**base)


def _soft(**kw: Any) -> SoftLabel:
    base: dict[str, Any] = dict(
        ts=TS,
        request_id="req-1",
        teacher_id="teacher",
        teacher_version="abc",
        labels=("greet", "refund", "cancel"),
        label_set_version="ls1",
        logits=(0.1, 2.5, -1.0000000000000002),
        attention=(0.5, 0.25, 0.25),
    )
    base.update(kw)
    return SoftLabel(**base)


def _hard(**kw: Any) -> HardLabel:
    base: dict[str, Any] = dict(
        ts=TS, feedback_id="fb-1", request_id="req-1", intent="refund", source="agent"
    )
    base.update(kw)
    return HardLabel(**base)


def _published(**kw: Any) -> ModelPublished:
    base: dict[str, Any] = dict(
        ts=TS,
        version="v4",
        uri="file:///reg/versions/v4",
        sha256="ab" * 32,
        labels=("greet", "refund"),
        metrics=ModelMetrics(
            holdout_accuracy=0.9, teacher_agreement=0.8, examples_seen=10, steps=2
        ),
        parent="v3",
    )
    base.update(kw)
    return ModelPublished(**base)


def _teacher_published(**kw: Any) -> TeacherPublished:
    base: dict[str, Any] = dict(
        ts=TS,
        version="v2",
        teacher_id="teacher",
        teacher_version="t-0123456789ab",
        uri="file:///store/versions/v2",
        sha256="cd" * 32,
        labels=("greet", "refund", "promo"),
        label_set_version="abcdef012345",
        metrics={"old_accuracy": 0.9, "new_intent_recall": 0.75},
        parent="v1",
        reason="new_intent:promo",
    )
    base.update(kw)
    return TeacherPublished(**base)


SAMPLES: list[Event] = [_request(), _soft(), _hard(), _published(), _teacher_published()]


def _raw(event: Event) -> dict[str, Any]:
    data = json.loads(encode(event))
    assert isinstance(data, dict)
    return data


def _poison(kind: type[Event], raw: dict[str, Any] | bytes) -> str:
    value = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    with pytest.raises(PoisonRecord) as info:
        decode(kind, value)
    return str(info.value)


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.kind)
def test_round_trip_every_event_type(event: Event) -> None:
    back = decode(type(event), encode(event))
    assert back == event
    assert type(back) is type(event)
    assert back.ts == TS and back.ts.tzinfo is not None


def test_every_event_type_has_a_sample() -> None:
    assert {type(e) for e in SAMPLES} == set(EVENT_TYPES.values())
    assert set(EVENT_TYPES) == {"request", "soft-label", "hard-label", "model", "teacher-model"}


def test_round_trip_keeps_optional_fields_and_defaults() -> None:
    soft = _soft(attention=None)
    assert decode(SoftLabel, encode(soft)).attention is None
    hard = HardLabel(feedback_id="f", request_id="r", intent="x")
    back = decode(HardLabel, encode(hard))
    assert back.source == "user_confirmed" and back.principal == "anonymous"
    pub = _published(metrics=ModelMetrics(), parent=None)
    assert decode(ModelPublished, encode(pub)) == pub


def test_encoding_is_json_with_schema_version_inside() -> None:
    raw = _raw(_hard())
    assert raw == {
        "schema_version": 1,
        "ts": "2024-05-06T07:08:09.123456Z",
        "feedback_id": "fb-1",
        "request_id": "req-1",
        "intent": "refund",
        "source": "agent",
        "principal": "anonymous",
    }


def test_floats_survive_bit_for_bit() -> None:
    logits = (0.1, 1 / 3, -1.0000000000000002, 1e-300, 123456789.12345679)
    soft = _soft(labels=tuple("abcde"), logits=logits, attention=None)
    assert decode(SoftLabel, encode(soft)).logits == logits


def test_non_utc_timestamp_is_kept_as_the_same_instant() -> None:
    ts = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    back = decode(HardLabel, encode(_hard(ts=ts)))
    assert back.ts == ts
    assert back.ts.astimezone(UTC) == datetime(2024, 1, 1, 10, 0, tzinfo=UTC)


def test_headers_name_kind_and_schema() -> None:
    for event in SAMPLES:
        assert headers_for(event) == (
            (KIND_HEADER, event.kind.encode()),
            (SCHEMA_HEADER, str(SCHEMA_VERSION).encode()),
        )


def test_helpers() -> None:
    assert utc_now().tzinfo is UTC
    a, b = new_id(), new_id()
    assert a != b and len(a) == 32 and int(a, 16) >= 0


# -- poison ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"not json", b"{", b"", b"\xff\xfe\x00", b'{"a": 1} x'])
def test_not_json_is_poison(value: bytes) -> None:
    assert _poison(HardLabel, value).startswith("not JSON")


def test_deeply_nested_json_is_poison_not_a_crash() -> None:
    assert _poison(HardLabel, b"[" * 100_000).startswith("not JSON")


@pytest.mark.parametrize(
    ("value", "name"),
    [(b"[1, 2]", "list"), (b'"text"', "str"), (b"7", "int"), (b"null", "NoneType")],
)
def test_json_that_is_not_an_object_is_poison(value: bytes, name: str) -> None:
    assert _poison(HardLabel, value) == f"expected a JSON object, got {name}"


@pytest.mark.parametrize("version", [2, 0, "1", None, True, 1.0])
def test_wrong_schema_version_is_poison(version: object) -> None:
    raw = _raw(_hard())
    raw["schema_version"] = version
    assert _poison(HardLabel, raw) == f"unsupported schema_version {version!r} (want 1)"


def test_missing_schema_version_is_poison() -> None:
    raw = _raw(_hard())
    del raw["schema_version"]
    assert "unsupported schema_version None" in _poison(HardLabel, raw)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (_request(), "turns"),
        (_request(), "request_id"),
        (_soft(), "logits"),
        (_hard(), "feedback_id"),
        (_published(), "sha256"),
    ],
)
def test_missing_field_is_poison_naming_it(event: Event, field: str) -> None:
    raw = _raw(event)
    del raw[field]
    assert _poison(type(event), raw) == f"invalid {event.kind}: {field}: Field required"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_logits_are_poison(literal: str) -> None:
    # Python's json module accepts these literals (1e400 overflows to inf), so the model
    # itself must refuse them.
    value = encode(_soft()).replace(b'"logits":[0.1,', f'"logits":[{literal},'.encode())
    assert literal.encode() in value
    reason = _poison(SoftLabel, value)
    assert reason == "invalid soft-label: logits: Value error, logits must be finite"


def test_non_finite_logits_rejected_when_built_in_code() -> None:
    with pytest.raises(ValidationError, match="finite"):
        _soft(logits=(float("nan"), 0.0, 1.0))


def test_logits_width_must_match_labels() -> None:
    raw = _raw(_soft())
    raw["logits"] = [1.0, 2.0]
    assert "2 logits for 3 labels" in _poison(SoftLabel, raw)


def test_empty_labels_are_poison() -> None:
    raw = _raw(_soft())
    raw["labels"], raw["logits"] = [], []
    assert _poison(SoftLabel, raw).startswith("invalid soft-label: labels:")


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.kind)
def test_extra_field_is_poison(event: Event) -> None:
    raw = _raw(event)
    raw["surprise"] = 1
    reason = _poison(type(event), raw)
    assert reason == f"invalid {event.kind}: surprise: Extra inputs are not permitted"


def test_kind_is_not_a_field_on_the_wire() -> None:
    raw = _raw(_hard())
    assert "kind" not in raw
    raw["kind"] = "hard-label"
    assert "kind: Extra inputs are not permitted" in _poison(HardLabel, raw)


def test_extra_field_in_nested_model_is_poison() -> None:
    raw = _raw(_request())
    raw["turns"][0]["mood"] = "sad"
    assert _poison(RequestEvent, raw) == (
        "invalid request: turns.0.mood: Extra inputs are not permitted"
    )


@pytest.mark.parametrize("ts", ["2024-05-06T07:08:09", "2024-05-06T07:08:09.5"])
def test_naive_timestamp_is_poison(ts: str) -> None:
    raw = _raw(_hard())
    raw["ts"] = ts
    assert _poison(HardLabel, raw) == "invalid hard-label: ts: Input should have timezone info"


def test_naive_timestamp_rejected_when_built_in_code() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        _hard(ts=datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("margin", 1.5, "margin"),
        ("entropy", -0.1, "entropy"),
        ("latency_ms", -1.0, "latency_ms"),
        ("turns", [], "turns"),
        ("request_id", "", "request_id"),
        ("request_id", "x" * 129, "request_id"),
        ("top", [{"intent": "a", "p": 1.2}], "top.0.p"),
        ("turns", [{"role": "robot", "text": "hi"}], "turns.0.role"),
    ],
)
def test_out_of_range_request_fields_are_poison(field: str, value: object, where: str) -> None:
    raw = _raw(_request())
    raw[field] = value
    assert _poison(RequestEvent, raw).startswith(f"invalid request: {where}: ")


def test_bad_hard_label_source_and_sha_are_poison() -> None:
    raw = _raw(_hard())
    raw["source"] = "guess"
    assert _poison(HardLabel, raw).startswith("invalid hard-label: source: ")
    pub = _raw(_published())
    pub["sha256"] = "AB" * 32
    assert _poison(ModelPublished, pub).startswith("invalid model: sha256: ")


def test_decoding_as_the_wrong_kind_is_poison() -> None:
    assert _poison(SoftLabel, encode(_hard())).startswith("invalid soft-label: ")


def test_poison_keeps_the_cause() -> None:
    raw = _raw(_hard())
    raw["extra"] = 1
    with pytest.raises(PoisonRecord) as info:
        decode(HardLabel, json.dumps(raw).encode())
    assert isinstance(info.value.__cause__, ValidationError)


# -- frozen ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (_request(), "served_intent"),
        (_soft(), "logits"),
        (_hard(), "intent"),
        (_published(), "version"),
        (_request(), "ts"),
    ],
)
def test_events_are_frozen(event: Event, field: str) -> None:
    before = encode(event)
    with pytest.raises(ValidationError, match="frozen"):
        setattr(event, field, getattr(event, field))
    assert encode(event) == before


def test_nested_models_are_frozen_too() -> None:
    req = _request()
    with pytest.raises(ValidationError, match="frozen"):
        req.turns[0].text = "changed"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        req.top[0].p = 0.0  # type: ignore[misc]
    pub = _published()
    with pytest.raises(ValidationError, match="frozen"):
        pub.metrics.steps = 99  # type: ignore[misc]
    assert isinstance(req.turns, tuple) and isinstance(_soft().logits, tuple)


def test_events_are_hashable_and_compare_by_value() -> None:
    assert _hard() == _hard()
    assert hash(_hard()) == hash(_hard())
    assert _hard() != _hard(intent="greet")
