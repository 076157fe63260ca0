"""stream_distill.client against a live serve (real uvicorn, real ONNX) and scripted stubs.

The stubs (``httpx.MockTransport``) script 429/503 sequences to time the retries;
a listening socket that never answers checks that the deadline holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from stream_distill.bus.base import Topics
from stream_distill.bus.codec import decode
from stream_distill.bus.memory import MemoryBus
from stream_distill.client import (
    AsyncClient,
    Classification,
    Client,
    ClientError,
    DeadlineExceeded,
    Unauthorized,
    Unavailable,
)
from stream_distill.data.synthetic import INTENTS
from stream_distill.events import HardLabel, RequestEvent, Turn
from stream_distill.registry.store import Registry
from stream_distill.serving.runner import RunningServe
from stream_distill.testing import eventually, publish_bow, serve_for_test

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bot-token"
ANSWER = {
    "request_id": "r1",
    "intent": "refund_request",
    "confidence": 0.9,
    "top": [{"intent": "refund_request", "p": 0.9}, {"intent": "return_item", "p": 0.05}],
    "model_version": "v7",
    "latency_ms": 1.5,
}


@dataclass
class Live:
    serve: RunningServe
    bus: MemoryBus
    registry: Registry

    @property
    def url(self) -> str:
        return self.serve.url

    def hard_labels(self) -> list[HardLabel]:
        return [decode(HardLabel, r.value) for r in self.bus.records(self.bus.topics.hard_labels)]

    def requests(self) -> list[RequestEvent]:
        return [decode(RequestEvent, r.value) for r in self.bus.records(self.bus.topics.requests)]


@contextlib.asynccontextmanager
async def running(tmp_path: Path, prefix: str, *, model: bool = True) -> AsyncIterator[Live]:
    registry = Registry(tmp_path / "registry")
    if model:
        publish_bow(registry, INTENTS, seed=1)
    bus = MemoryBus(Topics(prefix))
    tokens = {"bot": SecretStr(TOKEN)}
    async with serve_for_test(registry, bus, feedback_tokens=tokens) as (serve, _):
        if model:
            await eventually(lambda: serve.core.ready)
        yield Live(serve, bus, registry)


class Script:
    """A stub serve: answers the scripted responses in order, remembering each request."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.seen: list[tuple[float, dict[str, object]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((time.monotonic(), json.loads(request.content)))
        step = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(step, Exception):
            raise step
        return step

    @property
    def gaps(self) -> list[float]:
        times = [t for t, _ in self.seen]
        return [b - a for a, b in itertools.pairwise(times)]


def busy(status: int = 503, retry_after: str | None = None) -> httpx.Response:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return httpx.Response(status, json={"detail": "busy"}, headers=headers)


