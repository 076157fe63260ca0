"""Security faults: auth on writes, no personal data on any topic, Kafka auth, no pickle, sha256."""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import certifi
import pytest
import torch
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from tokenizers import Tokenizer

import stream_distill.trainer as trainer_pkg
from stream_distill.bus.base import Record, Topics
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode, encode
from stream_distill.bus.kafka import KafkaBus, connection_options
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings, ModelSettings, TrainerSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.errors import IntegrityError
from stream_distill.events import HardLabel, RequestEvent
from stream_distill.models.factory import default_tokenizer_json, tiny_classifier
from stream_distill.models.text import TextEncoder
from stream_distill.registry.base import MODEL_FILE
from stream_distill.registry.store import Registry
from stream_distill.teacher.model import TeacherModel
from stream_distill.testing import eventually, publish_bow, serve_for_test, teacher_soft
from stream_distill.trainer.build import learner_from_teacher
from stream_distill.trainer.loop import Trainer

LABELS = ("order_status", "refund", "cancel_order", "greeting")
TOKENS = {"agent-desk": SecretStr("desk-secret-1"), "annotators": SecretStr("ann-secret-2")}
AUTH = {"Authorization": "Bearer desk-secret-1"}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    publish_bow(reg, LABELS, seed=1)
    return reg


@pytest.fixture
async def bus(broker: EmbeddedBroker, prefix: str) -> KafkaBus:
    b = KafkaBus(KafkaSettings(topic_prefix=prefix, partitions=1), broker.bootstrap)
    await b.ensure_topics()
    return b


async def read_all(bus: KafkaBus, topics: list[str] | None = None) -> list[Record]:
    """Every record now on ``topics`` (all of the prefix by default), from offset 0 to the end."""
    consumer = bus.consumer(topics or list(bus.topics.all()))
    await consumer.start()
    try:
        ends = await consumer.end_offsets(sorted(consumer.assignment()))
        want = sum(ends.values())
        out: list[Record] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len(out) < want and loop.time() < deadline:
            out.extend(await consumer.getmany(timeout_ms=200))
        assert len(out) >= want, (len(out), want)
        return out
    finally:
        await consumer.aclose()


# -- feedback and admin auth ------------------------------------------------------------------


async def test_feedback_refuses_missing_and_wrong_tokens_and_writes_nothing(
    registry: Registry, bus: KafkaBus
) -> None:
    payload = {"request_id": "r-1", "intent": "refund"}
    refused = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer desk-secret-"},  # a prefix of a real token
        {"Authorization": "Bearer desk-secret-1x"},
        {"Authorization": "Basic desk-secret-1"},  # right secret, wrong scheme
        {"Authorization": "desk-secret-1"},
    ]
    async with serve_for_test(registry, bus, feedback_tokens=TOKENS) as (_, client):
        for headers in refused:
            resp = await client.post("/v1/feedback", json=payload, headers=headers)
            assert resp.status_code == 401, (headers, resp.status_code)
            assert resp.headers.get("WWW-Authenticate") == "Bearer"
        # a malformed body with no token is refused for the token, not parsed
        bad = await client.post("/v1/feedback", content=b"{", headers={})
        assert bad.status_code == 401
        assert not await read_all(bus, [bus.topics.hard_labels])
        # control: the right token, on a request answered here, writes exactly one label
        answered = await client.post("/v1/classify", json={"text": "refund please"})
        payload["request_id"] = answered.json()["request_id"]
        ok = await client.post("/v1/feedback", json=payload, headers=AUTH)
        assert ok.status_code == 202, ok.text
    labels = [decode(HardLabel, r.value) for r in await read_all(bus, [bus.topics.hard_labels])]
    assert [(x.request_id, x.principal) for x in labels] == [(payload["request_id"], "agent-desk")]


async def test_admin_endpoints_refuse_missing_and_wrong_tokens(
    registry: Registry, bus: KafkaBus
) -> None:
    async with serve_for_test(registry, bus, admin_token=SecretStr("admin-secret")) as (serve, c):
        await eventually(lambda: serve.core.ready)
        spec = (await c.get("/openapi.json")).json()
        admin = [
            (method.upper(), path)
            for path, ops in spec["paths"].items()
            if path.startswith("/v1/admin")
            for method in ops
        ]
        if not admin:
            pytest.skip("serve has no /v1/admin/* endpoints yet")
        before = sorted(registry.list_versions())
        for method, path in admin:
            url = re.sub(r"\{[^}]+\}", "v1", path)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}):
                resp = await c.request(method, url, headers=headers, json={})
                assert resp.status_code in (401, 403), (method, path, headers, resp.status_code)
        assert sorted(registry.list_versions()) == before
        assert (await c.get("/v1/models")).json()["serving"]["version"] == "v1"
    assert not await read_all(bus, [bus.topics.models, bus.topics.hard_labels])


