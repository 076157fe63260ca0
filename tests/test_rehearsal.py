"""New intents' examples take a share of each replay draw while they are learnt."""

from __future__ import annotations

from stream_distill.events import SoftLabel, Turn
from stream_distill.trainer.join import Example
from stream_distill.trainer.rehearsal import MAX_REPEAT, NewClassRehearsal

LABELS = ("greet", "refund", "promo")


def _ex(rid: str, hard: str | None = None, top: int | None = None) -> Example:
    soft = None
    if top is not None:
        logits = tuple(4.0 if i == top else 0.0 for i in range(len(LABELS)))
        soft = SoftLabel(
            request_id=rid,
            teacher_id="t",
            teacher_version="v",
            labels=LABELS,
            label_set_version="ls",
            logits=logits,
        )
    return Example(rid, (Turn(role="user", text=rid),), soft, hard)


def _promos(start: int, n: int) -> list[Example]:
    """Half confirmed by users, half the teacher's first choice."""
    return [_ex(f"p{i}", hard="promo") if i % 2 else _ex(f"p{i}", top=2) for i in range(start, n)]


def test_only_examples_of_added_intents_are_rehearsed_and_only_within_the_window() -> None:
    r = NewClassRehearsal(share=0.25, window_steps=100, seed=1)
    assert r.draw(16, step=0) == []  # nothing added yet
    r.observe(_promos(0, 16), step=0)
    assert r.draw(16, step=0) == []  # "promo" was not added then: not kept
    r.added(["promo"], step=10)
    old = [_ex(f"g{i}", hard="greet") if i % 2 else _ex(f"g{i}", top=0) for i in range(16)]
    r.observe(_promos(0, 16) + old, step=20)
    got = r.draw(16, step=20)
    # a quarter of 16 is 4, but 16 pooled examples allow 2: each in about one batch in 8
    assert len(got) == 16 // MAX_REPEAT == 2 and {ex.request_id[0] for ex in got} == {"p"}
    assert all(ex.request_id != "p0" for ex in r.draw(16, step=20, exclude={"p0"}))
    r.observe(_promos(16, 64), step=30)
    assert len(r.draw(16, step=30)) == 4  # the share, not more
    assert len(r.draw(4, step=30)) == 1
    assert r.draw(16, step=110) == []  # the window is over: plain replay again
    assert r.drawn == 2 + 2 + 4 + 1


def test_the_first_example_or_two_are_not_in_every_batch() -> None:
    r = NewClassRehearsal(share=0.5, window_steps=100)
    r.added(["promo"], step=0)
    r.observe(_promos(0, MAX_REPEAT - 1), step=1)
    assert r.draw(32, step=1) == []
    r.observe(_promos(MAX_REPEAT - 1, MAX_REPEAT), step=1)
    assert len(r.draw(32, step=1)) == 1


def test_a_relabel_moves_an_example_in_or_out() -> None:
    r = NewClassRehearsal(share=0.5, window_steps=100)
    r.added(["promo"], step=0)
    r.observe(_promos(0, MAX_REPEAT - 1), step=1)
    r.observe([_ex("x", top=0)], step=1)  # the old teacher called it "greet"
    assert r.draw(8, step=1) == []
    r.observe([_ex("x", top=2)], step=2)  # the updated teacher relabels it "promo"
    assert len(r.draw(8, step=2)) == 1
    r.observe([_ex("x", top=1)], step=3)  # and back out
    assert r.draw(8, step=3) == []


def test_share_zero_is_off() -> None:
    r = NewClassRehearsal(share=0.0, window_steps=100)
    r.added(["promo"], step=0)
    r.observe(_promos(0, 64), step=1)
    assert r.draw(32, step=1) == []
