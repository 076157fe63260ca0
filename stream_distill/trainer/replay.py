"""A reservoir of past examples, mixed into every batch against forgetting."""

from __future__ import annotations

import random
from typing import Any

from stream_distill.events import SoftLabel, Turn
from stream_distill.trainer.join import Example


class ReplayBuffer:
    """Uniform reservoir sampling (Vitter's algorithm R) over every example ever added."""

    def __init__(self, capacity: int = 5000, seed: int = 0) -> None:
        self.capacity = capacity
        self.items: list[Example] = []
        self.seen = 0
        self._rng = random.Random(seed)
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, ex: Example) -> None:
        if ex.request_id in self._index:  # a late hard label: refresh the stored copy
            self.items[self._index[ex.request_id]] = ex
            return
        self.seen += 1
        if len(self.items) < self.capacity:
            self._index[ex.request_id] = len(self.items)
            self.items.append(ex)
            return
        j = self._rng.randrange(self.seen)
        if j < self.capacity:
            del self._index[self.items[j].request_id]
            self.items[j] = ex
            self._index[ex.request_id] = j

    def sample(self, n: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[Example]:
        pool = [ex for ex in self.items if ex.request_id not in exclude]
        return self._rng.sample(pool, min(n, len(pool)))

    def to_json(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "rng": _rng_state(self._rng),
            "items": [
                [
                    ex.request_id,
                    [t.model_dump() for t in ex.turns],
                    ex.soft.model_dump(mode="json") if ex.soft else None,
                    ex.hard,
                ]
                for ex in self.items
            ],
        }

    def load_json(self, data: dict[str, Any]) -> None:
        self.seen = int(data["seen"])
        version, state, gauss = data["rng"]
        self._rng.setstate((version, tuple(state), gauss))
        self.items = [
            Example(
                rid,
                tuple(Turn.model_validate(t) for t in turns),
                SoftLabel.model_validate(soft) if soft else None,
                hard,
            )
            for rid, turns, soft, hard in data["items"]
        ]
        self._index = {ex.request_id: i for i, ex in enumerate(self.items)}


def _rng_state(rng: random.Random) -> list[Any]:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]
