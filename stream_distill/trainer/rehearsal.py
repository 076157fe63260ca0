"""Rehearsal of new intents: their examples take a fixed share of every replay draw.

When the student's label space grows (a promotion brings intents), the new intents'
examples are a sliver of a reservoir of tens of thousands, so replay would show each
of them about once and the student would learn the new intents slowly, from KD targets
of a teacher that itself just met them. For ``window_steps`` optimizer steps after an
intent is added, ``share`` of each replay draw comes from the recent examples whose
class (hard label, else the teacher's first choice) is such an intent: each is seen
several times while it matters, and the share ends by itself.

In memory only: after a restart the rehearsal of intents added before it stops.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from stream_distill.trainer.join import Example
from stream_distill.trainer.replay import class_of

MAX_REPEAT = 8
"""A pooled example is drawn for about one batch in this many."""


class NewClassRehearsal:
    """Recent examples of just-added intents, drawn for a share of each replay."""

    def __init__(
        self, share: float, window_steps: int, capacity: int = 4000, seed: int = 0
    ) -> None:
        self.share = share
        self.window_steps = window_steps
        self.capacity = capacity
        self._added: dict[str, int] = {}  # intent -> the step it was added at
        # request id -> (its class when kept, the example): the class is worked out once
        self._pool: OrderedDict[str, tuple[str, Example]] = OrderedDict()
        self._rng = random.Random(seed)
        self.drawn = 0

    def added(self, labels: Iterable[str], step: int) -> None:
        for label in labels:
            self._added[label] = step

    def active(self, step: int) -> set[str]:
        """Intents still rehearsed at ``step``."""
        return {x for x, at in self._added.items() if step - at < self.window_steps}

    def observe(self, examples: Sequence[Example], step: int) -> None:
        """Keep the fresh ``examples`` of rehearsed intents (a relabel refreshes its copy)."""
        active = self.active(step)
        if not active or self.share <= 0:
            return
        for ex in examples:
            cls = class_of(ex)
            if cls in active:
                self._pool[ex.request_id] = (cls, ex)
                self._pool.move_to_end(ex.request_id)
            else:
                self._pool.pop(ex.request_id, None)  # relabelled away from a new intent
        while len(self._pool) > self.capacity:
            self._pool.popitem(last=False)

    def draw(
        self, n: int, step: int, exclude: set[str] | frozenset[str] = frozenset()
    ) -> list[Example]:
        """Up to ``round(n * share)`` examples of rehearsed intents (none once all expired),
        and at most one in :data:`MAX_REPEAT` of the pool, so the first one or two examples
        of an intent are not in every batch (the student would call everything by it)."""
        k = min(round(n * self.share), len(self._pool) // MAX_REPEAT)
        if k <= 0 or not self._pool:
            return []
        active = self.active(step)
        if not active:
            self._pool.clear()
            return []
        pool = [ex for rid, (cls, ex) in self._pool.items() if cls in active and rid not in exclude]
        picked = self._rng.sample(pool, min(k, len(pool)))
        self.drawn += len(picked)
        return picked
