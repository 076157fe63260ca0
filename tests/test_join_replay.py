"""The join (request ⋈ soft ⋈ hard by request id) and the replay reservoir, checkpoints included."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from stream_distill.events import HardLabel, RequestEvent, SoftLabel, Turn
from stream_distill.trainer.join import Example, JoinState, JoinStats
from stream_distill.trainer.replay import ClassBalancedReplay, ReplayBuffer, make_replay

TS = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
LABELS = ("greet", "refund", "cancel")


def _turns(rid: str) -> tuple[Turn, ...]:
    return (Turn(role="agent", text="hello"), Turn(role="user", text=f"text of {rid}"))


def _req(rid: str, text: str | None = None) -> RequestEvent:
    turns = _turns(rid) if text is None else (Turn(role="user", text=text),)
    return RequestEvent(
        ts=TS,
        request_id=rid,
        conversation_id=f"c-{rid}",
        turns=turns,
        served_intent="greet",
        entropy=0.5,
        margin=0.25,
        model_version="v1",
        latency_ms=1.0,
    )


def _soft(rid: str, version: str = "t1", logits: tuple[float, ...] = (1.0, 0.0, -1.0)) -> SoftLabel:
    return SoftLabel(
        ts=TS,
        request_id=rid,
        teacher_id="teacher",
        teacher_version=version,
        labels=LABELS,
        label_set_version="ls",
        logits=logits,
    )


def _hard(rid: str, fid: str | None = None, intent: str = "refund") -> HardLabel:
    return HardLabel(ts=TS, feedback_id=fid or f"fb-{rid}", request_id=rid, intent=intent)


def _join(**kw: Any) -> JoinState:
    kw.setdefault("holdout_fraction", 0.0)
    return JoinState(**kw)


def _ids(examples: list[Example]) -> list[str]:
    return [ex.request_id for ex in examples]


# -- ready rules -----------------------------------------------------------------------------


def test_request_alone_is_not_ready() -> None:
    j = _join()
    j.add_request(_req("a"))
    assert j.ready_count == 0
    assert j.take_ready(10) == []


def test_request_and_soft_is_ready_once() -> None:
    j = _join()
    j.add_request(_req("a"))
    soft = _soft("a")
    j.add_soft(soft)
    assert j.ready_count == 1
    assert j.take_ready(10) == [Example("a", _turns("a"), soft, None)]
    assert j.ready_count == 0
    assert j.take_ready(10) == []
    j.add_soft(_soft("a", version="t2"))  # a newer teacher, but no hard label: not again
    assert j.take_ready(10) == []


def test_request_and_hard_is_ready() -> None:
    j = _join()
    j.add_request(_req("a"))
    assert j.add_hard(_hard("a", intent="cancel")) is True
    assert j.take_ready(10) == [Example("a", _turns("a"), None, "cancel")]
    assert j.stats.late_hard == 0


@pytest.mark.parametrize("first", ["soft", "hard"])
def test_label_before_request_still_joins(first: str) -> None:
    j = _join()
    if first == "soft":
        j.add_soft(_soft("a"))
    else:
        j.add_hard(_hard("a"))
    assert j.ready_count == 0
    j.add_request(_req("a"))
    [ex] = j.take_ready(10)
    assert ex.request_id == "a" and ex.turns == _turns("a")
    assert (ex.soft is not None) == (first == "soft")
    assert (ex.hard == "refund") == (first == "hard")


def test_soft_and_hard_before_training_gives_one_example_with_both() -> None:
    j = _join()
    j.add_request(_req("a"))
    j.add_soft(_soft("a"))
    j.add_hard(_hard("a"))
    assert j.ready_count == 1
    [ex] = j.take_ready(10)
    assert ex.soft == _soft("a") and ex.hard == "refund"
    assert j.stats.late_hard == 0
    assert j.take_ready(10) == []


def test_late_hard_label_makes_example_ready_again() -> None:
    j = _join()
    j.add_request(_req("a"))
    j.add_soft(_soft("a"))
    [first] = j.take_ready(10)
    assert first.hard is None
    j.add_hard(_hard("a", intent="cancel"))
    assert j.stats.late_hard == 1
    assert j.take_ready(10) == [Example("a", _turns("a"), _soft("a"), "cancel")]
    assert j.take_ready(10) == []
    # A second, different feedback after the hard label was trained is not "late" again.
    j.add_hard(_hard("a", fid="fb-2", intent="greet"))
    assert j.stats.late_hard == 1
    assert j.take_ready(10) == []


def test_take_ready_is_fifo_and_respects_n() -> None:
    j = _join()
    for rid in ("a", "b", "c", "d"):
        j.add_request(_req(rid))
    for rid in ("c", "a", "d", "b"):
        j.add_soft(_soft(rid))
    assert _ids(j.take_ready(3)) == ["c", "a", "d"]
    assert j.ready_count == 1
    assert _ids(j.take_ready(3)) == ["b"]
    assert j.take_ready(0) == []


def test_counters() -> None:
    j = _join()
    j.add_request(_req("a"))
    j.add_request(_req("b"))
    j.add_soft(_soft("a"))
    j.add_hard(_hard("b"))
    assert j.stats == JoinStats(requests=2, soft_labels=1, hard_labels=1)


# -- duplicates ------------------------------------------------------------------------------


def test_duplicate_request_ignored_and_counted() -> None:
    j = _join()
    j.add_request(_req("a", text="first"))
    j.add_soft(_soft("a"))
    j.take_ready(10)
    j.add_request(_req("a", text="second"))
    assert j.stats.duplicates == 1 and j.stats.requests == 1
    assert j.take_ready(10) == []
    j.add_hard(_hard("a"))
    [ex] = j.take_ready(10)
    assert ex.turns == (Turn(role="user", text="first"),)


def test_duplicate_soft_label_ignored_and_counted() -> None:
    j = _join()
    j.add_request(_req("a"))
    j.add_soft(_soft("a", logits=(1.0, 0.0, 0.0)))
    j.add_soft(_soft("a", logits=(9.0, 9.0, 9.0)))  # same teacher version: a redelivery
    assert j.stats.duplicates == 1 and j.stats.soft_labels == 1
    [ex] = j.take_ready(10)
    assert ex.soft is not None and ex.soft.logits == (1.0, 0.0, 0.0)


def test_soft_label_from_a_new_teacher_version_replaces() -> None:
    j = _join()
    j.add_request(_req("a"))
    j.add_soft(_soft("a", version="t1"))
    j.add_soft(_soft("a", version="t2"))
    assert j.stats.duplicates == 0 and j.stats.soft_labels == 2
    [ex] = j.take_ready(10)
    assert ex.soft is not None and ex.soft.teacher_version == "t2"


def _grown_soft(rid: str) -> SoftLabel:
    """A newer teacher version that learnt one more intent, relabelling ``rid`` with it."""
    return SoftLabel(
        ts=TS,
        request_id=rid,
        teacher_id="teacher",
        teacher_version="t3",
        labels=(*LABELS, "promo"),
        label_set_version="ls2",
        logits=(0.0, 0.0, 0.0, 4.0),
    )


def test_a_relabel_with_a_grown_label_set_makes_a_trained_example_ready_again() -> None:
    j = _join()
    j.add_request(_req("a"))
    j.add_soft(_soft("a", version="t1"))
    assert _ids(j.take_ready(10)) == ["a"]
    # the same label set from a newer version (a periodic update): learnt once is enough
    j.add_soft(_soft("a", version="t2"))
    assert j.ready_count == 0 and j.stats.relabelled == 0
    grown = _grown_soft("a")
    j.add_soft(grown)
    [ex] = j.take_ready(10)
    assert ex.soft == grown and j.stats.relabelled == 1
    j.add_soft(grown)  # a duplicate changes nothing
    assert j.ready_count == 0 and j.stats.relabelled == 1


def test_a_relabel_never_trains_a_held_out_example() -> None:
    j = _join(holdout_fraction=1.0)
    j.add_request(_req("a"))
    j.add_soft(_soft("a"))
    j.add_hard(_hard("a"))
    grown = _grown_soft("a")
    j.add_soft(grown)
    assert j.ready_count == 0 and j.stats.relabelled == 0 and len(j.holdout) == 1


def test_duplicate_feedback_id_ignored_and_counted() -> None:
    j = _join()
    j.add_request(_req("a"))
    j.add_request(_req("b"))
    assert j.add_hard(_hard("a", fid="f1", intent="greet")) is True
    assert j.add_hard(_hard("a", fid="f1", intent="cancel")) is False
    assert j.add_hard(_hard("b", fid="f1", intent="cancel")) is False  # id is global
    assert j.stats.duplicates == 2 and j.stats.hard_labels == 1
    assert j.take_ready(10) == [Example("a", _turns("a"), None, "greet")]


def test_applied_feedback_ids_are_bounded() -> None:
    j = _join(applied_ids_size=2)
    j.add_request(_req("a"))
    for fid in ("f1", "f2", "f3"):
        assert j.add_hard(_hard("a", fid=fid))
    assert j.add_hard(_hard("a", fid="f3")) is False
    assert j.add_hard(_hard("a", fid="f1")) is True  # forgotten: the oldest fell out
    assert j.to_json()["feedback_ids"] == ["f3", "f1"]


# -- window ----------------------------------------------------------------------------------


def test_window_evicts_oldest_and_counts() -> None:
    j = _join(window=3)
    for rid in ("a", "b", "c"):
        j.add_request(_req(rid))
        j.add_soft(_soft(rid))
    assert _ids(j.take_ready(1)) == ["a"]  # a is trained; b, c wait in the ready queue
    j.add_request(_req("d"))  # evicts a (trained)
    assert (j.stats.evicted, j.stats.evicted_untrained) == (1, 0)
    j.add_request(_req("e"))  # evicts b (untrained, was ready)
    assert (j.stats.evicted, j.stats.evicted_untrained) == (2, 1)
    assert j.ready_count == 1
    assert _ids(j.take_ready(10)) == ["c"]
    assert [p[0] for p in j.to_json()["pending"]] == ["c", "d", "e"]


def test_label_for_an_evicted_request_opens_a_new_slot() -> None:
    j = _join(window=1)
    j.add_request(_req("a"))
    j.add_request(_req("b"))
    assert j.stats.evicted == 1
    j.add_hard(_hard("a"))  # a's request is gone; the label alone cannot be trained on
    assert j.ready_count == 0
    assert (j.stats.evicted, j.stats.evicted_untrained) == (2, 2)


# -- holdout ---------------------------------------------------------------------------------


def test_is_holdout_golden_values() -> None:
    # sha256(b"a") starts ca978112 -> 0xca978112 / 2**32 = 0.79137...
    assert JoinState(holdout_fraction=0.792).is_holdout("a")
    assert not JoinState(holdout_fraction=0.791).is_holdout("a")
    assert not JoinState(holdout_fraction=0.0).is_holdout("a")
    share = sum(JoinState(holdout_fraction=0.1).is_holdout(f"id-{i}") for i in range(10_000))
    assert 900 < share < 1100  # 1002 with these ids


def test_holdout_examples_never_trained_but_collected() -> None:
    j = JoinState(holdout_fraction=0.5)
    rids = [f"r{i}" for i in range(40)]
    held = {rid for rid in rids if j.is_holdout(rid)}
    assert 0 < len(held) < len(rids)
    for rid in rids:
        j.add_request(_req(rid))
        j.add_soft(_soft(rid))
    trained = _ids(j.take_ready(100))
    assert trained == [rid for rid in rids if rid not in held]
    assert list(j.holdout) == []  # soft labels alone do not make a held-out example
    for rid in rids:
        j.add_hard(_hard(rid, intent=f"i-{rid}"))
    again = _ids(j.take_ready(100))
    assert sorted(again) == sorted(trained)  # late hard labels, training ids only
    expected = [(_turns(rid), f"i-{rid}") for rid in rids if rid in held]
    assert list(j.holdout) == expected
    j.add_hard(_hard(sorted(held)[0], fid="fb-again"))  # recorded once only
    assert list(j.holdout) == expected
    assert j.take_ready(100) == []


def test_holdout_is_bounded() -> None:
    j = JoinState(holdout_fraction=0.999999, holdout_size=3)
    for i in range(5):
        j.add_request(_req(f"r{i}"))
        j.add_hard(_hard(f"r{i}", intent=str(i)))
    assert [y for _, y in j.holdout] == ["2", "3", "4"]


def test_recent_soft_is_newest_first() -> None:
    j = _join()
    for rid in ("a", "b", "c", "d"):
        j.add_request(_req(rid))
    for rid in ("a", "c", "d"):
        j.add_soft(_soft(rid))
    j.add_soft(_soft("zz"))  # no request: not an example
    got = j.recent_soft(2)
    assert _ids(got) == ["d", "c"]
    assert all(ex.hard is None and ex.soft is not None for ex in got)
    assert _ids(j.recent_soft(10)) == ["d", "c", "a"]


# -- checkpoint ------------------------------------------------------------------------------


def _busy_join() -> JoinState:
    j = JoinState(window=6, holdout_fraction=0.3, applied_ids_size=4)  # r6 is held out
    for i in range(8):
        j.add_request(_req(f"r{i}"))  # r0, r1 fall out of the window
    for i in range(2, 8):
        j.add_soft(_soft(f"r{i}", logits=(0.1 * i, -0.5, 1 / 3)))
    j.take_ready(2)  # r2, r3
    for i in (3, 5, 6, 7):
        j.add_hard(_hard(f"r{i}", intent=f"i{i}"))
    j.add_hard(_hard("r5"))  # duplicate feedback id
    j.add_request(_req("r7"))  # duplicate request
    return j


def test_busy_join_covers_every_kind_of_state() -> None:
    j = _busy_join()
    assert j.stats == JoinStats(
        requests=8,
        soft_labels=6,
        hard_labels=4,
        duplicates=2,
        evicted=2,
        evicted_untrained=2,
        late_hard=1,  # r3
    )
    assert j.to_json()["ready"] == ["r4", "r5", "r7", "r3"]
    assert list(j.holdout) == [(_turns("r6"), "i6")]
    assert j.to_json()["feedback_ids"] == ["fb-r3", "fb-r5", "fb-r6", "fb-r7"]


def test_to_json_load_json_round_trip_through_json_text() -> None:
    j = _busy_join()
    data = j.to_json()
    text = json.dumps(data)
    restored = JoinState(window=6, holdout_fraction=0.3, applied_ids_size=4)
    restored.load_json(json.loads(text))
    assert restored.to_json() == json.loads(text)
    assert restored.stats == j.stats
    assert list(restored.holdout) == list(j.holdout)
    assert restored.ready_count == j.ready_count
    assert restored.recent_soft(10) == j.recent_soft(10)
    # The same future: applied feedback ids stay applied, ready order is kept.
    for state in (j, restored):
        assert state.add_hard(_hard("r6", intent="i6")) is False
        state.add_request(_req("new"))
        state.add_hard(_hard("new", intent="x"))
    assert restored.take_ready(100) == j.take_ready(100)
    assert restored.to_json() == j.to_json()


def test_load_json_replaces_existing_state() -> None:
    j = _join()
    j.add_request(_req("stale"))
    j.add_soft(_soft("stale"))
    j.load_json(_join().to_json())
    assert j.ready_count == 0 and j.stats == JoinStats()
    assert j.to_json()["pending"] == []


def test_to_json_is_a_snapshot_not_a_view() -> None:
    j = _join()
    j.add_request(_req("a"))
    data = j.to_json()
    j.add_request(_req("b"))
    j.add_soft(_soft("b"))
    assert data["stats"]["requests"] == 1
    assert data["ready"] == [] and len(data["pending"]) == 1


# -- replay buffer ---------------------------------------------------------------------------

TURNS = (Turn(role="user", text="x"),)


def _ex(i: int, hard: str | None = None, soft: bool = False) -> Example:
    return Example(f"e{i}", TURNS, _soft(f"e{i}") if soft else None, hard)


def _reference_reservoir(n: int, k: int, seed: int) -> list[str]:
    """Algorithm R written out, to pin the buffer's exact choices."""
    rng = random.Random(seed)
    res: list[str] = []
    for i in range(n):
        if len(res) < k:
            res.append(f"e{i}")
            continue
        j = rng.randrange(i + 1)
        if j < k:
            res[j] = f"e{i}"
    return res