async def test_feedback_rate_limit_is_per_principal(registry: Registry, bus: KafkaBus) -> None:
    async with serve_for_test(
        registry, bus, feedback_tokens=TOKENS, feedback_rate_per_s=0.2, feedback_burst=3
    ) as (_, client):
        rids = []
        for _ in range(6):
            resp = await client.post("/v1/classify", json={"text": "where is my refund"})
            rids.append(resp.json()["request_id"])
        desk = [
            await client.post(
                "/v1/feedback", json={"request_id": rid, "intent": "refund"}, headers=AUTH
            )
            for rid in rids[:5]
        ]
        assert [r.status_code for r in desk] == [202, 202, 202, 429, 429]
        assert int(desk[3].headers["Retry-After"]) >= 1
        # another principal has its own bucket
        other = {"Authorization": "Bearer ann-secret-2"}
        ann = await client.post(
            "/v1/feedback", json={"request_id": rids[5], "intent": "refund"}, headers=other
        )
        assert ann.status_code == 202, ann.text
    labels = [decode(HardLabel, r.value) for r in await read_all(bus, [bus.topics.hard_labels])]
    assert sorted(x.principal or "" for x in labels) == ["agent-desk"] * 3 + ["annotators"]


# -- personal data ---------------------------------------------------------------------------

EMAILS = ["jane.doe+orders@example.com", "bob_smith@mail.example.co.uk"]
PHONES = ["+44 20 7946 0958", "(415) 555-2671", "06 12 34 56 78", "+1-202-555-0143"]
CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"]


def _needles() -> list[bytes]:
    out: list[bytes] = []
    for secret in (*EMAILS, *PHONES, *CARDS):
        out.append(secret.encode())
        digits = re.sub(r"\D", "", secret)
        if len(digits) >= 9:
            out.append(digits.encode())  # the number, however it was spaced
    out += [b"jane.doe", b"bob_smith", b"7946 0958", b"555-2671", b"0000-0004", b"246310005"]
    return out


async def test_seeded_personal_data_never_reaches_any_topic(
    registry: Registry, bus: KafkaBus
) -> None:
    texts = [
        f"hi, my email is {EMAILS[0]} and my order never came",
        f"call me on {PHONES[0]} or {PHONES[1]} about the refund",
        f"refund to card {CARDS[0]} please, backup {CARDS[1]}",
        f"amex {CARDS[2]}, phone {PHONES[2]}, mail {EMAILS[1]}",
        f"urgent!! {PHONES[3]} cancel my order",
    ]
    async with serve_for_test(registry, bus, feedback_tokens=TOKENS) as (serve, client):
        rids = []
        for text in texts:
            resp = await client.post("/v1/classify", json={"text": text})
            assert resp.status_code == 200, resp.text
            rids.append(resp.json()["request_id"])
        turns = [
            {"role": "agent", "text": f"is {EMAILS[1]} still your address?"},
            {"role": "user", "text": f"yes, and my card is {CARDS[0]}"},
        ]
        resp = await client.post(
            "/v1/classify", json={"turns": turns, "conversation_id": "conv-pii"}
        )
        assert resp.status_code == 200
        rids.append(resp.json()["request_id"])
        fb = await client.post(
            "/v1/feedback", json={"request_id": rids[0], "intent": "refund"}, headers=AUTH
        )
        assert fb.status_code == 202

        async def all_events() -> bool:
            got = {
                decode(RequestEvent, r.value).request_id
                for r in await read_all(bus, [bus.topics.requests])
            }
            return set(rids) <= got

        for _ in range(100):
            if await all_events():
                break
            await asyncio.sleep(0.1)
        assert serve.core.ready
    records = await read_all(bus)
    assert {r.topic for r in records} >= {bus.topics.requests, bus.topics.hard_labels}
    events = [decode(RequestEvent, r.value) for r in records if r.topic == bus.topics.requests]
    assert set(rids) <= {e.request_id for e in events}
    # the masks are there, so the texts did travel (just not the secrets)
    joined = " ".join(t.text for e in events for t in e.turns)
    assert "[email]" in joined and "[phone]" in joined and "[number]" in joined
    for r in records:
        raw = b"".join([r.key or b"", r.value, *(k.encode() + v for k, v in r.headers)])
        for needle in _needles():
            assert needle not in raw, (r.topic, needle, raw[:300])


# -- Kafka auth settings ---------------------------------------------------------------------


async def test_sasl_ssl_settings_reach_aiokafka(tmp_path: Path) -> None:
    cafile = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), cafile)
    settings = KafkaSettings(
        bootstrap_servers="kafka-1:9093",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc-serve",
        sasl_password=SecretStr("s3cr3t-pw"),
        ssl_cafile=cafile,
    )
    opts = connection_options(settings, "kafka-1:9093,kafka-2:9093")
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert opts["sasl_plain_username"] == "svc-serve"
    assert opts["sasl_plain_password"] == "s3cr3t-pw"
    ctx = opts["ssl_context"]
    assert ctx.get_ca_certs() or ctx.cert_store_stats()["x509_ca"] > 0  # the cafile was loaded
    producer = AIOKafkaProducer(**opts)  # never started: nothing is dialled
    client = producer.client
    assert client._security_protocol == "SASL_SSL"
    assert client._sasl_mechanism == "SCRAM-SHA-512"
    assert client._sasl_plain_username == "svc-serve"
    assert client._sasl_plain_password == "s3cr3t-pw"
    assert client._ssl_context is ctx
    assert client._bootstrap_servers == "kafka-1:9093,kafka-2:9093"
    # the password never shows in the settings' repr (logs print settings)
    assert "s3cr3t-pw" not in repr(settings)


