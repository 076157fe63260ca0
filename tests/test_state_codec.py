"""The checkpoint's compact soft labels: exact round trips, one table per label list."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_distill.events import HardLabel, RequestEvent, SoftLabel, Turn
from stream_distill.trainer.join import Example, JoinState
from stream_distill.trainer.replay import ClassBalancedReplay, ReplayBuffer
from stream_distill.trainer.state_codec import SoftCodec, pack_floats, unpack_floats

LABELS = tuple(f"intent_{i:03d}" for i in range(150))


def _soft(rid: str, seed: int, *, wide: bool = False) -> SoftLabel:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=len(LABELS))
    values = logits if wide else logits.astype(np.float32)
    return SoftLabel(
        request_id=rid,
        teacher_id="t",
        teacher_version="tv1",
        labels=LABELS,
        label_set_version="abc",
        logits=tuple(float(x) for x in values),
        attention=tuple(float(x) for x in rng.random(12).astype(np.float32)),
    )


def test_floats_round_trip_exactly() -> None:
    narrow = [float(x) for x in np.random.default_rng(0).normal(size=50).astype(np.float32)]
    wide = [0.1, 1 / 3, -2.5e-300, 7.0]
    assert pack_floats(narrow).startswith("f4:") and unpack_floats(pack_floats(narrow)) == tuple(
        narrow
    )
    assert pack_floats(wide).startswith("f8:") and unpack_floats(pack_floats(wide)) == tuple(wide)
    with pytest.raises(ValueError):
        unpack_floats("f2:AAAA")


def test_soft_labels_round_trip_and_old_format_still_loads() -> None:
    codec = SoftCodec()
    for soft in (_soft("a", 1), _soft("b", 2, wide=True)):
        packed = json.loads(json.dumps(codec.dump(soft)))
        back = SoftCodec(codec.table()).load(packed)
        assert back == soft
    soft = _soft("c", 3)
    old = json.loads(json.dumps(soft.model_dump(mode="json")))
    assert SoftCodec().load(old) == soft
    with pytest.raises(ValueError):
        SoftCodec().load(codec.dump(_soft("d", 4)))  # a reference to a table it lacks


def _join(n: int) -> JoinState:
    join = JoinState(window=10_000, holdout_fraction=0.0)
    for i in range(n):
        rid = f"r{i}"
        turns = (Turn(role="user", text=f"where is order {i}"),)
        join.add_request(
            RequestEvent(
                request_id=rid,
                conversation_id=f"c{i}",
                turns=turns,
                served_intent=LABELS[0],
                entropy=1.0,
                margin=0.1,
                model_version="v1",
                latency_ms=1.0,
            )
        )
        join.add_soft(_soft(rid, i))
        if i % 3 == 0:
            join.add_hard(HardLabel(feedback_id=f"f{i}", request_id=rid, intent=LABELS[i]))
    return join


def test_join_state_writes_each_label_list_once_and_restores_equal() -> None:
    join = _join(60)
    join.take_ready(20)  # some trained, some still waiting: both kinds are kept
    text = json.dumps(join.to_json())
    assert text.count(LABELS[77]) == 1  # once in the table, not once per soft label
    back = JoinState(window=10_000, holdout_fraction=0.0)
    back.load_json(json.loads(text))
    assert back.to_json() == join.to_json()
    assert back.ready_count == join.ready_count
    assert [e.soft for e in back.take_ready(100)] == [e.soft for e in join.take_ready(100)]


@pytest.mark.parametrize("kind", [ReplayBuffer, ClassBalancedReplay])
def test_replay_writes_each_label_list_once_and_restores_equal(kind: type) -> None:
    replay = kind(capacity=40, seed=3)
    for i in range(80):
        turns = (Turn(role="user", text=f"text {i}"),)
        replay.add(Example(f"r{i}", turns, _soft(f"r{i}", i), LABELS[i % 5] if i % 2 else None))
    text = json.dumps(replay.to_json())
    assert text.count(LABELS[42]) == 1
    back = kind(capacity=40, seed=0)
    back.load_json(json.loads(text))
    assert sorted(back.items, key=lambda e: e.request_id) == sorted(
        replay.items, key=lambda e: e.request_id
    )
