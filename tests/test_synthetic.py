from __future__ import annotations

import itertools
import time
from collections import Counter

import pytest

from stream_distill.data.dialogue_phrases import ACCEPTS
from stream_distill.data.synthetic import (
    INTENTS,
    PROMO_INTENTS,
    LabeledTurn,
    TrafficConfig,
    TrafficGenerator,
    labelled_examples,
)
from stream_distill.data.templates import USER_TEMPLATES


def _last_texts(examples: list[LabeledTurn]) -> list[str]:
    return [e.turns[-1].text for e in examples]


def test_same_seed_gives_identical_output() -> None:
    a = labelled_examples(2000, seed=7)
    b = labelled_examples(2000, seed=7)
    assert a == b
    assert a[0].conversation_id.startswith("c7-")


def test_different_seeds_give_different_text() -> None:
    a = _last_texts(labelled_examples(500, seed=1))
    b = _last_texts(labelled_examples(500, seed=2))
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 400


def test_label_space() -> None:
    assert len(INTENTS) >= 22
    assert len(set(INTENTS)) == len(INTENTS)
    for intent in INTENTS + PROMO_INTENTS:
        assert len(set(USER_TEMPLATES[intent])) >= 8, intent


def test_all_intents_appear() -> None:
    examples = labelled_examples(5000, seed=3)
    seen = Counter(e.intent for e in examples)
    assert len(seen) >= 20
    assert set(seen) == set(INTENTS)
    # No intent should be starved: uniform sampling gives ~5000/22 ~ 230 each.
    assert min(seen.values()) > 80
    assert {e.confirmed_intent for e in examples} <= set(INTENTS)


