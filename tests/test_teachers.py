"""Several teachers: golden fusion values, label alignment, weights, join and round trips."""

from __future__ import annotations

import json
import math

import pytest

from stream_distill.events import HardLabel, RequestEvent, SoftLabel, Turn
from stream_distill.trainer.join import JoinState
from stream_distill.trainer.replay import ReplayBuffer, example_from_json, example_to_json
from stream_distill.trainer.teachers import MASKED, TeacherPanel, aligned, fuse, softened


def _soft(rid: str, tid: str, labels: tuple[str, ...], logits: tuple[float, ...], v: str = "1"):
    return SoftLabel(
        request_id=rid,
        teacher_id=tid,
        teacher_version=v,
        labels=labels,
        label_set_version="x",
        logits=logits,
    )


def _request(rid: str) -> RequestEvent:
    return RequestEvent(
        request_id=rid,
        conversation_id="c",
        turns=(Turn(role="user", text=f"hello {rid}"),),
        served_intent="a",
        entropy=0.0,
        margin=0.0,
        model_version="v",
        latency_ms=0.0,
    )


def _probs(logits: list[float], t: float) -> list[float]:
    """softmax(logits / T) over the unmasked entries: what the KD loss sees."""
    live = [x / t for x in logits if x > MASKED]
    e = [math.exp(x) for x in live]
    return [v / sum(e) for v in e]


# -- fusion --------------------------------------------------------------------------------


def test_fuse_golden_two_teachers_different_label_lists_weighted() -> None:
    # A knows (a, b, c): softmax(2, 0, 0) = (0.786986, 0.106507, 0.106507).
    # B knows (c, b) only: softmax(0, ln 3) = (0.25, 0.75), i.e. a=0, b=0.75, c=0.25.
    # Weights 1 and 3: ((0.786986) / 4, (0.106507 + 2.25) / 4, (0.106507 + 0.75) / 4).
    out = fuse(
        [(("a", "b", "c"), (2.0, 0.0, 0.0), 1.0), (("c", "b"), (0.0, math.log(3.0)), 3.0)],
        ("a", "b", "c", "d"),
        1.0,
    )
    assert out is not None
    assert out[3] == MASKED  # no teacher knows d
    assert _probs(out, 1.0) == pytest.approx([0.196747, 0.589127, 0.214127], abs=1e-6)
    assert out[:3] == pytest.approx([math.log(0.1967465), math.log(0.5891268), math.log(0.2141268)])


def test_fuse_golden_at_temperature_two_equal_weights() -> None:
    # T=2: A softmax(1, 0, 0) = (0.576117, 0.211942, 0.211942);
    # B softmax(0, ln3 / 2) over (c, b) = (0.366025, 0.633975).
    out = fuse(
        [(("a", "b", "c"), (2.0, 0.0, 0.0), 1.0), (("c", "b"), (0.0, math.log(3.0)), 1.0)],
        ("a", "b", "c"),
        2.0,
    )
    assert out is not None
    golden = [0.576117 / 2, (0.211942 + 0.633975) / 2, (0.211942 + 0.366025) / 2]
    assert _probs(out, 2.0) == pytest.approx(golden, abs=1e-6)
    assert out == pytest.approx([2.0 * math.log(p) for p in golden], abs=1e-5)


def test_one_teacher_fuses_to_its_own_distribution() -> None:
    logits = (0.3, -1.2, 2.5)
    out = fuse([(("a", "b", "c"), logits, 0.7)], ("a", "b", "c"), 3.0)
    assert out is not None
    assert _probs(out, 3.0) == pytest.approx(softened(logits, 3.0), rel=1e-9)


def test_alignment_by_name_drops_unknown_labels_and_renormalises() -> None:
    # (a, b, z) with softmax (0.25, 0.25, 0.5); the student knows (b, a): z's mass goes.
    probs = softened((0.0, 0.0, math.log(2.0)), 1.0)
    assert probs == pytest.approx([0.25, 0.25, 0.5])
    assert aligned(("a", "b", "z"), probs, ("b", "a")) == pytest.approx([0.5, 0.5])
    assert aligned(("a", "z"), [0.5, 0.5], ("a", "b")) is None  # one shared label: no target


def test_teachers_without_weight_or_shared_labels_are_left_out() -> None:
    good = (("a", "b"), (1.0, 0.0), 1.0)
    assert fuse([good, (("a", "b"), (0.0, 5.0), 0.0)], ("a", "b"), 1.0) == fuse(
        [good], ("a", "b"), 1.0
    )
    assert fuse([good, (("a", "q"), (0.0, 5.0), 9.0)], ("a", "b"), 1.0) == fuse(
        [good], ("a", "b"), 1.0
    )
    assert fuse([(("x", "y"), (1.0, 0.0), 1.0)], ("a", "b"), 1.0) is None
    assert fuse([], ("a", "b"), 1.0) is None


# -- weights -------------------------------------------------------------------------------