def ok(body: dict[str, object] = ANSWER, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def stub(script: Script, **kw: object) -> Client:
    return Client("http://serve.test", transport=httpx.MockTransport(script), **kw)  # type: ignore[arg-type]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


# -- against a live serve ------------------------------------------------------------------


async def test_async_client_classifies_and_sends_feedback(tmp_path: Path, prefix: str) -> None:
    async with (
        running(tmp_path, prefix) as live,
        AsyncClient(live.url, feedback_token=TOKEN) as sd,
    ):
        single = await sd.classify("where is my order #A12345?")
        turns: list[Turn | dict[str, str]] = [
            Turn(role="user", text="hi, my parcel never came"),
            {"role": "agent", "text": "Sorry to hear that. Shall I open an investigation?"},
            {"text": "yes please do that"},
        ]
        dialogue = await sd.classify(turns=turns, conversation_id="c-42", deadline_ms=500)
        receipt = await sd.feedback(dialogue.request_id, "delivery_delay", source="agent")
        again = await sd.feedback(
            dialogue.request_id, "delivery_delay", feedback_id=receipt.feedback_id
        )
        await eventually(lambda: len(live.requests()) == 2)
    for answer in (single, dialogue):
        assert isinstance(answer, Classification)
        assert answer.intent in INTENTS and answer.model_version == "v1"
        assert answer.top[0].intent == answer.intent
        assert answer.top[0].p == pytest.approx(answer.confidence)
        assert 0 < answer.latency_ms < 1000
    assert single.request_id != dialogue.request_id
    assert not receipt.duplicate and again.duplicate and again.feedback_id == receipt.feedback_id
    (label,) = live.hard_labels()
    assert (label.feedback_id, label.request_id, label.intent) == (
        receipt.feedback_id,
        dialogue.request_id,
        "delivery_delay",
    )
    assert (label.source, label.principal) == ("agent", "bot")
    event = next(e for e in live.requests() if e.request_id == dialogue.request_id)
    assert event.conversation_id == "c-42"
    assert [t.role for t in event.turns] == ["user", "agent", "user"]


async def test_sync_client_on_live_serve_and_its_errors(tmp_path: Path, prefix: str) -> None:
    def chat(url: str) -> tuple[Classification, str]:
        with Client(url, feedback_token=TOKEN) as sd:
            answer = sd.classify("I want my money back for the blender")
            receipt = sd.feedback(answer.request_id, "refund_request")
            with pytest.raises(ClientError) as invalid:
                sd.classify(turns=[{"role": "agent", "text": "hello"}])
            assert invalid.value.status == 422 and invalid.value.attempts == 1
            assert "last turn must be a user turn" in invalid.value.reason
            with pytest.raises(ValueError):
                sd.classify("a", turns=[{"text": "b"}])
        for token in (None, "wrong"):
            with Client(url, feedback_token=token) as stranger, pytest.raises(Unauthorized) as e:
                stranger.feedback(answer.request_id, "complaint")
            assert e.value.status == 401 and "bearer token" in e.value.reason
        return answer, receipt.feedback_id

    async with running(tmp_path, prefix) as live:
        # the client blocks: run it off the loop that serves it
        answer, feedback_id = await asyncio.to_thread(chat, live.url)
        async with AsyncClient(live.url, feedback_token="wrong") as sd:
            with pytest.raises(Unauthorized):
                await sd.feedback(answer.request_id, "complaint")
    assert answer.intent in INTENTS
    assert [(x.feedback_id, x.request_id, x.intent) for x in live.hard_labels()] == [
        (feedback_id, answer.request_id, "refund_request")
    ]


async def test_not_ready_503_is_retried_after_retry_after(tmp_path: Path, prefix: str) -> None:
    async with (
        running(tmp_path, prefix, model=False) as live,
        AsyncClient(live.url, timeout_s=0.5) as sd,
    ):
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as e:
            await sd.classify("hello")
        # serve says Retry-After: 1, more than is left: fail now rather than sleep in vain
        assert time.monotonic() - t0 < 0.3
        assert e.value.status == 503 and e.value.attempts == 1
        t0 = time.monotonic()
        pending = asyncio.create_task(sd.classify("hello", timeout_s=5.0))
        await asyncio.sleep(0.2)
        publish_bow(live.registry, INTENTS, seed=2)
        answer = await pending
        elapsed = time.monotonic() - t0
    assert answer.model_version == "v1"
    assert 1.0 <= elapsed < 2.5


# -- retries and deadlines against scripted stubs ------------------------------------------


def test_503_retry_after_is_honoured() -> None:
    script = Script(busy(503, "0.2"), busy(429, "0.1"), ok())
    t0 = time.monotonic()
    with stub(script, timeout_s=5.0) as sd:
        answer = sd.classify("refund please")
    elapsed = time.monotonic() - t0
    assert answer == Classification.model_validate(ANSWER)
    assert len(script.seen) == 3
    assert script.gaps[0] >= 0.2 and script.gaps[1] >= 0.1
    assert elapsed < 1.0


def test_backoff_grows_with_jitter_then_gives_up() -> None:
    script = Script(busy(503))
    with stub(script, retries=3, backoff_s=0.04, seed=1) as sd, pytest.raises(Unavailable) as e:
        sd.classify("anyone there?")
    assert e.value.status == 503 and e.value.attempts == 4 and e.value.reason == "busy"
    assert len(script.seen) == 4
    for k, gap in enumerate(script.gaps):  # equal jitter: between half and all of 0.04 * 2**k
        assert 0.02 * 2**k <= gap < 0.04 * 2**k + 0.05


def test_deadline_bounds_the_whole_call_with_its_retries() -> None:
    script = Script(busy(503, "0.15"))
    t0 = time.monotonic()
    with stub(script, retries=100, timeout_s=0.5) as sd, pytest.raises(DeadlineExceeded) as e:
        sd.classify("hello")
    elapsed = time.monotonic() - t0
    # Attempts at 0, .15, .30, .45 (one fewer if sleeps overshoot); the next wait would end
    # past the deadline: stop at once instead of sleeping into it.
    assert 3 <= len(script.seen) == e.value.attempts <= 4
    assert all(gap >= 0.15 for gap in script.gaps)
    assert 0.3 <= elapsed < 0.5 + 0.03


def test_feedback_retries_keep_one_feedback_id() -> None:
    connect = httpx.ConnectError("connection refused")
    script = Script(connect, busy(503, "0"), ok({"feedback_id": "x", "duplicate": True}, 202))
    with stub(script, feedback_token=TOKEN, backoff_s=0.01) as sd:
        receipt = sd.feedback("r1", "refund_request")
        sd.feedback("r2", "complaint", feedback_id="mine")
    assert receipt.duplicate
    ids = [body["feedback_id"] for _, body in script.seen]
    assert len(ids) == 4 and ids[0] and ids[:3] == [ids[0]] * 3 and ids[3] == "mine"
    assert script.seen[0][1] == {
        "feedback_id": ids[0],
        "request_id": "r1",
        "intent": "refund_request",
        "source": "user_confirmed",
    }


@pytest.mark.parametrize(
    ("response", "status", "reason"),
    [
        (httpx.Response(413, json={"detail": "body exceeds 65536 bytes"}), 413, "body exceeds"),
        (httpx.Response(400, text="bad Content-Length"), 400, "bad Content-Length"),
        (ok({"intent": "refund_request"}), 200, "unexpected answer"),
    ],
)
def test_other_failures_are_not_retried(response: httpx.Response, status: int, reason: str) -> None:
    script = Script(response)
    with stub(script) as sd, pytest.raises(ClientError) as e:
        sd.classify("hello")
    assert type(e.value) is ClientError and e.value.status == status and reason in e.value.reason
    assert len(script.seen) == 1


def test_sync_deadline_holds_against_a_silent_server(silent_port: int) -> None:
    t0 = time.monotonic()
    with (
        Client(f"http://127.0.0.1:{silent_port}", timeout_s=0.3) as sd,
        pytest.raises(DeadlineExceeded) as e,
    ):
        sd.classify("hello")
    assert 0.29 <= time.monotonic() - t0 < 0.45
    assert e.value.status is None and "Timeout" in e.value.reason


async def test_async_retries_and_deadline(silent_port: int) -> None:
    script = Script(busy(503, "0.1"), ok({"feedback_id": "f", "duplicate": False}, 202))
    async with AsyncClient("http://serve.test", transport=httpx.MockTransport(script)) as sd:
        receipt = await sd.feedback("r1", "refund_request")
    assert receipt.feedback_id == "f" and len(script.seen) == 2 and script.gaps[0] >= 0.1
    assert script.seen[0][1]["feedback_id"] == script.seen[1][1]["feedback_id"]

    t0 = time.monotonic()
    async with AsyncClient(f"http://127.0.0.1:{silent_port}", timeout_s=0.3) as sd:
        with pytest.raises(DeadlineExceeded):
            await sd.classify("hello")
    assert 0.29 <= time.monotonic() - t0 < 0.45


# -- the example chatbot -------------------------------------------------------------------


async def test_example_chatbot_talks_to_serve(tmp_path: Path, prefix: str) -> None:
    async with running(tmp_path, prefix) as live:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "chatbot.py"),
            *("--url", live.url, "--token", TOKEN, "--conversations", "4", "--seed", "3"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        await eventually(lambda: len(live.requests()) >= 4)
    assert proc.returncode == 0, err.decode()
    last = out.decode().strip().splitlines()[-1]
    found = re.fullmatch(
        r"summary: conversations=4 turns=(\d+) accuracy=([\d.]+) feedback=(\d+) failed=0 "
        r"latency_p50_ms=([\d.]+) latency_p99_ms=([\d.]+)",
        last,
    )
    assert found, last
    turns, accuracy, feedback = int(found[1]), float(found[2]), int(found[3])
    assert turns >= 4 and feedback == turns and 0.0 <= accuracy <= 1.0
    assert float(found[4]) <= float(found[5]) < 5000
    assert len(live.hard_labels()) == turns and len(live.requests()) == turns
    # the bot sent its own replies along: later turns carry the dialogue so far
    assert any(
        t.role == "agent" and t.text.startswith(("Sure, I can help", "Sorry, do you mean"))
        for e in live.requests()
        for t in e.turns
    )