def test_buffer_keeps_everything_below_capacity() -> None:
    buf = ReplayBuffer(capacity=5)
    for i in range(3):
        buf.add(_ex(i))
    assert len(buf) == 3 and buf.seen == 3
    assert _ids(buf.items) == ["e0", "e1", "e2"]


def test_buffer_capacity_respected() -> None:
    buf = ReplayBuffer(capacity=10, seed=3)
    for i in range(500):
        buf.add(_ex(i))
        assert len(buf) == min(i + 1, 10)
    assert buf.seen == 500
    assert len(set(_ids(buf.items))) == 10


def test_zero_capacity_keeps_nothing() -> None:
    buf = ReplayBuffer(capacity=0)
    for i in range(5):
        buf.add(_ex(i))
    assert len(buf) == 0 and buf.sample(3) == []


def test_buffer_matches_algorithm_r() -> None:
    buf = ReplayBuffer(capacity=7, seed=42)
    for i in range(300):
        buf.add(_ex(i))
    assert _ids(buf.items) == _reference_reservoir(300, 7, seed=42)


def test_reservoir_is_roughly_uniform() -> None:
    n, k, trials = 1000, 100, 200
    examples = [_ex(i) for i in range(n)]
    per_decile = [0] * 10
    for seed in range(trials):
        buf = ReplayBuffer(capacity=k, seed=seed)
        for ex in examples:
            buf.add(ex)
        for ex in buf.items:
            per_decile[int(ex.request_id[1:]) * 10 // n] += 1
    expected = trials * k / 10  # each item is kept with probability k/n
    assert sum(per_decile) == trials * k
    assert all(abs(c - expected) < 0.06 * expected for c in per_decile), per_decile
    chi2 = sum((c - expected) ** 2 / expected for c in per_decile)
    assert chi2 < 27.9, (chi2, per_decile)  # chi-square, 9 dof, p = 0.001


def test_refreshing_an_existing_id_replaces_in_place() -> None:
    buf = ReplayBuffer(capacity=3, seed=1)
    for i in range(3):
        buf.add(_ex(i))
    rng_before = buf.to_json()["rng"]
    buf.add(_ex(1, hard="refund", soft=True))
    assert _ids(buf.items) == ["e0", "e1", "e2"]
    assert buf.items[1].hard == "refund" and buf.items[1].soft is not None
    assert len(buf) == 3 and buf.seen == 3
    assert buf.to_json()["rng"] == rng_before  # no reservoir draw for a refresh


def test_sample_excludes_given_ids() -> None:
    buf = ReplayBuffer(capacity=10, seed=5)
    for i in range(10):
        buf.add(_ex(i))
    exclude = {f"e{i}" for i in range(0, 10, 2)}
    for _ in range(20):
        got = _ids(buf.sample(3, exclude=exclude))
        assert len(got) == 3 and len(set(got)) == 3
        assert not set(got) & exclude
    assert sorted(_ids(buf.sample(100, exclude=exclude))) == ["e1", "e3", "e5", "e7", "e9"]
    assert buf.sample(0) == []
    assert buf.sample(3, exclude={f"e{i}" for i in range(10)}) == []


def test_buffer_json_round_trip_reproduces_future_samples() -> None:
    buf = ReplayBuffer(capacity=20, seed=9)
    for i in range(60):
        buf.add(_ex(i, hard="greet" if i % 3 else None, soft=i % 2 == 0))
    buf.sample(4)  # move the RNG on from its seed
    text = json.dumps(buf.to_json())
    twin = ReplayBuffer(capacity=20, seed=12345)
    twin.load_json(json.loads(text))
    assert twin.items == buf.items and twin.seen == buf.seen and len(twin) == len(buf)
    for _ in range(5):
        assert twin.sample(6, exclude={"e3"}) == buf.sample(6, exclude={"e3"})
    for i in range(60, 120):
        buf.add(_ex(i))
        twin.add(_ex(i))
    assert twin.items == buf.items
    assert twin.to_json() == buf.to_json()
    twin.add(twin.items[0])  # the index was rebuilt: a known id refreshes, it is not new
    assert twin.seen == buf.seen


# -- class-balanced replay -------------------------------------------------------------------


def _skewed_stream(n: int, seed: int = 0) -> list[Example]:
    """90 % "greet", the rest shared by "refund" and "cancel" (hard labels)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = rng.random()
        out.append(_ex(i, hard="greet" if r < 0.9 else ("refund" if r < 0.95 else "cancel")))
    return out


def test_class_balanced_keeps_a_share_for_rare_classes() -> None:
    stream = _skewed_stream(2000)
    rare_total = sum(ex.hard != "greet" for ex in stream)
    uniform, balanced = ReplayBuffer(60, seed=1), ClassBalancedReplay(60, seed=1)
    for ex in stream:
        uniform.add(ex)
        balanced.add(ex)
        assert len(balanced) <= 60
    assert balanced.counts() == {"greet": 20, "refund": 20, "cancel": 20}
    assert sum(ex.hard != "greet" for ex in uniform.items) < 15  # ~10 % of 60
    drawn = [ex.hard for _ in range(50) for ex in balanced.sample(12)]
    assert drawn.count("greet") < 0.5 * len(drawn)  # batches are no longer 90 % greet
    assert rare_total > 60  # enough rare examples that the bound, not supply, decides


def test_class_balanced_rare_class_keeps_all_it_had() -> None:
    buf = ClassBalancedReplay(30, seed=2)
    for i in range(3):
        buf.add(_ex(i, hard="cancel"))
    for i in range(3, 500):
        buf.add(_ex(i, hard="greet"))
    assert buf.counts() == {"cancel": 3, "greet": 27}  # the rare class loses nothing
    assert {ex.request_id for ex in buf.items} >= {"e0", "e1", "e2"}


def test_class_comes_from_teacher_argmax_without_hard_label_and_moves_on_late_label() -> None:
    buf = ClassBalancedReplay(10, seed=3)
    buf.add(_ex(1, soft=True))  # teacher logits (1, 0, -1): "greet"
    buf.add(_ex(2, hard="cancel"))
    assert buf.counts() == {"greet": 1, "cancel": 1}
    buf.add(_ex(1, hard="refund", soft=True))  # a late hard label decides the class
    assert buf.counts() == {"greet": 0, "cancel": 1, "refund": 1} and len(buf) == 2
    assert len(buf) == 2 and {ex.hard for ex in buf.items} == {"refund", "cancel"}
    buf.add(_ex(2, hard="cancel", soft=True))  # same class: refreshed in place
    assert len(buf) == 2 and any(ex.soft for ex in buf.items if ex.request_id == "e2")


def test_class_balanced_json_round_trip_reproduces_future_state() -> None:
    buf = ClassBalancedReplay(24, seed=4)
    stream = _skewed_stream(400, seed=5)
    for ex in stream[:200]:
        buf.add(ex)
    text = json.dumps(buf.to_json())
    twin = ClassBalancedReplay(24, seed=999)
    twin.load_json(json.loads(text))
    assert twin.counts() == buf.counts() and twin.items == buf.items
    assert twin.sample(5) == buf.sample(5)
    for ex in stream[200:]:
        buf.add(ex)
        twin.add(ex)
    assert twin.to_json() == buf.to_json()


def test_make_replay_follows_the_setting() -> None:
    assert isinstance(make_replay("reservoir", 5), ReplayBuffer)
    assert isinstance(make_replay("class_balanced", 5), ClassBalancedReplay)