def test_panel_rolling_accuracy_and_adaptive_weights_golden() -> None:
    panel = TeacherPanel("adaptive", decay=0.5, temperature=0.1)
    labels = ("a", "b")
    for hard in ("a", "b", "a"):  # teacher t always says "a": hit, miss, hit
        panel.observe([_soft("r", "t", labels, (1.0, 0.0))], hard)
    # hits 1 → 0.5 → 1.25, seen 1 → 1.5 → 1.75: (1.25 + 1) / (1.75 + 2) = 0.6
    assert panel.accuracy("t") == pytest.approx(0.6)
    assert panel.accuracy("never-seen") == 0.5
    # softmax(0.6 / 0.1, 0.5 / 0.1) = (e / (e + 1), 1 / (e + 1))
    e = math.e
    assert panel.weights(["t", "u"]) == pytest.approx([e / (e + 1), 1 / (e + 1)])
    twin = TeacherPanel("adaptive", decay=0.5, temperature=0.1)
    twin.load_json(json.loads(json.dumps(panel.to_json())))
    assert twin.accuracy("t") == panel.accuracy("t") and twin.to_json() == panel.to_json()


def test_panel_static_weights_and_fused_target() -> None:
    panel = TeacherPanel("static", {"big": 3.0})
    assert panel.weights(["big", "other"]) == [3.0, 1.0]
    softs = [
        _soft("r", "other", ("a", "b", "c"), (2.0, 0.0, 0.0)),
        _soft("r", "big", ("c", "b"), (0.0, math.log(3.0))),
    ]
    assert panel.target(softs, ("a", "b", "c", "d"), 1.0) == fuse(
        [(("a", "b", "c"), (2.0, 0.0, 0.0), 1.0), (("c", "b"), (0.0, math.log(3.0)), 3.0)],
        ("a", "b", "c", "d"),
        1.0,
    )


# -- join and round trips ------------------------------------------------------------------


def test_join_keeps_one_soft_label_per_teacher() -> None:
    js = JoinState(holdout_fraction=0.0)
    js.add_request(_request("r1"))
    js.add_soft(_soft("r1", "t1", ("a", "b"), (1.0, 0.0)))
    js.add_soft(_soft("r1", "t2", ("a", "b"), (0.0, 1.0)))
    js.add_soft(_soft("r1", "t2", ("a", "b"), (0.0, 1.0)))  # same teacher, same version
    js.add_soft(_soft("r1", "t1", ("a", "b"), (0.0, 2.0), v="2"))  # t1's newer version
    assert js.stats.duplicates == 1 and js.stats.soft_labels == 3
    twin = JoinState(holdout_fraction=0.0)
    twin.load_json(json.loads(json.dumps(js.to_json())))
    for state in (js, twin):
        (ex,) = state.take_ready(10)
        by_teacher = {s.teacher_id: s for s in ex.teacher_labels}
        assert set(by_teacher) == {"t1", "t2"}
        assert by_teacher["t1"].teacher_version == "2" and ex.soft == by_teacher["t1"]


def test_single_teacher_examples_stay_lean() -> None:
    js = JoinState(holdout_fraction=0.0)
    js.add_request(_request("r1"))
    js.add_soft(_soft("r1", "t1", ("a", "b"), (1.0, 0.0)))
    (ex,) = js.take_ready(1)
    assert ex.softs == () and ex.teacher_labels == (ex.soft,)
    assert js.to_json()["pending"][0][6] == []


def test_multi_teacher_examples_round_trip_through_replay_json() -> None:
    js = JoinState(holdout_fraction=0.0)
    js.add_request(_request("r1"))
    js.add_soft(_soft("r1", "t1", ("a", "b"), (1.0, 0.0)))
    js.add_soft(_soft("r1", "t2", ("b", "a"), (0.5, 0.0)))
    (ex,) = js.take_ready(1)
    back = example_from_json(json.loads(json.dumps(example_to_json(ex))))
    assert back.soft == ex.soft
    assert sorted(s.teacher_id for s in back.teacher_labels) == ["t1", "t2"]
    buf = ReplayBuffer(4)
    buf.add(ex)
    twin = ReplayBuffer(4)
    twin.load_json(json.loads(json.dumps(buf.to_json())))
    assert {s.teacher_id for s in twin.items[0].teacher_labels} == {"t1", "t2"}


def test_join_can_wait_for_several_teachers() -> None:
    js = JoinState(holdout_fraction=0.0, min_teachers=2)
    for rid in ("r1", "r2"):
        js.add_request(_request(rid))
        js.add_soft(_soft(rid, "t1", ("a", "b"), (1.0, 0.0)))
    assert js.ready_count == 0  # one teacher of two
    js.add_soft(_soft("r1", "t2", ("a", "b"), (0.0, 1.0)))
    js.add_hard(HardLabel(feedback_id="f2", request_id="r2", intent="a"))  # a hard label will do
    got = {ex.request_id: ex for ex in js.take_ready(10)}
    assert set(got) == {"r1", "r2"} and len(got["r1"].teacher_labels) == 2
