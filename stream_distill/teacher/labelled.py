"""What the teacher updater learns from: hard labels joined with request texts, and when to learn.

Pure Python (no torch). Requests and hard labels meet by request id in either
order; both waiting rooms are bounded. A stable slice of request ids (the same
hash rule as the trainer's join, so the student's gate set stays unseen by the
teacher too) is held out to validate updates. A later label for the same request
replaces the earlier one: the newest confirmation wins.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from stream_distill.events import HardLabel, RequestEvent, Turn


@dataclass(frozen=True, slots=True)
class Labelled:
    """One request's dialogue with its confirmed intent."""

    request_id: str
    turns: tuple[Turn, ...]
    intent: str
    ts: datetime


def is_holdout(request_id: str, fraction: float) -> bool:
    """Stable: the same request id is always on the same side."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


class LabelledSet:
    """Bounded join of request texts and hard labels into tuning and held-out examples."""

    def __init__(
        self,
        *,
        window: int,
        max_examples: int,
        holdout_fraction: float,
        applied_ids: int = 200_000,
    ) -> None:
        self.window = window
        self.max_examples = max_examples
        self.holdout_fraction = holdout_fraction
        self.applied_ids = applied_ids
        # request id -> (conversation id, turns)
        self._requests: OrderedDict[str, tuple[str, tuple[Turn, ...]]] = OrderedDict()
        self._waiting: OrderedDict[str, HardLabel] = OrderedDict()
        self._feedback_ids: OrderedDict[str, None] = OrderedDict()
        self.train: OrderedDict[str, Labelled] = OrderedDict()
        self.holdout: OrderedDict[str, Labelled] = OrderedDict()
        self.duplicates = 0
        self._counts: Counter[str] = Counter()  # tuning examples per intent

    def add_request(self, event: RequestEvent) -> Labelled | None:
        """Remember the text; the example if its label was already waiting."""
        rid = event.request_id
        self._requests[rid] = (event.conversation_id, event.turns)
        self._requests.move_to_end(rid)
        while len(self._requests) > self.window:
            self._requests.popitem(last=False)
        label = self._waiting.pop(rid, None)
        return self._join(rid, event.turns, label) if label is not None else None

    def add_hard(self, event: HardLabel) -> Labelled | None:
        """The example, or None while the request is unseen (or the feedback is a duplicate)."""
        if event.feedback_id in self._feedback_ids:
            self.duplicates += 1
            return None
        self._feedback_ids[event.feedback_id] = None
        while len(self._feedback_ids) > self.applied_ids:
            self._feedback_ids.popitem(last=False)
        seen = self._requests.get(event.request_id)
        if seen is None:
            self._waiting[event.request_id] = event
            while len(self._waiting) > self.window:
                self._waiting.popitem(last=False)
            return None
        return self._join(event.request_id, seen[1], event)

    def _join(self, rid: str, turns: tuple[Turn, ...], label: HardLabel) -> Labelled:
        example = Labelled(rid, turns, label.intent, label.ts)
        tuning = not is_holdout(rid, self.holdout_fraction)
        side = self.train if tuning else self.holdout
        gone = [side.pop(rid)] if rid in side else []
        side[rid] = example
        while len(side) > self.max_examples:
            gone.append(side.popitem(last=False)[1])
        if tuning:
            self._counts[example.intent] += 1
            self._counts.subtract(old.intent for old in gone)
        return example

    def is_holdout(self, request_id: str) -> bool:
        return is_holdout(request_id, self.holdout_fraction)

    def recent(self, n: int) -> list[tuple[str, str, tuple[Turn, ...]]]:
        """The newest ``n`` requests seen, oldest first: (request id, conversation id, turns)."""
        out: list[tuple[str, str, tuple[Turn, ...]]] = []
        for rid in reversed(self._requests):
            if len(out) >= n:
                break
            conversation_id, turns = self._requests[rid]
            out.append((rid, conversation_id, turns))
        out.reverse()
        return out

    def counts(self) -> Counter[str]:
        """Tuning examples per intent (a copy)."""
        return +self._counts  # unary plus drops the zero counts


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    """When the teacher is tuned again, and which intents an update adds.

    * at once, when an intent the teacher lacks has ``new_intent_min`` tuning examples
      (after a rejected try, ``new_intent_min`` more than at that try);
    * at once, when an intent an update added (``added``: intent -> its examples at the
      last tuning) has twice as many examples as then, until it was tuned with
      ``refresh_until``: a new intent is learnt from its first few examples and again as
      they double, instead of waiting for many;
    * after ``every_labels`` fresh labels;
    * after ``every_s`` seconds since the last try, if any label is fresh.

    Whatever the trigger, an update adds every intent the teacher lacks that has
    ``join_min`` examples (:meth:`joining`), so intents that appear together are learnt
    in one update rather than one after another.
    """

    every_labels: int
    every_s: float
    new_intent_min: int
    join_min: int = 1_000_000
    refresh_until: int = 0

    def new_intents(self, known: Collection[str], counts: Mapping[str, int]) -> list[str]:
        """Intents the teacher lacks with enough examples to start an update (sorted)."""
        return sorted(i for i, n in counts.items() if i not in known and n >= self.new_intent_min)

    def joining(
        self,
        known: Collection[str],
        counts: Mapping[str, int],
        tried: Mapping[str, int] | None = None,
    ) -> list[str]:
        """The intents an update adds (sorted): every unknown intent with ``join_min``
        (at most ``new_intent_min``) examples, more than at a rejected try."""
        tried = tried or {}
        low = min(self.join_min, self.new_intent_min)
        return sorted(
            i for i, n in counts.items() if i not in known and n >= low and n > tried.get(i, 0)
        )

    def refreshing(self, counts: Mapping[str, int], added: Mapping[str, int]) -> list[str]:
        """Added intents due a follow-up update (sorted)."""
        return sorted(
            i
            for i, at in added.items()
            if at < self.refresh_until and counts.get(i, 0) >= max(2 * at, at + 1)
        )

    def reason(
        self,
        *,
        known: Collection[str],
        counts: Mapping[str, int],
        fresh: int,
        since_last_s: float,
        tried: Mapping[str, int] | None = None,
        added: Mapping[str, int] | None = None,
    ) -> str | None:
        """Why an update is due now (``new_intent:<name>``, ``refresh:<name>``, ``labels``,
        ``interval``), or None."""
        tried = tried or {}
        for intent in self.new_intents(known, counts):
            if counts[intent] >= tried.get(intent, 0) + self.new_intent_min:
                return f"new_intent:{intent}"
        for intent in self.refreshing(counts, added or {}):
            return f"refresh:{intent}"
        if fresh >= self.every_labels:
            return "labels"
        if fresh > 0 and since_last_s >= self.every_s:
            return "interval"
        return None
