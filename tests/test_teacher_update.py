"""Live teacher updates: hard labels of a new intent → a tuned, validated, versioned teacher
→ every scorer swaps → soft labels carry the new version and the grown label list."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from stream_distill.bus import codec
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import KafkaSettings, TeacherSettings
from stream_distill.data.synthetic import INTENTS, PROMO_INTENTS, labelled_examples
from stream_distill.errors import IntegrityError
from stream_distill.events import HardLabel, RequestEvent, SoftLabel, TeacherPublished, Turn
from stream_distill.models.factory import default_tokenizer_json, tiny_classifier
from stream_distill.models.imprint import classifier_inputs
from stream_distill.models.text import TextEncoder
from stream_distill.teacher.bootstrap import bootstrap_teacher
from stream_distill.teacher.finetune import finetune, validate
from stream_distill.teacher.labelled import Labelled, LabelledSet, UpdatePolicy
from stream_distill.teacher.model import TeacherModel, label_set_version
from stream_distill.teacher.scorer import TeacherScorer
from stream_distill.teacher.store import TeacherStore
from stream_distill.teacher.swap import TeacherSwapper
from stream_distill.teacher.updater import TeacherUpdater
from stream_distill.testing import RecordingHooks, eventually

LABELS = tuple(sorted(INTENTS[:6]))
NEW = PROMO_INTENTS[0]
TS = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher trained in code on six intents (about 10 s on one thread)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("teacher") / "base"
    examples = [(e.turns, e.intent) for e in labelled_examples(600, seed=3, intents=LABELS)]
    bootstrap_teacher(
        examples,
        out,
        max_length=32,
        epochs=5,
        lr=2e-3,
        batch_size=16,
        model_factory=lambda labels: tiny_classifier(labels, layers=2, hidden=64, heads=4),
    )
    return out


def _labelled(n: int, seed: int, intents: tuple[str, ...] = (*LABELS, NEW)) -> list[Labelled]:
    return [
        Labelled(f"r{seed}-{i}", e.turns, e.intent, TS)
        for i, e in enumerate(labelled_examples(n, seed=seed, intents=intents))
    ]


def _request(rid: str, turns: Sequence[Turn]) -> RequestEvent:
    return RequestEvent(
        request_id=rid,
        conversation_id=f"c-{rid}",
        turns=tuple(turns),
        served_intent=LABELS[0],
        entropy=0.5,
        margin=0.1,
        model_version="v1",
        latency_ms=2.0,
    )


def _hard(rid: str, intent: str, fid: str | None = None, ts: datetime = TS) -> HardLabel:
    return HardLabel(feedback_id=fid or f"f-{rid}", request_id=rid, intent=intent, ts=ts)


# -- trigger policy and the labelled set -------------------------------------------------------


def test_trigger_policy() -> None:
    policy = UpdatePolicy(every_labels=100, every_s=60.0, new_intent_min=5)
    known = ("a", "b")

    def reason(counts: dict[str, int], fresh: int = 0, since: float = 0.0, **kw: object) -> object:
        return policy.reason(known=known, counts=counts, fresh=fresh, since_last_s=since, **kw)  # type: ignore[arg-type]

    assert reason({"a": 500, "b": 3}) is None  # known intents alone: nothing new
    assert reason({"a": 5, "c": 4}, fresh=9) is None  # one example short of "c"
    assert reason({"a": 5, "c": 5}) == "new_intent:c"  # at once: no fresh count, no wait
    assert reason({"c": 7, "d": 5}) == "new_intent:c"
    assert policy.new_intents(known, {"a": 9, "d": 5, "c": 6, "e": 4}) == ["c", "d"]
    # after a rejected try with 5 examples, "c" needs 5 more
    assert reason({"c": 9}, tried={"c": 5}) is None
    assert reason({"c": 10}, tried={"c": 5}) == "new_intent:c"
    assert reason({"a": 1}, fresh=99) is None
    assert reason({"a": 1}, fresh=100) == "labels"
    assert reason({"a": 1}, fresh=1, since=59.9) is None
    assert reason({"a": 1}, fresh=1, since=60.0) == "interval"
    assert reason({"a": 1}, fresh=0, since=1e6) is None  # nothing fresh: nothing to learn


def test_updates_add_intents_together_and_refresh_them_as_examples_double() -> None:
    policy = UpdatePolicy(
        every_labels=100, every_s=60.0, new_intent_min=4, join_min=2, refresh_until=16
    )
    known: tuple[str, ...] = ("a", "b")
    counts = {"a": 50, "c": 4, "d": 2, "e": 1}
    assert policy.reason(known=known, counts=counts, fresh=0, since_last_s=0) == "new_intent:c"
    # "d" rides along with two examples; "e" with one does not
    assert policy.joining(known, counts) == ["c", "d"]
    # a rejected try at this count keeps "d" out until it has more
    assert policy.joining(known, counts, tried={"c": 4, "d": 2}) == []
    assert policy.joining(known, {**counts, "d": 3}, tried={"c": 4, "d": 2}) == ["d"]
    # after the update added them: again at once when their examples double
    known = ("a", "b", "c", "d")
    added = {"c": 4, "d": 2}

    def reason(counts: dict[str, int]) -> str | None:
        return policy.reason(known=known, counts=counts, fresh=0, since_last_s=0, added=added)

    assert reason({"a": 50, "c": 7, "d": 3}) is None
    assert reason({"a": 50, "c": 7, "d": 4}) == "refresh:d"
    assert reason({"a": 50, "c": 8, "d": 3}) == "refresh:c"
    assert policy.refreshing({"c": 40, "d": 40}, {"c": 16, "d": 8}) == ["d"]  # c: tuned enough
    # the defaults keep the old behaviour: no joining below new_intent_min, no refresh
    plain = UpdatePolicy(every_labels=100, every_s=60.0, new_intent_min=4)
    assert plain.joining(("a",), {"c": 4, "d": 3}) == ["c"]
    assert plain.refreshing({"c": 100}, {"c": 4}) == []


def test_labelled_set_joins_in_either_order_and_stays_bounded() -> None:
    s = LabelledSet(window=3, max_examples=4, holdout_fraction=0.2)
    turns = (Turn(role="user", text="hi"),)
    assert s.add_hard(_hard("x1", "a")) is None  # its request is not here yet
    joined = s.add_request(_request("x1", turns))
    assert joined is not None and (joined.intent, joined.turns) == ("a", turns)
    s.add_request(_request("x2", turns))
    assert s.add_hard(_hard("x2", "b")) is not None
    assert s.add_hard(_hard("x2", "b")) is None and s.duplicates == 1  # same feedback id
    relabelled = s.add_hard(_hard("x2", "c", fid="f-again"))  # newest confirmation wins
    assert relabelled is not None and relabelled.intent == "c"
    tuning = [rid for rid in ("x1", "x2") if not s.is_holdout(rid)]
    assert list(s.train) == tuning
    assert sum(s.counts().values()) == len(s.train)
    # bounded: the tuning side keeps the newest max_examples, counts follow
    for i in range(40):
        rid = f"y{i}"
        s.add_request(_request(rid, turns))
        s.add_hard(_hard(rid, "d"))
    assert len(s.train) == 4 and len(s.holdout) <= 4
    assert s.counts() == {"d": 4}
    assert len(s._requests) == 3  # the join window
    # the held-out side is a stable hash slice of request ids
    assert all(s.is_holdout(rid) for rid in s.holdout)
    assert not any(s.is_holdout(rid) for rid in s.train)


# -- tuning and validation ---------------------------------------------------------------------


def test_tuning_learns_a_new_intent_and_validation_rejects_a_worse_teacher(base_dir: Path) -> None:
    torch.set_num_threads(1)
    current = TeacherModel.load(base_dir)
    stream = _labelled(400, seed=5)
    train, holdout = stream[:300], stream[300:]
    fresh = [ex for ex in train if ex.intent == NEW][:12]
    replay = [ex for ex in train if ex.intent != NEW]
    settings = TeacherSettings(update_lr=1e-3)
    before = {k: v.clone() for k, v in current.model.state_dict().items()}
    tuned = finetune(current, fresh, replay, settings, new_labels=[NEW])
    # a copy was tuned: the current teacher is untouched; the head grew by one row
    assert all(torch.equal(v, current.model.state_dict()[k]) for k, v in before.items())
    assert tuned.labels == (*LABELS, NEW) and tuned.version != current.version
    assert tuned.label_set_version == label_set_version((*LABELS, NEW))
    verdict = validate(current, tuned, holdout, margin=0.05, min_holdout=20)
    assert verdict.accepted, verdict
    m = verdict.metrics
    assert m["holdout_old"] > 50 and m["holdout_new"] > 3
    assert m["old_accuracy"] >= m["old_accuracy_current"] - 0.05
    assert m["new_intent_recall"] > 0.2  # chance among seven is 1/7, and it started at zero

    # an untrained model over the same labels is much worse on the old intents: rejected
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length=32)
    noise = TeacherModel(tiny_classifier((*LABELS, NEW), layers=2, seed=7), encoder)
    bad = validate(current, noise, holdout, margin=0.05, min_holdout=20, z=1.645)
    assert not bad.accepted and bad.reason.startswith("worse on old intents")
    assert bad.metrics["old_accuracy"] < bad.metrics["old_accuracy_current"] - 0.05
    # ...unless too few held-out labels exist to tell
    assert validate(current, noise, holdout[:10], margin=0.05, min_holdout=20).accepted
    # a candidate that lost a label is rejected whatever it scores
    fewer = TeacherModel(tiny_classifier(LABELS[1:], layers=2), encoder)
    assert validate(current, fewer, holdout, margin=1.0, min_holdout=1).reason.startswith(
        "labels dropped"
    )


def test_an_update_starts_a_new_intents_row_from_its_examples(base_dir: Path) -> None:
    """With imprinting the new row is its two examples' mean features (scaled), and an update
    that barely moves the weights keeps it; without, the row starts from noise."""
    torch.set_num_threads(1)
    current = TeacherModel.load(base_dir)
    stream = _labelled(300, seed=8)
    fresh = [ex for ex in stream if ex.intent == NEW][:2]
    replay = [ex for ex in stream if ex.intent != NEW][:50]
    head = current.model.classifier
    assert isinstance(head, torch.nn.Linear)
    norm = head.weight.detach().norm(dim=1).mean()
    features = classifier_inputs(current.model, current.encoder, [ex.turns for ex in fresh])
    mean = features.mean(dim=0)
    want = mean / mean.norm() * norm

    def new_row(imprint: bool) -> torch.Tensor:
        settings = TeacherSettings(update_steps=1, update_lr=1e-12, imprint_new_intents=imprint)
        tuned = finetune(current, fresh, replay, settings, new_labels=[NEW])
        assert tuned.labels == (*LABELS, NEW)
        assert tuned.metrics["tune_imprinted"] == (1.0 if imprint else 0.0)
        grown = tuned.model.classifier
        assert isinstance(grown, torch.nn.Linear)
        assert torch.allclose(grown.weight[: len(LABELS)], head.weight, atol=1e-6)
        return grown.weight.detach()[len(LABELS)]

    assert torch.allclose(new_row(True), want, atol=1e-4)
    noise = new_row(False)
    assert noise.norm() < 0.5 * want.norm()  # small random weights, nothing like the examples


# -- the store and the swapper -----------------------------------------------------------------


async def test_store_verifies_and_swapper_rejects_bad_versions(
    base_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    base = TeacherModel.load(base_dir)
    store = TeacherStore(tmp_path / "store")
    v1 = store.publish(base, extra={"reason": "seed"})
    assert v1.version == "v1" and v1.manifest["teacher_version"] == base.version
    assert store.manifest_sha256("v1") == v1.sha256
    assert set(v1.manifest["files"]) >= {"model.safetensors", "config.json", "teacher.json"}
    loaded = store.load("v1", v1.sha256)
    assert loaded.version == base.version and loaded.meta["store_version"] == "v1"
    with pytest.raises(IntegrityError):
        store.load("v1", "0" * 64)

    stream = _labelled(200, seed=8)
    grown = finetune(
        base,
        [ex for ex in stream if ex.intent == NEW],
        [ex for ex in stream if ex.intent != NEW],
        TeacherSettings(update_steps=5, update_lr=1e-3),
        new_labels=[NEW],
    )
    v2 = store.publish(grown, parent="v1")
    store.publish(grown, parent="v2")
    assert store.list_versions() == ["v1", "v2", "v3"]
    weights = store.versions_dir / "v3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # a tampered file

    offered: list[TeacherModel] = []
    hooks = RecordingHooks()
    swapper = TeacherSwapper(store, loaded, offered.append, bus=None, hooks=hooks)
    assert swapper.version == "v1"
    assert not await swapper.consider("v3")  # tampered: rejected for good
    assert "v3" in swapper.rejected and offered == []
    assert not await swapper.consider("v2", "ab" * 32)  # the announcement lies: not now...
    assert "v2" not in swapper.rejected and offered == []
    await swapper.converge()  # ...but the store poll takes it (v3 stays rejected)
    assert swapper.version == "v2" and [m.version for m in offered] == [grown.version]
    assert offered[0].labels == (*LABELS, NEW)
    assert not await swapper.consider("v1", v1.sha256)  # never backwards
    swaps = hooks.named("on_teacher_swap")
    assert [(v, ok) for v, ok, _ in swaps] == [("v3", False), ("v2", False), ("v2", True)]
    assert "sha256 differs from manifest" in swaps[0][2]
    assert store.prune(1, protect={"v2"}) == ["v1"]
    assert v2.version in store.list_versions()


async def test_periodic_updates_and_restart_from_the_store(base_dir: Path, tmp_path: Path) -> None:
    """On a memory bus: every N labels, after S seconds, and a restart that resumes quietly."""
    from stream_distill.bus.memory import MemoryBus

    torch.set_num_threads(1)
    bus = MemoryBus()
    await bus.ensure_topics()
    store = TeacherStore(tmp_path / "store")
    settings = TeacherSettings(
        update_every_labels=20,
        update_every_s=60.0,
        update_steps=5,
        update_lr=1e-4,
        update_min_holdout=10_000,  # this test is about when, not how well
        update_holdout_fraction=0.1,
    )
    now = [0.0]
    stream = _labelled(60, seed=31, intents=LABELS)

    async def feed(examples: Sequence[Labelled]) -> None:
        async with bus.producer() as p:
            for ex in examples:
                request = _request(ex.request_id, ex.turns)
                await p.send(bus.topics.requests, codec.encode(request))
                hard = _hard(ex.request_id, ex.intent, ts=datetime.now(UTC))
                await p.send(bus.topics.hard_labels, codec.encode(hard))

    async def running(updater: TeacherUpdater) -> tuple[asyncio.Event, asyncio.Task[None]]:
        stop = asyncio.Event()
        task = asyncio.create_task(updater.run(stop))
        await asyncio.wait_for(updater.ready.wait(), 10)
        return stop, task

    first = TeacherUpdater(
        bus, store, settings, base=TeacherModel.load(base_dir), clock=lambda: now[0]
    )
    stop, task = await running(first)
    await feed(stream[:30])  # 30 labels, about 27 of them tunable: one "labels" update
    await eventually(lambda: len(first.history) == 1, timeout_s=20)
    assert (first.history[0].reason, first.history[0].version) == ("labels", "v2")
    assert first.fresh == 0 and first.teacher.labels == LABELS  # no new intent: no new row
    await feed(stream[30:33])  # a few fresh labels: nothing until the interval has passed
    await asyncio.sleep(0.5)
    assert len(first.history) == 1 and first.fresh > 0
    now[0] += 61.0
    await eventually(lambda: len(first.history) == 2, timeout_s=20)
    assert (first.history[1].reason, first.history[1].version) == ("interval", "v3")
    stop.set()
    await asyncio.wait_for(task, 10)

    # A restart rebuilds the labelled set from the log, and finds nothing fresh in it.
    again = TeacherUpdater(bus, store, settings, base=None, clock=lambda: now[0])
    stop, task = await running(again)
    await eventually(lambda: len(again.labelled.train) == len(first.labelled.train), timeout_s=10)
    assert again.version == "v3" and again.teacher.version == first.teacher.version
    assert again.fresh == 0 and again.due() is None
    now[0] += 1000.0
    await asyncio.sleep(0.5)
    assert again.history == []
    stop.set()
    await asyncio.wait_for(task, 10)
    announced = [
        codec.decode(TeacherPublished, r.value) for r in bus.records(bus.topics.teacher_models)
    ]
    assert [(e.version, e.reason, e.parent) for e in announced] == [
        ("v1", "seed", None),
        ("v2", "labels", "v1"),
        ("v3", "interval", "v2"),
    ]


def test_update_metrics_and_store_location() -> None:
    from prometheus_client import CollectorRegistry

    from stream_distill.app import teacher_store_dir
    from stream_distill.config import Settings
    from stream_distill.metrics.prometheus import PrometheusHooks

    registry = CollectorRegistry()
    hooks = PrometheusHooks(registry)
    hooks.on_teacher_update(f"new_intent:{NEW}", True, 4.2)
    hooks.on_teacher_update("labels", False, 3.0)
    hooks.on_teacher_swap("v2", True)
    hooks.on_teacher_swap("v3", False, "labels dropped: ['a']")
    value = registry.get_sample_value
    assert value("sd_teacher_updates_total", {"trigger": "new_intent", "result": "published"}) == 1
    assert value("sd_teacher_updates_total", {"trigger": "labels", "result": "rejected"}) == 1
    assert value("sd_teacher_update_seconds_count") == 2
    assert value("sd_teacher_swaps_total", {"result": "ok"}) == 1
    assert value("sd_teacher_swaps_total", {"result": "labels_dropped"}) == 1
    assert value("sd_teacher_info", {"version": "v2"}) == 1

    assert teacher_store_dir(Settings(data_dir=Path("d"))) == Path("d/teacher-store")
    moved = Settings.model_validate({"teacher": {"store_dir": "/shared/teachers"}})
    assert teacher_store_dir(moved) == Path("/shared/teachers")


# -- the whole path on a real broker -----------------------------------------------------------


async def _send_all(bus: KafkaBus, topic: str, events: Sequence[RequestEvent | HardLabel]) -> None:
    async with bus.producer() as p:
        await asyncio.gather(
            *(
                p.send(
                    topic, codec.encode(e), key=e.request_id.encode(), headers=codec.headers_for(e)
                )
                for e in events
            )
        )


async def test_new_intent_update_reaches_scorer_and_soft_labels(
    broker: EmbeddedBroker, prefix: str, base_dir: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    bus = KafkaBus(KafkaSettings(topic_prefix=prefix, partitions=2), broker.bootstrap)
    await bus.ensure_topics()
    topics = bus.topics
    settings = TeacherSettings(
        batch_size=8,
        batch_wait_ms=20,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        emit_attention=False,
        new_intent_min_examples=8,
        update_every_labels=100_000,  # only the new intent may trigger
        update_lr=1e-3,
        precision="float32",  # soft labels are compared with the new teacher's to 1e-4
        update_holdout_fraction=0.2,
        update_min_holdout=10,
        update_margin=0.25,  # quality is the unit test's business; here: the path
        store_poll_s=600.0,  # the announcement, not the poll, must carry the swap
    )
    store = TeacherStore(tmp_path / "store")
    updater_hooks, scorer_hooks = RecordingHooks(), RecordingHooks()
    updater = TeacherUpdater(
        bus, store, settings, base=TeacherModel.load(base_dir), hooks=updater_hooks
    )
    first = TeacherModel.load(base_dir)  # the scorer's own copy, as in its own process
    scorer = TeacherScorer(bus, first, settings, scorer_hooks)
    swapper = TeacherSwapper(
        store, first, scorer.offer, bus=bus, hooks=scorer_hooks, poll_interval_s=600.0
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(updater.run(stop)), asyncio.create_task(scorer.run(stop))]
    try:
        async with swapper:
            await asyncio.wait_for(updater.ready.wait(), 20)
            await asyncio.wait_for(swapper.positioned.wait(), 20)
            assert store.list_versions() == ["v1"]  # the base teacher, seeded

            # Traffic over seven intents, one the teacher has never seen, with hard labels.
            stream = _labelled(160, seed=21)
            requests = [_request(ex.request_id, ex.turns) for ex in stream]
            await _send_all(bus, topics.requests, requests)
            # The old teacher scores them all before any label arrives.
            await eventually(lambda: scorer.scored >= len(stream), timeout_s=30, every_s=0.1)
            hard = [_hard(ex.request_id, ex.intent) for ex in stream]
            await _send_all(bus, topics.hard_labels, hard)
            await eventually(lambda: bool(updater.history), timeout_s=40, every_s=0.1)
            result = updater.history[0]
            assert result.reason == f"new_intent:{NEW}" and result.version == "v2", result
            new_teacher = updater.teacher
            assert new_teacher.labels == (*LABELS, NEW)
            assert "new_intent_recall" in result.verdict.metrics
            manifest = store.read_manifest("v2")
            assert manifest["parent"] == "v1" and manifest["labels"] == [*LABELS, NEW]

            # Every scorer hears the announcement, verifies and swaps between batches.
            await eventually(lambda: scorer.model.version == new_teacher.version, timeout_s=20)
            assert swapper.version == "v2"
            assert ("v2", True, "") in scorer_hooks.named("on_teacher_swap")

            # New requests are scored by the new teacher, over the grown label list.
            fresh = _labelled(12, seed=22)
            await _send_all(
                bus, topics.requests, [_request(ex.request_id, ex.turns) for ex in fresh]
            )
            wanted = {ex.request_id for ex in fresh}
            everything = wanted | {ex.request_id for ex in stream}
            soft = await _soft_labels(bus, lambda got: everything <= set(got), timeout_s=30)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

    for rid in wanted:
        label = soft[rid]
        assert label.teacher_version == new_teacher.version
        assert label.labels == (*LABELS, NEW) and len(label.logits) == 7
        assert label.label_set_version == label_set_version((*LABELS, NEW))
        assert label.label_set_version != first.label_set_version
    expected = new_teacher.predict([ex.turns for ex in fresh], attention=False).logits
    got = np.array([soft[ex.request_id].logits for ex in fresh])
    assert np.allclose(got, expected, atol=1e-4)
    # Requests scored before the swap keep the old version and list, except those the new
    # teacher assigns to the new intent: the updater scored the recent requests again and
    # relabelled them (keyed like the scorer's, so the relabel is the newer on its partition).
    says = new_teacher.predict_labels([ex.turns for ex in stream])
    relabelled = {ex.request_id for ex, intent in zip(stream, says, strict=True) if intent == NEW}
    assert relabelled  # the stream holds the new intent's requests: some are found
    for ex in stream:
        label = soft[ex.request_id]
        if ex.request_id in relabelled:
            assert label.teacher_version == new_teacher.version
            assert label.labels == (*LABELS, NEW)
        else:
            assert label.teacher_version == first.version and label.labels == LABELS
    redone = [ex for ex in stream if ex.request_id in relabelled]
    expected_new = new_teacher.predict([ex.turns for ex in redone], attention=False).logits
    got_new = np.array([soft[ex.request_id].logits for ex in redone])
    assert np.allclose(got_new, expected_new, atol=1e-4)
    assert updater_hooks.named("on_teacher_relabel") == [(len(stream), len(relabelled))]
    # the announcement on the teacher-models topic
    announced = await _records(bus, topics.teacher_models, TeacherPublished, 2)
    assert [(e.version, e.reason) for e in announced] == [
        ("v1", "seed"),
        ("v2", f"new_intent:{NEW}"),
    ]
    assert announced[1].sha256 == store.manifest_sha256("v2")
    assert announced[1].teacher_version == new_teacher.version
    assert [args[:2] for args in updater_hooks.named("on_teacher_update")] == [
        (f"new_intent:{NEW}", True)
    ]
    assert json.loads((store.versions_dir / "v2" / "teacher.json").read_text())["labels"][-1] == NEW


async def _soft_labels(
    bus: KafkaBus, done: Callable[[dict[str, SoftLabel]], bool], timeout_s: float
) -> dict[str, SoftLabel]:
    """Soft labels by request id (the newest per id) until ``done(labels)`` holds."""
    out: dict[str, SoftLabel] = {}
    consumer = bus.consumer([bus.topics.soft_labels], group_id=None, offset_reset="earliest")
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    async with consumer:
        while not done(out):
            if loop.time() > end:
                raise AssertionError(f"only {len(out)} soft labels within {timeout_s}s")
            for record in await consumer.getmany(timeout_ms=200):
                label = codec.decode(SoftLabel, record.value)
                out[label.request_id] = label
    return out


async def _records(
    bus: KafkaBus, topic: str, kind: type[TeacherPublished], n: int
) -> list[TeacherPublished]:
    found: list[TeacherPublished] = []
    consumer = bus.consumer([topic], group_id=None, offset_reset="earliest")
    async with consumer:
        for _ in range(50):
            found += [codec.decode(kind, r.value) for r in await consumer.getmany(timeout_ms=200)]
            if len(found) >= n:
                break
    return sorted(found, key=lambda e: e.version)


def test_worse_means_significantly_worse_on_the_same_examples() -> None:
    from stream_distill.teacher.finetune import significantly_worse

    before = [True] * 60 + [False] * 2
    three_lost = [False] * 3 + [True] * 57 + [False] * 2  # 0.968 -> 0.919 on 62 labels
    assert significantly_worse(before, three_lost, 0.02, 0.0)  # the plain margin rule
    assert not significantly_worse(before, three_lost, 0.02, 1.645)  # within the noise
    many_lost = [False] * 20 + [True] * 40 + [True] * 2  # 20 lost, 2 gained
    assert significantly_worse(before, many_lost, 0.02, 1.645)
    assert not significantly_worse(before, before, 0.0, 0.0)


async def test_intents_that_appear_together_are_added_together_refreshed_and_relabelled(
    base_dir: Path, tmp_path: Path
) -> None:
    """On a memory bus: one update adds every unknown intent with enough labels, the recent
    requests it assigns to them get soft labels of the new version, and an added intent is
    tuned again when its labels double."""
    from stream_distill.bus.memory import MemoryBus

    torch.set_num_threads(1)
    bus = MemoryBus()
    await bus.ensure_topics()
    settings = TeacherSettings(
        new_intent_min_examples=4,
        new_intent_join_examples=2,
        new_intent_refresh_until=16,
        update_every_labels=100_000,
        update_steps=5,
        update_min_holdout=10_000,  # this test is about what is added, not how well
        update_holdout_fraction=1e-9,
        emit_attention=False,
        precision="float32",
    )
    hooks = RecordingHooks()
    updater = TeacherUpdater(
        bus, TeacherStore(tmp_path / "store"), settings, base=TeacherModel.load(base_dir),
        hooks=hooks,
    )  # fmt: skip
    first, second = PROMO_INTENTS
    third = INTENTS[6]
    assert third not in LABELS

    async def feed(examples: Sequence[Labelled]) -> None:
        async with bus.producer() as p:
            for ex in examples:
                await p.send(bus.topics.requests, codec.encode(_request(ex.request_id, ex.turns)))
                hard = _hard(ex.request_id, ex.intent, ts=datetime.now(UTC))
                await p.send(bus.topics.hard_labels, codec.encode(hard))

    def some(intent: str, n: int, seed: int) -> list[Labelled]:
        return _labelled(n, seed=seed, intents=(intent,))

    stop = asyncio.Event()
    task = asyncio.create_task(updater.run(stop))
    try:
        await asyncio.wait_for(updater.ready.wait(), 10)
        unlabelled = _labelled(30, seed=41, intents=(*LABELS, first))
        async with bus.producer() as p:  # traffic without feedback: relabel candidates
            for ex in unlabelled:
                await p.send(bus.topics.requests, codec.encode(_request(ex.request_id, ex.turns)))
        await feed([*some(second, 2, 42), *some(third, 1, 43), *some(first, 4, 44)])
        await eventually(lambda: len(updater.history) == 1, timeout_s=30)
        assert (updater.history[0].reason, updater.history[0].version) == (
            f"new_intent:{first}",
            "v2",
        )
        # the second rode along with two labels; the third, with one, waits
        assert updater.teacher.labels == (*LABELS, first, second)
        assert updater.added == {first: 4, second: 2}
        # both learnt intents' recent requests were scored again and relabelled
        [(scored, published)] = hooks.named("on_teacher_relabel")
        assert scored == 30 + 7
        relabels = [codec.decode(SoftLabel, r.value) for r in bus.records(bus.topics.soft_labels)]
        assert len(relabels) == published
        assert all(lb.teacher_version == updater.teacher.version for lb in relabels)
        says = dict(
            zip(
                [ex.request_id for ex in unlabelled],
                updater.teacher.predict_labels([ex.turns for ex in unlabelled]),
                strict=True,
            )
        )
        wanted = {rid for rid, intent in says.items() if intent in (first, second)}
        assert wanted <= {lb.request_id for lb in relabels}

        # two more of the second doubles its labels: tuned again at once
        await feed(some(second, 2, 45))
        await eventually(lambda: len(updater.history) == 2, timeout_s=30)
        assert updater.history[1].reason == f"refresh:{second}"
        assert updater.added[second] == 4
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