# -- the trainer never unpickles -------------------------------------------------------------

TRAIN_LABELS = INTENTS[:6]


def _refuse(*_: Any, **__: Any) -> Any:
    raise AssertionError("unpickling attempted")


async def test_trainer_restores_a_real_checkpoint_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    enc = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), 32)
    teacher = TeacherModel(
        tiny_classifier(TRAIN_LABELS, layers=2, hidden=32, heads=2, intermediate=64), enc
    )
    settings = TrainerSettings.model_validate(
        dict(
            checkpoint_dir=tmp_path / "ckpt",
            batch_size=8,
            publish_every_steps=1000,
            publish_every_s=3600,
            min_examples_to_train=4,
            holdout_fraction=0.0,
        )
    )
    model_settings = ModelSettings(max_length=32, student_layers=(0, 1))
    bus = MemoryBus(Topics("np."))
    await bus.ensure_topics()
    examples = [e for e in labelled_examples(90, seed=3) if e.intent in TRAIN_LABELS][:24]
    out = teacher.predict([e.turns for e in examples], attention=False)
    async with bus.producer() as p:
        for i, (ex, logits) in enumerate(zip(examples, out.logits, strict=True)):
            rid = f"r{i}"
            req = RequestEvent(
                request_id=rid,
                conversation_id=ex.conversation_id,
                turns=ex.turns,
                served_intent=TRAIN_LABELS[0],
                entropy=1.0,
                margin=0.1,
                model_version="v1",
                latency_ms=1.0,
            )
            soft = teacher_soft(teacher, rid, logits, TRAIN_LABELS)
            await p.send(bus.topics.requests, encode(req), key=rid.encode())
            await p.send(bus.topics.soft_labels, encode(soft), key=rid.encode())
    registry = Registry(tmp_path / "reg")
    tok = teacher.encoder.to_str()
    first = Trainer(
        bus, registry, learner_from_teacher(teacher, model_settings, settings), settings, tok
    )
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    await eventually(lambda: first.learner.steps >= 2 or task.done(), timeout_s=60)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert first.store.latest_name() is not None

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, _refuse)
    monkeypatch.setattr(pickle, "Unpickler", _refuse)
    again = learner_from_teacher(teacher, model_settings, settings, seed=9)
    second = Trainer(bus, registry, again, settings, tok)
    assert second.restore()
    assert second.learner.steps == first.learner.steps and second.offsets == first.offsets
    for a, b in zip(first.learner.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_trainer_source_has_no_unpickling() -> None:
    # A second line of defence: the patched functions above only catch what that run touched.
    root = Path(trainer_pkg.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) >= 5
    banned = re.compile(
        r"\bimport pickle\b|\bpickle\.|\btorch\.load\(|\bdill\b|\bjoblib\b|cloudpickle"
    )
    for path in sources:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            assert not banned.search(code), f"{path.name}:{n}: {line.strip()}"


# -- registry integrity ----------------------------------------------------------------------


def test_every_registry_file_is_verified_before_use(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    mv = publish_bow(registry, LABELS, seed=1)
    folder = registry.versions_dir / mv.version
    names = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert MODEL_FILE in names and len(names) >= 3
    for name in names:
        original = (folder / name).read_bytes()
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0x01  # one bit, same size
        (folder / name).write_bytes(bytes(tampered))
        with pytest.raises(IntegrityError, match=name):
            registry.load(mv.version)
        (folder / name).write_bytes(original)
    assert registry.load(mv.version).sha256 == mv.sha256


async def test_serve_rejects_a_tampered_version(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, LABELS, seed=1)
    # v2 is written aside, tampered, then renamed in whole, so serve never sees it intact
    aside = Registry(tmp_path / "aside")
    publish_bow(aside, LABELS, seed=2, version="v2", bias_label=3)
    model = aside.versions_dir / "v2" / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.write_bytes(bytes(data))
    async with serve_for_test(registry, poll_interval_s=0.05) as (serve, client):
        await eventually(lambda: serve.core.ready)
        assert (await client.get("/v1/models")).json()["serving"]["version"] == "v1"
        os.rename(aside.versions_dir / "v2", registry.versions_dir / "v2")
        await eventually(lambda: "v2" in serve.core.rejected, timeout_s=10)
        assert "sha256" in serve.core.rejected["v2"]
        models = (await client.get("/v1/models")).json()
        assert models["serving"]["version"] == "v1" and "v2" in models["rejected"]
        resp = await client.post("/v1/classify", json={"text": "refund please"})
        assert resp.status_code == 200 and resp.json()["model_version"] == "v1"