def test_dialogue_shape() -> None:
    for e in labelled_examples(3000, seed=4):
        assert e.turns[-1].role == "user"
        assert all(t.text for t in e.turns)
        roles = [t.role for t in e.turns]
        if roles[0] == "agent":  # optional greeting
            roles = roles[1:]
        assert roles == ["user", "agent"] * (len(roles) // 2) + ["user"]
        assert len(roles) <= 2 * 4 - 1


def test_conversation_turns_grow_by_prefix() -> None:
    gen = TrafficGenerator(TrafficConfig(seed=5))
    ids: set[str] = set()
    multi_turn = 0
    for _ in range(500):
        conversation = gen.conversation()
        assert 1 <= len(conversation) <= 4
        cid = conversation[0].conversation_id
        assert cid not in ids
        ids.add(cid)
        assert not conversation[0].context_dependent
        multi_turn += len(conversation) > 1
        for before, after in itertools.pairwise(conversation):
            assert after.conversation_id == cid
            assert after.turns[: len(before.turns)] == before.turns
            assert len(after.turns) == len(before.turns) + 2
            assert after.turns[len(before.turns)].role == "agent"
    assert multi_turn > 250


def test_turns_yields_exactly_n_and_continues_the_stream() -> None:
    gen = TrafficGenerator(TrafficConfig(seed=6))
    first = list(gen.turns(1001))
    second = list(gen.turns(10))
    assert len(first) == 1001 and len(second) == 10
    assert first[-1].conversation_id != second[0].conversation_id
    assert list(TrafficGenerator(TrafficConfig(seed=6)).turns(0)) == []
    with pytest.raises(ValueError):
        list(gen.turns(-1))


def test_context_dependent_fraction() -> None:
    examples = labelled_examples(5000, seed=8)
    frac = sum(e.context_dependent for e in examples) / len(examples)
    assert 0.15 <= frac <= 0.25

    dependent = [e for e in examples if e.context_dependent]
    previous_intent = {}
    for e in examples:
        previous_intent[(e.conversation_id, len(e.turns))] = e.intent
    inherited = changed = 0
    for e in dependent:
        prev = previous_intent[(e.conversation_id, len(e.turns) - 2)]
        if e.intent == prev:
            inherited += 1
        else:
            changed += 1
    # Both "what about the other one?" (same intent) and "actually just cancel it" / accepting an
    # offer (intent moves) must be represented.
    assert inherited > 100 and changed > 100

    accepts = [e for e in dependent if e.turns[-1].text.lower() in ACCEPTS]
    assert len(accepts) > 50
    assert all(e.turns[-2].role == "agent" and "?" in e.turns[-2].text for e in accepts)


def test_followup_rate_is_configurable() -> None:
    default = labelled_examples(1000, seed=9)
    assert any(e.context_dependent for e in default)
    off = list(TrafficGenerator(TrafficConfig(seed=9, followup_rate=0.0)).turns(2000))
    assert not any(e.context_dependent for e in off)
    single = list(TrafficGenerator(TrafficConfig(seed=9, max_user_turns=1)).turns(500))
    assert all(len(e.turns) <= 2 and not e.context_dependent for e in single)


def test_wrong_confirmation_fraction() -> None:
    examples = labelled_examples(5000, seed=10)
    frac = sum(e.confirmed_intent != e.intent for e in examples) / len(examples)
    assert 0.01 <= frac <= 0.06

    honest = list(TrafficGenerator(TrafficConfig(seed=10, wrong_confirmation_rate=0.0)).turns(2000))
    assert all(e.confirmed_intent == e.intent for e in honest)
    liars = list(TrafficGenerator(TrafficConfig(seed=10, wrong_confirmation_rate=1.0)).turns(2000))
    assert all(e.confirmed_intent != e.intent for e in liars)


def test_typos_are_injected_at_the_configured_rate() -> None:
    clean = list(TrafficGenerator(TrafficConfig(seed=11, typo_rate=0.0)).turns(4000))
    noisy = list(TrafficGenerator(TrafficConfig(seed=11)).turns(4000))
    # The typo stream is separate, so only the text differs.
    assert [e.intent for e in clean] == [e.intent for e in noisy]
    pairs = list(zip(_last_texts(clean), _last_texts(noisy), strict=True))
    changed = [(c, n) for c, n in pairs if c != n]
    assert 0.06 <= len(changed) / len(pairs) <= 0.14
    # One or two character edits: lengths differ by at most two.
    assert all(abs(len(c) - len(n)) <= 2 for c, n in changed)

    always = list(TrafficGenerator(TrafficConfig(seed=11, typo_rate=1.0)).turns(1000))
    assert all(a != c for a, c in zip(_last_texts(always), _last_texts(clean[:1000]), strict=True))


def test_promo_intents_are_disjoint_and_selectable() -> None:
    assert len(PROMO_INTENTS) == 2
    assert not set(PROMO_INTENTS) & set(INTENTS)

    promo_only = labelled_examples(500, seed=12, intents=PROMO_INTENTS)
    assert {e.intent for e in promo_only} == set(PROMO_INTENTS)
    assert {e.confirmed_intent for e in promo_only} <= set(PROMO_INTENTS)

    grown = labelled_examples(5000, seed=12, intents=INTENTS + PROMO_INTENTS)
    seen = {e.intent for e in grown}
    assert seen == set(INTENTS + PROMO_INTENTS)


def test_restricted_intents_stay_in_the_label_space() -> None:
    subset = ("order_status", "cancel_order", "refund_request")
    examples = labelled_examples(2000, seed=13, intents=subset)
    assert {e.intent for e in examples} == set(subset)
    assert {e.confirmed_intent for e in examples} <= set(subset)
    assert any(e.context_dependent for e in examples)


@pytest.mark.parametrize(
    "config",
    [
        {"intents": ()},
        {"intents": ("order_status", "no_such_intent")},
        {"intents": ("order_status", "order_status")},
        {"typo_rate": 1.5},
        {"wrong_confirmation_rate": -0.1},
        {"followup_rate": 2.0},
        {"max_user_turns": 0},
    ],
)
def test_invalid_config_is_rejected(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TrafficConfig(**config)  # type: ignore[arg-type]


def test_throughput() -> None:
    # The requirement is >= 20k turns/s; the bound is loose so a busy CI box does not flake.
    start = time.perf_counter()
    examples = labelled_examples(20_000, seed=14)
    elapsed = time.perf_counter() - start
    assert len(examples) == 20_000
    assert elapsed < 4.0
