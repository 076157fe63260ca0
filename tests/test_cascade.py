"""teacher-serve and the deadline-aware cascade: real HTTP servers on both sides.

The student is a real ONNX model in a registry, the teacher a tiny torch BERT served by
``teacher-serve``; soft labels are read back from the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer

from stream_distill.bus.broker import EmbeddedBroker, free_port
from stream_distill.bus.codec import decode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import KafkaSettings, ServeSettings
from stream_distill.data.synthetic import INTENTS
from stream_distill.events import RequestEvent, SoftLabel, Turn
from stream_distill.models.factory import default_tokenizer_json, set_threads, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.registry.store import Registry
from stream_distill.serving.cascade import TEACHER_ID
from stream_distill.teacher.model import TeacherModel
from stream_distill.teacher.serve import RunningTeacherServe, run_teacher_serve
from stream_distill.testing import RecordingHooks, publish_bow, serve_for_test

set_threads(1)

LABELS = tuple(sorted(INTENTS[:6]))
UNSURE = 0.99  # the random student's confidence is far below this
TURNS = [{"role": "user", "text": "hi"}, {"role": "agent", "text": "hello"},
         {"role": "user", "text": "where is my parcel?"}]  # fmt: skip
DIALOGUE = tuple(Turn(role=t["role"], text=t["text"]) for t in TURNS)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def teacher() -> TeacherModel:
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=32)
    model = tiny_classifier(LABELS, layers=1, hidden=32, heads=2, intermediate=64, seed=5)
    return TeacherModel(model, encoder)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    publish_bow(reg, LABELS, seed=3)  # unsure: answers near-uniform probabilities
    return reg


@pytest.fixture
async def teacher_serve(teacher: TeacherModel) -> AsyncIterator[RunningTeacherServe]:
    async with run_teacher_serve(teacher, ServeSettings(), host="127.0.0.1", port=0) as running:
        yield running


def teacher_probs(teacher: TeacherModel, dialogue: tuple[Turn, ...]) -> np.ndarray:
    logits = teacher.predict([dialogue], attention=False).logits[0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return np.asarray(e / e.sum())


def cascading(url: str, **kw: Any) -> dict[str, Any]:
    return {"cascade_enabled": True, "cascade_url": url, "cascade_threshold": UNSURE, **kw}


def outcomes(hooks: RecordingHooks) -> list[str]:
    return [outcome for outcome, _ in hooks.named("on_cascade")]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def hung_teacher() -> AsyncIterator[str]:
    """A teacher that accepts connections and reads requests but never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


# -- teacher-serve ------------------------------------------------------------------------


async def test_teacher_serve_answers_with_the_whole_distribution(
    teacher: TeacherModel, teacher_serve: RunningTeacherServe
) -> None:
    want = teacher_probs(teacher, DIALOGUE)
    async with httpx.AsyncClient(base_url=teacher_serve.url) as client:
        assert (await client.get("/v2/health/ready")).json()["ready"] is True
        r = await client.post("/v1/classify", json={"turns": TURNS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == teacher.version
        assert "answered_by" not in body  # a teacher never cascades
        got = {t["intent"]: t["p"] for t in body["top"]}
        assert set(got) == set(LABELS)  # every label, not top-3
        assert np.allclose([got[label] for label in LABELS], want, atol=1e-5)
        assert body["intent"] == LABELS[int(np.argmax(want))]
        models = (await client.get("/v1/models")).json()["serving"]
        assert models["labels"] == list(LABELS) and len(models["sha256"]) == 64
        infer = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2],
                             "data": ["where is my parcel?", "cancel it"]}]}  # fmt: skip
        r = await client.post("/v2/models/intent/infer", json=infer)
        assert r.status_code == 200, r.text
        probs = np.asarray(r.json()["outputs"][0]["data"]).reshape(2, len(LABELS))
        single = teacher_probs(teacher, (Turn(role="user", text="cancel it"),))
        assert np.allclose(probs[1], single, atol=1e-5)
        metrics = (await client.get("/metrics")).text
        assert 'sd_requests_total{outcome="ok"} 2.0' in metrics


