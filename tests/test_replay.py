"""record and replay: live serve traffic on a real broker → replay file → serve or topics again."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode, encode, headers_for
from stream_distill.bus.kafka import KafkaBus
from stream_distill.cli import main
from stream_distill.config import KafkaSettings
from stream_distill.data.synthetic import INTENTS, TrafficConfig, TrafficGenerator
from stream_distill.events import HardLabel, RequestEvent, Turn
from stream_distill.registry.store import Registry
from stream_distill.replay.format import FORMAT, ReplayFileError, load, write_file
from stream_distill.replay.record import RecordOptions, record
from stream_distill.replay.replay import ReplayOptions, replay_http, replay_kafka
from stream_distill.serving.service import redact
from stream_distill.testing import publish_bow, serve_for_test

pytestmark = pytest.mark.integration

FAST = ReplayOptions(speed=float("inf"))


@dataclass(frozen=True)
class Recording:
    path: Path
    registry: Registry
    served: dict[str, str]
    """request id → intent serve answered live."""
    labels: dict[str, str]
    """request id → intent posted as feedback."""
    conversations: dict[str, str]
    record_log: str


def kafka_bus(broker: EmbeddedBroker, prefix: str) -> KafkaBus:
    return KafkaBus(KafkaSettings(topic_prefix=prefix, partitions=2), broker.bootstrap)


async def drain(bus: KafkaBus, topic: str, n: int, timeout_s: float = 15.0) -> list[bytes]:
    """The values of the first ``n`` records of ``topic`` (fewer after ``timeout_s``)."""
    values: list[bytes] = []
    async with bus.consumer([topic]) as consumer:
        end = asyncio.get_running_loop().time() + timeout_s
        while len(values) < n and asyncio.get_running_loop().time() < end:
            values += [r.value for r in await consumer.getmany(timeout_ms=200)]
    return values


async def live_traffic(registry: Registry, bus: KafkaBus) -> tuple[dict[str, str], ...]:
    """Multi-turn synthetic dialogues through a live serve, feedback on every other answer."""
    await bus.ensure_topics()
    gen = TrafficGenerator(TrafficConfig(seed=5, max_user_turns=3))
    # Recorded dialogues are redacted; pick ones redaction leaves alone so that the recorded
    # text is what serve saw live.
    turns = [t for t in gen.turns(40) if all(redact(x.text) == x.text for x in t.turns)][:12]
    served: dict[str, str] = {}
    labels: dict[str, str] = {}
    conversations: dict[str, str] = {}
    async with serve_for_test(registry, bus) as (serve, client):
        assert await serve.core.wait_ready(10)
        for i, turn in enumerate(turns):
            body = {
                "conversation_id": turn.conversation_id,
                "turns": [t.model_dump() for t in turn.turns],
            }
            answer = (await client.post("/v1/classify", json=body)).json()
            served[answer["request_id"]] = answer["intent"]
            conversations[answer["request_id"]] = turn.conversation_id
            if i % 2 == 0:
                fb = {"request_id": answer["request_id"], "intent": turn.confirmed_intent}
                assert (await client.post("/v1/feedback", json=fb)).status_code == 202
                labels[answer["request_id"]] = turn.confirmed_intent
    async with bus.producer() as producer:  # records no reader can decode
        await producer.send(bus.topics.requests, b"\xff not json", key=b"x")
        await producer.send(bus.topics.hard_labels, b'{"schema_version": 1}', key=b"y")
    return served, labels, conversations


@pytest.fixture(scope="module")
def recording(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Recording:
    """A recording, through the CLI, of live traffic a real serve answered on a real broker."""
    root = tmp_path_factory.mktemp("recording")
    prefix = f"rec{uuid.uuid4().hex[:8]}."
    registry = Registry(root / "registry")
    publish_bow(registry, INTENTS, seed=3)
    served, labels, conversations = asyncio.run(live_traffic(registry, kafka_bus(broker, prefix)))
    path = root / "live.jsonl"
    argv = ["record", "--bootstrap-servers", broker.bootstrap, "--topic-prefix", prefix,
            "-o", str(path), "--idle", "1.5", "-q"]  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 0
    return Recording(path, registry, served, labels, conversations, err.getvalue())


def request(i: int, at: datetime, intent: str = "track_order") -> RequestEvent:
    return RequestEvent(
        request_id=f"r{i}",
        conversation_id=f"c{i % 3}",
        turns=(Turn(role="user", text=f"where is my parcel number {i}"),),
        served_intent=intent,
        entropy=0.1,
        margin=0.5,
        model_version="v1",
        latency_ms=1.0,
        ts=at,
    )


# -- record ------------------------------------------------------------------------------------
def test_recording_joins_labels_to_requests_and_skips_poison(recording: Recording) -> None:
    first = json.loads(recording.path.read_text().splitlines()[0])
    assert (first["format"], first["version"]) == (FORMAT, 1)
    replay = load(recording.path)
    got = {r.event.request_id: r for r in replay.requests}
    assert set(got) == set(recording.served)
    for rid, rr in got.items():
        assert rr.event.served_intent == recording.served[rid]
        assert rr.event.conversation_id == recording.conversations[rid]
        assert rr.event.model_version == "v1"
        assert (rr.label.intent if rr.label else None) == recording.labels.get(rid)
    assert max(len(r.event.turns) for r in replay.requests) > 1  # multi-turn dialogues survive
    assert len(set(recording.served.values())) > 2  # a model that tells dialogues apart
    assert [r.ts for r in replay.requests] == sorted(r.ts for r in replay.requests)
    assert replay.orphan_labels == ()
    assert "recorded 12 requests and 6 labels (6 joined" in recording.record_log
    assert "skipped 2 undecodable records" in recording.record_log


async def test_record_from_latest_follows_until_max_records(
    broker: EmbeddedBroker, prefix: str
) -> None:
    bus = kafka_bus(broker, prefix)
    await bus.ensure_topics()
    at = datetime(2024, 5, 1, tzinfo=UTC)
    async with bus.producer() as producer:
        old = request(0, at)
        await producer.send(bus.topics.requests, encode(old), headers=headers_for(old))
        out = io.StringIO()
        opts = RecordOptions(offset_reset="latest", follow=True, max_records=3, idle_s=0.1)
        task = asyncio.create_task(record(bus, out, opts))
        i = 1
        while not task.done() and i < 100:  # keep sending: "latest" is fixed at the first fetch
            ev = request(i, at)
            await producer.send(bus.topics.requests, encode(ev), headers=headers_for(ev))
            i += 1
            await asyncio.sleep(0.05)
        stats = await asyncio.wait_for(task, 10)
    assert (stats.requests, stats.stopped_by) == (3, "max-records")
    ids = [json.loads(line)["event"]["request_id"] for line in out.getvalue().splitlines()[1:]]
    assert len(ids) == 3 and "r0" not in ids

    t0 = asyncio.get_running_loop().time()
    stats = await record(
        bus, io.StringIO(), RecordOptions(offset_reset="latest", follow=True, duration_s=0.5)
    )
    took = asyncio.get_running_loop().time() - t0
    assert stats.stopped_by == "duration" and stats.records == 0 and 0.5 <= took < 5


# -- replay over HTTP --------------------------------------------------------------------------
async def test_same_model_replays_identically_and_matches_the_recording(
    recording: Recording,
) -> None:
    replay = load(recording.path)
    runs = []
    for _ in range(2):
        async with serve_for_test(recording.registry) as (serve, _client):
            assert await serve.core.wait_ready(10)
            runs.append(await replay_http(replay, serve.url, FAST))
    first, second = runs
    served = [[o.served for o in run.outcomes] for run in runs]
    assert served[0] == served[1] == [r.event.served_intent for r in replay.requests]
    assert first.passed and second.passed and first.failed == 0
    report = first.to_dict()
    assert (report["requests"], report["ok"], report["changed"], report["labelled"]) == (
        12,
        12,
        0,
        6,
    )
    assert report["accuracy"] == report["recorded_accuracy"]
    assert 0 < report["latency_p50_ms"] <= report["latency_p95_ms"] <= report["latency_p99_ms"]
    assert report["model_versions"] == {"v1": 12}


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def test_expect_same_passes_on_the_same_model_and_fails_on_another(
    recording: Recording, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = Registry(tmp_path / "other")
    publish_bow(other, INTENTS, seed=4, bias_label=2)
    report = tmp_path / "summary.json"
    for registry, expected in ((recording.registry, 0), (other, 1)):
        async with serve_for_test(registry) as (serve, _client):
            assert await serve.core.wait_ready(10)
            argv = ["replay", str(recording.path), "--url", serve.url, "--speed", "inf",
                    "--expect-same", "--json", str(report), "-q"]  # fmt: skip
            code, out, _ = await asyncio.to_thread(run_cli, argv, capsys)
        summary = json.loads(report.read_text())
        assert code == expected, out
        assert summary["passed"] is (expected == 0)
    assert "FAIL (--expect-same)" in out and "served intents differ from the recording" in out
    changed = summary["changed"]
    assert changed == sum(intent != INTENTS[2] for intent in recording.served.values()) > 0
    assert all(c["served"] == INTENTS[2] for c in summary["changes"])
    first = summary["changes"][0]
    assert f"line {first['line']}  conversation {first['conversation_id']}  " in out
    assert sum(summary["changed_pairs"].values()) == changed


async def test_recorded_labels_are_posted_as_feedback_for_the_new_requests(
    recording: Recording, broker: EmbeddedBroker, prefix: str
) -> None:
    bus = kafka_bus(broker, prefix)
    await bus.ensure_topics()
    async with serve_for_test(recording.registry, bus) as (serve, _client):
        assert await serve.core.wait_ready(10)
        summary = await replay_http(
            load(recording.path), serve.url, ReplayOptions(speed=50, feedback=True)
        )
    assert (summary.ok, summary.labels_sent, summary.errors) == (12, 6, {})
    labels = [decode(HardLabel, v) for v in await drain(bus, bus.topics.hard_labels, 6)]
    requests = [decode(RequestEvent, v) for v in await drain(bus, bus.topics.requests, 12)]
    new_ids = {r.request_id for r in requests}
    assert len(labels) == 6 and {lb.request_id for lb in labels} <= new_ids
    assert not new_ids & set(recording.served)
    assert sorted(lb.intent for lb in labels) == sorted(recording.labels.values())


async def test_errors_are_counted_by_kind(tmp_path: Path) -> None:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    path = write_file(tmp_path / "r.jsonl", [request(i, at) for i in range(3)])
    async with serve_for_test(Registry(tmp_path / "empty")) as (serve, _client):  # no model: 503
        summary = await replay_http(load(path), serve.url, FAST)
    url = serve.url  # closed now: nothing listens there
    refused = await replay_http(load(path), url, FAST)
    assert summary.errors == {"http_503": 3} and summary.exit_code() == 1
    assert refused.errors == {"ConnectError": 3}
    assert "failed 3  (ConnectError: 3)" in refused.render()


async def test_redacted_requests_are_not_held_against_expect_same_until_saved_as_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    texts = ["my e-mail is [email], where is it", "cancel my order please",
             "card [number] was charged twice", "what are your opening hours"]  # fmt: skip
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, INTENTS, seed=3)
    other = Registry(tmp_path / "other")
    publish_bow(other, INTENTS, seed=4, bias_label=2)

    def events(recorded: Sequence[str]) -> list[RequestEvent]:
        return [
            request(i, at + timedelta(seconds=i)).model_copy(
                update={"turns": (Turn(role="user", text=t),), "served_intent": intent}
            )
            for i, (t, intent) in enumerate(zip(texts, recorded, strict=True))
        ]

    async with serve_for_test(registry) as (serve, _client):
        assert await serve.core.wait_ready(10)
        probe = await replay_http(
            load(write_file(tmp_path / "p.jsonl", events(["?"] * 4))), serve.url, FAST
        )
        served = [o.served or "" for o in probe.outcomes]
        # What live serve answered on the unredacted words: anything but what the file gives now.
        recorded = [f"{s}-live" if "[" in t else s for s, t in zip(served, texts, strict=True)]
        path = write_file(tmp_path / "r.jsonl", events(recorded))
        live = await replay_http(
            load(path), serve.url, ReplayOptions(speed=float("inf"), expect_same=True)
        )
        assert [o.redacted for o in live.outcomes] == [True, False, True, False]
        assert (len(live.changes), live.to_dict()["regressed"], live.passed) == (2, 0, True)
        assert "apart from 2 recorded on redacted text" in live.render()
        baseline = tmp_path / "baseline.jsonl"
        argv = ["replay", str(path), "--url", serve.url, "--speed", "inf"]
        argv += ["--save", str(baseline), "-q"]
        code, out, _ = await asyncio.to_thread(run_cli, argv, capsys)
        assert code == 0 and f"baseline of 4 requests written to {baseline}" in out
        saved = load(baseline)
        assert saved.baseline and not any(r.redacted for r in saved.requests)
        assert [r.event.served_intent for r in saved.requests] == served
        again = await replay_http(saved, serve.url, FAST)
        assert again.passed and not again.changes
    async with serve_for_test(other) as (serve, _client):
        assert await serve.core.wait_ready(10)
        regressed = await replay_http(
            saved, serve.url, ReplayOptions(speed=float("inf"), expect_same=True)
        )
    assert not regressed.passed and regressed.exit_code() == 1
    assert {o.line for o in regressed.changes} == {
        r.line for r, s in zip(saved.requests, served, strict=True) if s != INTENTS[2]
    }


# -- pacing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "spacing_s", "expected_s"),
    [(ReplayOptions(rate=40), 10.0, 19 / 40), (ReplayOptions(speed=4), 0.1, 1.9 / 4)],
    ids=["rate", "speed"],
)
async def test_pacing_is_honoured(
    tmp_path: Path, options: ReplayOptions, spacing_s: float, expected_s: float
) -> None:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    events = [request(i, at + timedelta(seconds=i * spacing_s)) for i in range(20)]
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, INTENTS, seed=3)
    async with serve_for_test(registry) as (serve, _client):
        assert await serve.core.wait_ready(10)
        summary = await replay_http(
            load(write_file(tmp_path / "r.jsonl", events)), serve.url, options
        )
    assert summary.ok == 20
    assert expected_s <= summary.seconds < expected_s + 0.6
    assert summary.max_schedule_lag_ms < 250


async def test_a_stop_ends_a_long_paced_replay_early(tmp_path: Path) -> None:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    events = [request(i, at + timedelta(minutes=i)) for i in range(3)]
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, INTENTS, seed=3)
    stop = asyncio.Event()
    async with serve_for_test(registry) as (serve, _client):
        assert await serve.core.wait_ready(10)
        asyncio.get_running_loop().call_later(0.3, stop.set)
        path = write_file(tmp_path / "r.jsonl", events)
        opts = ReplayOptions(expect_same=True)
        summary = await asyncio.wait_for(replay_http(load(path), serve.url, opts, stop=stop), 5)
    assert summary.interrupted and len(summary.outcomes) == 1 and summary.seconds < 2
    assert summary.exit_code() == 1 and "interrupted" in summary.render()


# -- replay to Kafka ---------------------------------------------------------------------------
async def test_replay_to_kafka_lands_the_records_on_the_topics(
    recording: Recording, broker: EmbeddedBroker, prefix: str
) -> None:
    bus = kafka_bus(broker, prefix)
    replay = load(recording.path)
    summary = await replay_kafka(replay, bus, FAST)
    again = await replay_kafka(replay, bus, ReplayOptions(speed=float("inf"), new_ids=True))
    assert (summary.ok, summary.labels_sent, again.ok, again.labels_sent) == (12, 6, 12, 6)
    requests = [decode(RequestEvent, v) for v in await drain(bus, bus.topics.requests, 24)]
    labels = [decode(HardLabel, v) for v in await drain(bus, bus.topics.hard_labels, 12)]
    recorded = {r.event.request_id: r.event for r in replay.requests}
    same = [r for r in requests if r.request_id in recorded]
    fresh = [r for r in requests if r.request_id not in recorded]
    assert len(same) == len(fresh) == 12
    assert all(r == recorded[r.request_id] for r in same)  # byte for byte what was recorded
    assert {(r.conversation_id, r.served_intent) for r in fresh} == {
        (r.conversation_id, r.served_intent) for r in same
    }
    fresh_ids = {r.request_id for r in fresh}
    assert {lb.request_id for lb in labels} == set(recording.labels) | (
        {lb.request_id for lb in labels} & fresh_ids
    )
    assert len({lb.request_id for lb in labels} & fresh_ids) == 6
    assert summary.to_dict()["recorded_accuracy"] is not None


# -- the file format ---------------------------------------------------------------------------
HEADER = json.dumps({"format": FORMAT, "version": 1})
GOOD = json.dumps(
    {
        "topic": "sd.requests",
        "kind": "request",
        "event": request(1, datetime.now(UTC)).model_dump(mode="json"),
    }
)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], ":1: empty file"),
        (['{"format": "other"}'], ":1: not a replay file"),
        ([json.dumps({"format": FORMAT, "version": 2})], ":1: unsupported replay file version 2"),
        ([HEADER, GOOD, "{not json"], ":3: not JSON"),
        ([HEADER, "", GOOD, "[1, 2]"], ":4: expected a JSON object, got list"),
        (
            [HEADER, json.dumps({"kind": "soft-label", "event": {}})],
            ":2: unknown kind 'soft-label'",
        ),
        ([HEADER, json.dumps({"kind": "request"})], ":2: missing 'event' object"),
        ([HEADER, GOOD, GOOD.replace('"turns"', '"turnz"')], ":3: invalid request: "),
        (
            [HEADER, GOOD.replace('"schema_version": 1', '"schema_version": 9')],
            ":2: unsupported schema_version 9",
        ),
    ],
)
def test_malformed_lines_are_named_by_line_number(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(ReplayFileError) as info:
        load(path)
    assert f"{path}{message}" in str(info.value)


def test_cli_reports_a_bad_file_and_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(HEADER + "\n" + GOOD + "\n" + "oops\n")
    code, _, err = run_cli(["replay", str(path), "--url", "http://127.0.0.1:9", "-q"], capsys)
    assert code == 2 and f"{path}:3: not JSON" in err
    code, _, err = run_cli(["replay", str(path), "--to-kafka", "--expect-same", "-q"], capsys)
    assert code == 2 and "need --url" in err
    code, _, err = run_cli(["replay", str(path), "--url", "http://x", "--rate", "0", "-q"], capsys)
    assert code == 2 and "rate must be a positive number" in err
