"""Seeded generator of labelled multi-turn e-commerce customer-service dialogues.

The demo, the tests and the benchmarks all draw their traffic from here so that nothing needs
outside data. Everything is derived from ``TrafficConfig.seed``: the same config always yields the
same conversations, ids included.

Each user turn carries its true intent, the intent the user *confirmed* (wrong for a small
fraction, to exercise noisy hard labels), and whether it is only interpretable with the earlier
turns (``"yes please do that"`` after an offer, ``"what about the other one?"``, ``"actually just
cancel it"``).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stream_distill.data.dialogue_phrases import (
    ACCEPTS,
    ACKS,
    AGENT_REPLIES,
    CITY_SCOPED,
    CONNECTORS,
    DECLINES,
    FOLLOWUP_PREFIXES,
    GREETINGS,
    INHERIT_CITY,
    INHERIT_GENERIC,
    INHERIT_ORDER,
    INHERIT_PRODUCT,
    ORDER_SCOPED,
    PIVOTS,
    POLITE_PREFIXES,
    POLITE_SUFFIXES,
    PRODUCT_SCOPED,
)
from stream_distill.data.slot_values import (
    CITIES,
    COUPON_WORDS,
    CURRENCIES,
    DOMAINS,
    ETAS,
    MONTHS,
    NAMES,
    ORDER_LETTERS,
    PRODUCTS,
    RELATIVE_DATES,
)
from stream_distill.data.templates import (
    INTENTS,
    PROMO_INTENTS,
    USER_TEMPLATES,
)
from stream_distill.events import Turn

__all__ = [
    "INTENTS",
    "PROMO_INTENTS",
    "LabeledTurn",
    "TrafficConfig",
    "TrafficGenerator",
    "labelled_examples",
]

KNOWN_INTENTS: tuple[str, ...] = INTENTS + PROMO_INTENTS

# Surface-style probabilities. Not configurable: they shape the text, not the label statistics.
_GREETING_RATE = 0.25
_POLITE_PREFIX_RATE = 0.35
_POLITE_SUFFIX_RATE = 0.3
_CAPITALISE_RATE = 0.45
_CONNECTOR_RATE = 0.4
_DECLINE_RATE = 0.5
_FOLLOWUP_PREFIX_RATE = 0.15


@dataclass(frozen=True, slots=True)
class LabeledTurn:
    """One user turn with its labels; ``turns`` is the dialogue so far, that turn last."""

    conversation_id: str
    turns: tuple[Turn, ...]
    intent: str
    confirmed_intent: str
    context_dependent: bool


@dataclass(frozen=True)
class TrafficConfig:
    """What to generate. ``followup_rate`` is the target fraction of *all* labelled turns that are
    context-dependent; ``typo_rate`` and ``wrong_confirmation_rate`` are per user turn."""

    seed: int = 0
    intents: tuple[str, ...] = INTENTS
    typo_rate: float = 0.1
    wrong_confirmation_rate: float = 0.03
    followup_rate: float = 0.2
    max_user_turns: int = 4

    def __post_init__(self) -> None:
        if not self.intents:
            raise ValueError("intents must not be empty")
        unknown = sorted(set(self.intents) - set(KNOWN_INTENTS))
        if unknown:
            raise ValueError(f"unknown intents: {unknown}; known: {KNOWN_INTENTS}")
        if len(set(self.intents)) != len(self.intents):
            raise ValueError("intents contains duplicates")
        for name in ("typo_rate", "wrong_confirmation_rate", "followup_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.max_user_turns < 1:
            raise ValueError(f"max_user_turns must be >= 1, got {self.max_user_turns}")


# ---------------------------------------------------------------------------------------------
# Slot fillers

_SlotMaker = Callable[[random.Random, dict[str, str]], str]


def _order(rng: random.Random, _: dict[str, str]) -> str:
    number = f"{rng.choice(ORDER_LETTERS)}{rng.randrange(10000, 100000)}"
    return number if rng.random() < 0.2 else "#" + number


def _date(rng: random.Random, _: dict[str, str]) -> str:
    if rng.random() < 0.5:
        return f"{rng.choice(MONTHS)} {rng.randrange(1, 29)}"
    return rng.choice(RELATIVE_DATES)


def _amount(rng: random.Random, _: dict[str, str]) -> str:
    whole = f"{rng.choice(CURRENCIES)}{rng.randrange(5, 500)}"
    return f"{whole}.{rng.randrange(100):02d}" if rng.random() < 0.5 else whole


def _email(rng: random.Random, _: dict[str, str]) -> str:
    suffix = str(rng.randrange(1, 100)) if rng.random() < 0.5 else ""
    return f"{rng.choice(NAMES)}{suffix}@{rng.choice(DOMAINS)}"


def _product2(rng: random.Random, slots: dict[str, str]) -> str:
    # "received a X instead of the X" would be a nonsensical sentence.
    while True:
        other = rng.choice(PRODUCTS)
        if other != slots.get("product"):
            return other


_SLOTS: dict[str, _SlotMaker] = {
    "order": _order,
    "tracking": lambda rng, _: f"1Z{rng.randrange(10**9, 10**10)}",
    "product": lambda rng, _: rng.choice(PRODUCTS),
    "product2": _product2,
    "date": _date,
    "eta": lambda rng, _: rng.choice(ETAS),
    "city": lambda rng, _: rng.choice(CITIES),
    "amount": _amount,
    "coupon": lambda rng, _: f"{rng.choice(COUPON_WORDS)}{rng.choice((5, 10, 15, 20, 25, 50))}",
    "email": _email,
    "last4": lambda rng, _: f"{rng.randrange(10000):04d}",
    "days": lambda rng, _: str(rng.randrange(2, 21)),
    "points": lambda rng, _: str(rng.randrange(50, 5000)),
}

# (format string, slot names it uses); parsed once so rendering a turn only touches its own slots.
_Template = tuple[str, tuple[str, ...]]


def _compile(text: str) -> _Template:
    fields = tuple(f for _, f, _, _ in string.Formatter().parse(text) if f is not None)
    unknown = set(fields) - _SLOTS.keys()
    if unknown:
        # Fail at import rather than with a KeyError deep inside a benchmark run.
        raise ValueError(f"template {text!r} uses unknown slots {sorted(unknown)}")
    return text, fields


def _compile_all(texts: tuple[str, ...]) -> tuple[_Template, ...]:
    return tuple(_compile(t) for t in texts)


_USER: dict[str, tuple[_Template, ...]] = {
    i: _compile_all(USER_TEMPLATES[i]) for i in KNOWN_INTENTS
}
_REPLIES: dict[str, tuple[tuple[_Template, str | None], ...]] = {
    i: tuple((_compile(text), offer) for text, offer in AGENT_REPLIES[i]) for i in KNOWN_INTENTS
}


def _inherit_pool(intent: str) -> tuple[_Template, ...]:
    pool = INHERIT_GENERIC
    if intent in ORDER_SCOPED:
        pool += INHERIT_ORDER
    if intent in PRODUCT_SCOPED:
        pool += INHERIT_PRODUCT
    if intent in CITY_SCOPED:
        pool += INHERIT_CITY
    return _compile_all(pool)


_INHERIT: dict[str, tuple[_Template, ...]] = {i: _inherit_pool(i) for i in KNOWN_INTENTS}
_PIVOTS: tuple[tuple[tuple[_Template, ...], dict[str, str]], ...] = tuple(
    (_compile_all(texts), mapping) for texts, mapping in PIVOTS
)


def _corrupt(text: str, rng: random.Random) -> str:
    """One character-level typo (swap, drop or duplicate) on a letter."""
    n = len(text)
    if n < 2:
        return text + text
    i = rng.randrange(n)
    # Edits on spaces and punctuation barely look like typos; walk to the next letter.
    for _ in range(n):
        if text[i].isalpha():
            break
        i = (i + 1) % n
    op = rng.randrange(3)
    if op == 0 and i + 1 < n and text[i] != text[i + 1]:
        return text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    if op == 1:
        return text[:i] + text[i] + text[i:]
    return text[:i] + text[i + 1 :]


class TrafficGenerator:
    """Stateful stream of labelled turns; successive calls continue the same seeded stream."""

    def __init__(self, config: TrafficConfig | None = None) -> None:
        self.config = config if config is not None else TrafficConfig()
        seed = self.config.seed
        # Typos and confirmations draw from their own streams so that changing their rates leaves
        # the dialogues themselves (intents, wording, ids) untouched.
        self._rng = random.Random(seed)
        self._typo_rng = random.Random(f"{seed}:typo")
        self._confirm_rng = random.Random(f"{seed}:confirm")
        self._counter = 0
        intents = self.config.intents
        allowed = frozenset(intents)
        self._intents = intents
        self._allowed = allowed
        self._others = {i: tuple(j for j in intents if j != i) for i in intents}
        pivots: dict[str, list[tuple[tuple[_Template, ...], str]]] = {}
        for templates, mapping in _PIVOTS:
            for prev, target in mapping.items():
                if prev in allowed and target in allowed:
                    pivots.setdefault(prev, []).append((templates, target))
        self._pivots = {prev: tuple(options) for prev, options in pivots.items()}
        m = self.config.max_user_turns
        # The number of user turns is uniform on 1..m, so (m - 1) / (m + 1) of all turns are
        # non-first; scale up so that followup_rate holds over all turns, not just non-first ones.
        self._p_followup = min(1.0, self.config.followup_rate * (m + 1) / (m - 1)) if m > 1 else 0.0

    def conversation(self) -> list[LabeledTurn]:
        """One dialogue: a :class:`LabeledTurn` per user turn, each extending the previous one."""
        rng = self._rng
        cid = f"c{self.config.seed}-{self._counter}"
        self._counter += 1
        n_user = rng.randint(1, self.config.max_user_turns)
        history: list[Turn] = []
        if rng.random() < _GREETING_RATE:
            history.append(Turn(role="agent", text=rng.choice(GREETINGS)))
        out: list[LabeledTurn] = []
        prev = ""
        offer: str | None = None
        offered = False
        for k in range(n_user):
            slots: dict[str, str] = {}
            accepted = False
            if k and rng.random() < self._p_followup:
                intent, text, accepted = self._followup(prev, offer, slots)
                dependent = True
            else:
                intent = rng.choice(self._intents)
                lead = ""
                if k and offered and rng.random() < _DECLINE_RATE:
                    lead = rng.choice(DECLINES)
                elif k and rng.random() < _CONNECTOR_RATE:
                    lead = rng.choice(CONNECTORS)
                text = self._fresh(intent, slots, lead)
                dependent = False
            history.append(Turn(role="user", text=self._typo(text)))
            out.append(
                LabeledTurn(
                    conversation_id=cid,
                    turns=tuple(history),
                    intent=intent,
                    confirmed_intent=self._confirm(intent),
                    context_dependent=dependent,
                )
            )
            if k + 1 < n_user:
                target: str | None = None
                if accepted:
                    reply = rng.choice(ACKS)
                else:
                    template, target = rng.choice(_REPLIES[intent])
                    reply = self._fill(template, slots)
                offered = target is not None
                offer = target if target in self._allowed else None
                history.append(Turn(role="agent", text=reply))
            prev = intent
        return out

    def turns(self, n: int) -> Iterator[LabeledTurn]:
        """``n`` labelled user turns, whole conversations in order (the last may be cut short)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        remaining = n
        while remaining > 0:
            conversation = self.conversation()
            yield from conversation[:remaining]
            remaining -= len(conversation)

    # -----------------------------------------------------------------------------------------

    def _fill(self, template: _Template, slots: dict[str, str]) -> str:
        text, fields = template
        if not fields:
            return text
        for name in fields:
            if name not in slots:
                slots[name] = _SLOTS[name](self._rng, slots)
        return text.format_map(slots)

    def _fresh(self, intent: str, slots: dict[str, str], lead: str) -> str:
        rng = self._rng
        text = self._fill(rng.choice(_USER[intent]), slots)
        if lead:
            text = lead + text
        elif rng.random() < _POLITE_PREFIX_RATE:
            text = rng.choice(POLITE_PREFIXES) + text
        if rng.random() < _POLITE_SUFFIX_RATE:
            text += rng.choice(POLITE_SUFFIXES)
        if rng.random() < _CAPITALISE_RATE:
            text = text[0].upper() + text[1:]
        return text

    def _followup(
        self, prev: str, offer: str | None, slots: dict[str, str]
    ) -> tuple[str, str, bool]:
        """A context-dependent turn: (intent, text, whether it accepted the agent's offer)."""
        rng = self._rng
        pivots = self._pivots.get(prev, ())
        # Inheriting is always possible, so without extra weight it would crowd out the turns
        # whose intent actually moves, which are the ones a context-blind classifier gets wrong.
        kinds = ["inherit"]
        if offer is not None:
            kinds += ["accept", "accept"]
        if pivots:
            kinds += ["pivot", "pivot"]
        kind = rng.choice(kinds)
        if kind == "accept" and offer is not None:
            text, intent = rng.choice(ACCEPTS), offer
        elif kind == "pivot":
            templates, intent = rng.choice(pivots)
            text = self._fill(rng.choice(templates), slots)
        else:
            text, intent = self._fill(rng.choice(_INHERIT[prev]), slots), prev
        if rng.random() < _FOLLOWUP_PREFIX_RATE:
            text = rng.choice(FOLLOWUP_PREFIXES) + text
        if rng.random() < _CAPITALISE_RATE:
            text = text[0].upper() + text[1:]
        return intent, text, kind == "accept"

    def _typo(self, text: str) -> str:
        rng = self._typo_rng
        if rng.random() >= self.config.typo_rate:
            return text
        out = _corrupt(text, rng)
        if rng.random() < 0.3:
            out = _corrupt(out, rng)
        # A swap can undo an earlier swap; a typo that leaves the text intact is no typo.
        return out if out != text else text[0] + text

    def _confirm(self, intent: str) -> str:
        rng = self._confirm_rng
        others = self._others[intent]
        if rng.random() < self.config.wrong_confirmation_rate and others:
            return rng.choice(others)
        return intent


def labelled_examples(
    n: int, *, seed: int = 0, intents: tuple[str, ...] = INTENTS
) -> list[LabeledTurn]:
    """The first ``n`` turns of ``TrafficGenerator(TrafficConfig(seed=seed, intents=intents))``."""
    return list(TrafficGenerator(TrafficConfig(seed=seed, intents=intents)).turns(n))