def test_teacher_serve_command(teacher: TeacherModel, tmp_path: Path) -> None:
    directory = teacher.save(tmp_path / "teacher")
    port = free_port()
    cmd = [sys.executable, "-m", "stream_distill.cli", "teacher-serve", "--teacher",
           str(directory), "--port", str(port), "-q"]  # fmt: skip
    env = {**os.environ, "SD_SERVE__DRAIN_GRACE_S": "0.2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < end, "teacher-serve not ready"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/v2/health/ready", timeout=1.0).status_code == 200:
                    break
            time.sleep(0.2)
        r = httpx.post(f"{base}/v1/classify", json={"text": "where is my parcel?"})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == teacher.version
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# -- the cascade ------------------------------------------------------------------------


@pytest.mark.integration
async def test_unsure_answer_comes_from_the_teacher_and_becomes_a_soft_label(
    registry: Registry,
    teacher: TeacherModel,
    teacher_serve: RunningTeacherServe,
    broker: EmbeddedBroker,
    prefix: str,
) -> None:
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix), broker.bootstrap)
    await bus.ensure_topics()
    hooks = RecordingHooks()
    settings = cascading(teacher_serve.url)
    async with serve_for_test(registry, bus, hooks=hooks, poll_interval_s=60, **settings) as (
        _,
        client,
    ):
        r = await client.post(
            "/v1/classify",
            json={"conversation_id": "c1", "turns": TURNS, "deadline_ms": 5000, "cascade": True},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        plain = await client.post("/v1/classify", json={"turns": TURNS, "deadline_ms": 5000})
        student = plain.json()
    want = teacher_probs(teacher, DIALOGUE)
    assert body["answered_by"] == "teacher"
    assert body["model_version"] == f"teacher:{teacher.version}"
    assert body["intent"] == LABELS[int(np.argmax(want))]
    assert len(body["top"]) == 3 and body["top"][0]["p"] == pytest.approx(want.max(), abs=1e-5)
    assert body["latency_ms"] < 5000
    assert student["model_version"] == "v1" and "answered_by" not in student
    assert student["confidence"] < UNSURE  # why the teacher was asked
    assert outcomes(hooks) == ["answered"]

    soft: SoftLabel | None = None
    requests: dict[str, RequestEvent] = {}
    async with (
        bus.consumer([bus.topics.soft_labels]) as labels,
        bus.consumer([bus.topics.requests]) as events,
    ):
        end = asyncio.get_running_loop().time() + 20
        while (soft is None or body["request_id"] not in requests) and (
            asyncio.get_running_loop().time() < end
        ):
            for rec in await labels.getmany(timeout_ms=100):
                soft = decode(SoftLabel, rec.value)
                assert rec.key == b"c1"
            for rec in await events.getmany(timeout_ms=100):
                ev = decode(RequestEvent, rec.value)
                requests[ev.request_id] = ev
    assert soft is not None, "no soft label on the topic"
    assert (soft.request_id, soft.teacher_id) == (body["request_id"], TEACHER_ID)
    assert soft.teacher_version == teacher.version
    assert soft.labels == teacher.labels
    assert soft.label_set_version == teacher.label_set_version
    probs = np.exp(np.asarray(soft.logits))
    assert np.allclose(probs / probs.sum(), want, atol=1e-4)
    # The request event still tells what the student answered: that is what it is judged on.
    event = requests[body["request_id"]]
    assert event.model_version == "v1" and event.turns == DIALOGUE


async def test_confident_student_answers_itself(
    tmp_path: Path, teacher_serve: RunningTeacherServe
) -> None:
    registry = Registry(tmp_path / "sure")
    publish_bow(registry, LABELS, seed=3, bias_label=2)
    hooks = RecordingHooks()
    settings = cascading(teacher_serve.url, cascade_default=True)
    async with serve_for_test(registry, hooks=hooks, **settings) as (_, client):
        body = (await client.post("/v1/classify", json={"text": "where is my parcel?"})).json()
    assert (body["answered_by"], body["model_version"], body["intent"]) == (
        "student",
        "v1",
        LABELS[2],
    )
    assert outcomes(hooks) == ["confident"]


async def test_no_budget_left_means_the_student_answers(
    registry: Registry, teacher_serve: RunningTeacherServe
) -> None:
    hooks = RecordingHooks()
    settings = cascading(teacher_serve.url, cascade_min_budget_ms=10_000, cascade_default=True)
    async with serve_for_test(registry, hooks=hooks, **settings) as (_, client):
        r = await client.post("/v1/classify", json={"turns": TURNS, "deadline_ms": 2000})
    assert r.status_code == 200, r.text
    assert (r.json()["answered_by"], r.json()["model_version"]) == ("student", "v1")
    assert outcomes(hooks) == ["skipped_budget"]
    async with httpx.AsyncClient(base_url=teacher_serve.url) as teacher_client:
        assert "sd_requests_total{" not in (await teacher_client.get("/metrics")).text


async def test_a_late_teacher_is_cut_off_at_the_deadline_and_then_not_asked(
    registry: Registry,
) -> None:
    hooks = RecordingHooks()
    async with (
        hung_teacher() as url,
        serve_for_test(registry, hooks=hooks, **cascading(url, cascade_default=True)) as (
            serve,
            client,
        ),
    ):
        t0 = time.perf_counter()
        r = await client.post("/v1/classify", json={"turns": TURNS, "deadline_ms": 600})
        took_ms = (time.perf_counter() - t0) * 1e3
        assert r.status_code == 200, r.text
        assert (r.json()["answered_by"], r.json()["model_version"]) == ("student", "v1")
        assert 500 < took_ms < 600 + 1000  # waited out the budget, not the client's timeout
        assert outcomes(hooks) == ["timeout"]
        cascade = serve.core.cascade
        assert cascade is not None and cascade.estimate_s > 0.2  # what the call was given
        # The teacher is now expected to take longer than a whole budget this size: not asked.
        deadline_ms = int(cascade.estimate_s * 1e3)
        r = await client.post("/v1/classify", json={"turns": TURNS, "deadline_ms": deadline_ms})
        assert r.status_code == 200 and r.json()["answered_by"] == "student"
        assert outcomes(hooks) == ["timeout", "skipped_budget"]


async def test_teacher_down_still_answers_200(registry: Registry) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with serve_for_test(registry, **cascading(url)) as (_, client):
        for _ in range(2):
            r = await client.post(
                "/v1/classify", json={"turns": TURNS, "deadline_ms": 2000, "cascade": True}
            )
            assert r.status_code == 200, r.text
            assert (r.json()["answered_by"], r.json()["model_version"]) == ("student", "v1")
        metrics = (await client.get("/metrics")).text
    assert 'sd_cascade_total{outcome="teacher_error"} 2.0' in metrics
    assert 'sd_cascade_teacher_seconds_count{outcome="teacher_error"} 2.0' in metrics
    assert 'sd_requests_total{outcome="ok"} 2.0' in metrics


@pytest.mark.parametrize(
    ("enabled", "default", "asked", "answered_by"),
    [
        (True, False, None, None),  # enabled, but a request must opt in
        (True, False, True, "teacher"),
        (True, True, None, "teacher"),  # serve.cascade_default opts every request in
        (True, True, False, None),  # ...unless it opts out
        (False, True, True, None),  # disabled: nobody is cascaded
    ],
)
async def test_opt_in_per_request_and_by_config(
    registry: Registry,
    teacher_serve: RunningTeacherServe,
    enabled: bool,
    default: bool,
    asked: bool | None,
    answered_by: str | None,
) -> None:
    settings = cascading(teacher_serve.url, cascade_enabled=enabled, cascade_default=default)
    body: dict[str, Any] = {"turns": TURNS, "deadline_ms": 5000}
    if asked is not None:
        body["cascade"] = asked
    async with serve_for_test(registry, **settings) as (_, client):
        r = await client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    assert r.json().get("answered_by") == answered_by
    assert r.json()["model_version"].startswith("teacher:") == (answered_by == "teacher")


def test_cascade_needs_a_teacher_url() -> None:
    with pytest.raises(ValidationError, match="cascade_url"):
        ServeSettings(cascade_enabled=True)
