"""The hand-checked request parser and the direct ASGI path of ``POST /v1/classify``.

The parser may only ever take a body :class:`ClassifyIn` takes, with the same values;
anything else it leaves to the model (which words the 422). The direct path answers
over real HTTP as the routed app would: same limits, same refusals, same 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from stream_distill.bus.codec import decode, headers_for
from stream_distill.bus.memory import MemoryBus
from stream_distill.errors import NotReady
from stream_distill.events import RequestEvent, Turn, utc_now
from stream_distill.metrics.hooks import Hooks
from stream_distill.registry.store import Registry
from stream_distill.serving.answer import summarise
from stream_distill.serving.http import HttpServer
from stream_distill.serving.middleware import DirectApp, Raw
from stream_distill.serving.publisher import HEADERS, EventPublisher, _Answered
from stream_distill.serving.redact import redact
from stream_distill.serving.schemas import ClassifyIn, Limits, fast_classify_in
from stream_distill.testing import publish_bow, serve_for_test

LIMITS = Limits(max_text_chars=50, max_turns=3)
LABELS = ("order_status", "refund", "cancel_order", "greeting")

COMMON: list[Any] = [
    {"text": "where is my order?"},
    {"text": "hi", "conversation_id": "c1", "deadline_ms": 50, "cascade": False},
    {"text": "hi", "deadline_ms": 12.5, "cascade": True, "conversation_id": None},
    {"turns": [{"role": "user", "text": "hi"}]},
    {"turns": [{"text": "hi"}, {"role": "agent", "text": ""}, {"role": "user", "text": "x"}]},
    {"turns": [{"role": "system", "text": "be brief"}, {"role": "user", "text": "refund"}]},
    {"text": None, "turns": [{"role": "user", "text": "  ok  "}], "deadline_ms": 60000},
]
ODD: list[Any] = [
    {"text": ""},
    {"text": "   "},
    {"text": "x" * 51},
    {},
    [],
    "hi",
    None,
    {"text": 5},
    {"text": "hi", "turns": [{"role": "user", "text": "hi"}]},
    {"text": "hi", "unknown": 1},
    {"turns": []},
    {"turns": {"role": "user", "text": "hi"}},
    {"turns": [{"role": "user", "text": "hi"}, {"role": "agent", "text": "yes?"}]},
    {"turns": [{"role": "user", "text": ""}]},
    {"turns": [{"role": "user", "text": "a"}] * 4},
    {"turns": [{"role": "boss", "text": "a"}]},
    {"turns": [{"role": ["user"], "text": "a"}]},
    {"turns": [{"role": "user", "text": "a", "extra": 1}]},
    {"turns": [{"role": "user"}]},
    {"turns": [{"role": "agent", "text": "x" * 51}, {"role": "user", "text": "a"}]},
    {"turns": ["hi"]},
    {"text": "hi", "deadline_ms": -1},
    {"text": "hi", "deadline_ms": 0},
    {"text": "hi", "deadline_ms": 60001},
    {"text": "hi", "deadline_ms": "100"},  # lax pydantic takes it: the model decides
    {"text": "hi", "deadline_ms": True},
    {"text": "hi", "conversation_id": ""},
    {"text": "hi", "conversation_id": "c" * 129},
    {"text": "hi", "conversation_id": 7},
    {"text": "hi", "cascade": "yes"},
    {"text": "hi", "cascade": 1},
]


def model_args(body: bytes) -> tuple[Any, ...] | None:
    try:
        req = ClassifyIn.model_validate_json(body, context={"limits": LIMITS})
    except ValidationError:
        return None
    return req.dialogue(), req.conversation_id, req.deadline_ms, req.cascade


@pytest.mark.parametrize("payload", COMMON)
def test_common_bodies_are_parsed_as_the_model_parses_them(payload: Any) -> None:
    body = orjson.dumps(payload)
    fast = fast_classify_in(body, LIMITS)
    assert fast is not None  # the common shapes never need the model
    assert fast == model_args(body)
    assert fast[2] is None or type(fast[2]) is float


@pytest.mark.parametrize("payload", ODD)
def test_odd_bodies_are_left_to_the_model(payload: Any) -> None:
    body = orjson.dumps(payload)
    fast = fast_classify_in(body, LIMITS)
    assert fast is None or fast == model_args(body)
    if model_args(body) is None:
        assert fast is None  # never accepts what the model refuses


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b'{"text": "hi"} x', b'{"text": "\\ud800"}', b"\xff\xfe"]
)
def test_bodies_that_are_not_json_are_left_to_the_model(body: bytes) -> None:
    assert fast_classify_in(body, LIMITS) is None


async def test_odd_bodies_get_the_models_422_over_http(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, LABELS, seed=3)
    async with serve_for_test(registry, max_text_chars=50, max_turns=3) as (_, client):
        ok = await client.post("/v1/classify", json={"turns": [{"text": "where is it"}]})
        assert ok.status_code == 200, ok.text
        assert ok.headers["content-type"] == "application/json"
        assert ok.headers["content-length"] == str(len(ok.content))
        odd = await client.post("/v1/classify", json={"text": "hi", "deadline_ms": "150"})
        assert odd.status_code == 200, odd.text  # lax, as the model has always been
        bad = await client.post("/v1/classify", json={"turns": [{"role": "boss", "text": "a"}]})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["turns", 0, "role"]


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_direct_app_limits_refusals_and_errors() -> None:
    answers: list[Raw | Exception] = []

    async def handler(body: bytes) -> Raw:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    app = DirectApp()
    app.set_direct({"/direct": handler}, max_body_bytes=64)

    @app.get("/direct")
    async def routed() -> dict[str, str]:
        return {"via": "router"}

    async with HttpServer(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        answers.append((429, b'{"detail":"busy"}', ((b"retry-after", b"3"),)))
        r = await client.post("/direct", content=b"{}")
        assert (r.status_code, r.json(), r.headers["retry-after"]) == (429, {"detail": "busy"}, "3")
        r = await client.post("/direct", content=b"x" * 65)
        assert r.status_code == 413 and not answers
        r = await client.post("/direct", content=chunks(b"x" * 40, b"y" * 40))  # chunked
        assert r.status_code == 413
        assert (await client.get("/direct")).json() == {"via": "router"}
        answers.append(NotReady("boom"))
        r = await client.post("/direct", content=b"{}")
        assert r.status_code == 500 and r.text == "Internal Server Error"
        answers.append((200, b"[]", ()))
        assert (await client.post("/direct", content=b"{}")).json() == []  # still serving


@pytest.mark.parametrize("seed", range(5))
def test_request_events_are_encoded_as_the_model_encodes_them(seed: int) -> None:
    rng = np.random.default_rng(seed)
    row = rng.dirichlet(np.ones(len(LABELS))).astype(np.float32)

    class Session:
        labels = LABELS
        version = f"v{seed}"

    result = summarise(row, Session(), 3, float(rng.uniform(0, 50)), 200.0)  # type: ignore[arg-type]
    turns = (
        Turn(role="system", text="be brief"),
        Turn(role="agent", text="mail me at jane.doe@example.com ✓"),
        Turn(role="user", text='my card is 4111 1111 1111 1111, "quoted"\n'),
    )
    publisher = EventPublisher(MemoryBus().producer(), "requests", Hooks(), redact, 10)
    answered = _Answered(result, turns[seed % 3 :], f"c{seed}", utc_now())
    event = publisher._event(answered)
    assert decode(RequestEvent, publisher._encode(answered)) == event
    assert "4111" not in publisher._encode(answered).decode()  # redacted, as the model's
    assert headers_for(event) == HEADERS
