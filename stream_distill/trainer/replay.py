"""Reservoirs of past examples, mixed into every batch against forgetting.

:class:`ReplayBuffer` keeps a uniform sample of the stream; :class:`ClassBalancedReplay`
balances the classes under the same bound, so a rare intent keeps its share instead of
being crowded out by the frequent ones. Both satisfy :class:`Replay`.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

from stream_distill.events import SoftLabel, Turn
from stream_distill.trainer.join import Example
from stream_distill.trainer.state_codec import SoftCodec
from stream_distill.trainer.teachers import argmax_label


class Replay(Protocol):
    """What the trainer needs of a replay memory."""

    capacity: int

    def __len__(self) -> int: ...
    @property
    def items(self) -> list[Example]: ...
    def add(self, ex: Example) -> None: ...
    def sample(self, n: int, exclude: set[str] | frozenset[str] = ...) -> list[Example]: ...
    def to_json(self) -> dict[str, Any]: ...
    def load_json(self, data: dict[str, Any]) -> None: ...


class ReplayBuffer:
    """Uniform reservoir sampling (Vitter's algorithm R) over every example ever added."""

    def __init__(self, capacity: int = 5000, seed: int = 0) -> None:
        self.capacity = capacity
        self._items: list[Example] = []
        self.seen = 0
        self._rng = random.Random(seed)
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[Example]:
        return self._items

    def add(self, ex: Example) -> None:
        if ex.request_id in self._index:  # a late hard label: refresh the stored copy
            self._items[self._index[ex.request_id]] = ex
            return
        self.seen += 1
        if len(self._items) < self.capacity:
            self._index[ex.request_id] = len(self._items)
            self._items.append(ex)
            return
        j = self._rng.randrange(self.seen)
        if j < self.capacity:
            del self._index[self._items[j].request_id]
            self._items[j] = ex
            self._index[ex.request_id] = j

    def sample(self, n: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[Example]:
        pool = [ex for ex in self._items if ex.request_id not in exclude]
        return self._rng.sample(pool, min(n, len(pool)))

    def to_json(self) -> dict[str, Any]:
        codec = SoftCodec()
        items = [example_to_json(ex, codec) for ex in self._items]
        return {
            "seen": self.seen,
            "rng": _rng_state(self._rng),
            "label_lists": codec.table(),
            "items": items,
        }

    def load_json(self, data: dict[str, Any]) -> None:
        self.seen = int(data["seen"])
        version, state, gauss = data["rng"]
        self._rng.setstate((version, tuple(state), gauss))
        codec = SoftCodec(data.get("label_lists", ()))
        self._items = [example_from_json(item, codec) for item in data["items"]]
        self._index = {ex.request_id: i for i, ex in enumerate(self._items)}


def class_of(ex: Example) -> str:
    """The hard label if there is one, else what the (latest) teacher ranks first."""
    if ex.hard is not None:
        return ex.hard
    if ex.soft is not None:
        return argmax_label(ex.soft)
    return ""


class ClassBalancedReplay:
    """Class-balancing reservoir sampling (Chrysakis & Moens, ICML 2020) under one bound.

    Below ``capacity`` everything is kept. When full, an example of a class that is not
    among the largest stored classes evicts a random example of a largest one; an
    example of a largest class replaces a random example of its own class with
    probability ``stored / seen`` of that class (so each class holds a uniform sample
    of its own stream). A rare class keeps everything until it is as large as the
    others; the stored set, and so every batch drawn from it, is about balanced.
    """

    def __init__(self, capacity: int = 5000, seed: int = 0) -> None:
        self.capacity = capacity
        self._rng = random.Random(seed)
        self._classes: dict[str, list[Example]] = {}
        self._seen: dict[str, int] = {}
        self._class_of: dict[str, str] = {}  # request id -> class it is stored under

    def __len__(self) -> int:
        return len(self._class_of)

    @property
    def items(self) -> list[Example]:
        return [ex for members in self._classes.values() for ex in members]

    def counts(self) -> dict[str, int]:
        return {c: len(members) for c, members in self._classes.items()}

    def _drop_at(self, cls: str, i: int) -> None:
        members = self._classes[cls]
        members[i], members[-1] = members[-1], members[i]
        del self._class_of[members.pop().request_id]

    def add(self, ex: Example) -> None:
        cls = class_of(ex)
        held = self._class_of.get(ex.request_id)
        if held is not None:  # a refresh (a late hard label may move it to another class)
            members = self._classes[held]
            i = next(k for k, e in enumerate(members) if e.request_id == ex.request_id)
            if held == cls:
                members[i] = ex
                return
            self._drop_at(held, i)
        self._seen[cls] = self._seen.get(cls, 0) + 1
        members = self._classes.setdefault(cls, [])
        if len(self) >= self.capacity:
            largest = max(len(m) for m in self._classes.values())
            if len(members) < largest:
                big = sorted(c for c, m in self._classes.items() if len(m) == largest)
                victim = self._rng.choice(big)
                self._drop_at(victim, self._rng.randrange(largest))
            else:
                if not members or self._rng.random() >= len(members) / self._seen[cls]:
                    return
                self._drop_at(cls, self._rng.randrange(len(members)))
        members.append(ex)
        self._class_of[ex.request_id] = cls

    def sample(self, n: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[Example]:
        pool = [ex for ex in self.items if ex.request_id not in exclude]
        return self._rng.sample(pool, min(n, len(pool)))

    def to_json(self) -> dict[str, Any]:
        codec = SoftCodec()
        classes = {c: [example_to_json(ex, codec) for ex in m] for c, m in self._classes.items()}
        return {
            "balance": "class_balanced",
            "rng": _rng_state(self._rng),
            "seen": dict(self._seen),
            "label_lists": codec.table(),
            "classes": classes,
        }

    def load_json(self, data: dict[str, Any]) -> None:
        version, state, gauss = data["rng"]
        self._rng.setstate((version, tuple(state), gauss))
        codec = SoftCodec(data.get("label_lists", ()))
        self._seen = {c: int(n) for c, n in data["seen"].items()}
        self._classes = {
            c: [example_from_json(item, codec) for item in m] for c, m in data["classes"].items()
        }
        self._class_of = {ex.request_id: c for c, m in self._classes.items() for ex in m}


def make_replay(balance: str, capacity: int, seed: int = 0) -> Replay:
    if balance == "class_balanced":
        return ClassBalancedReplay(capacity, seed)
    return ReplayBuffer(capacity, seed)


def example_to_json(ex: Example, codec: SoftCodec | None = None) -> list[Any]:
    """One example as JSON; with ``codec`` its soft labels are packed against its table."""

    def dump(soft: SoftLabel | None) -> Any:
        if codec is not None:
            return codec.dump(soft)
        return soft.model_dump(mode="json") if soft is not None else None

    return [
        ex.request_id,
        [t.model_dump() for t in ex.turns],
        dump(ex.soft),
        ex.hard,
        [dump(s) for s in ex.softs if s is not ex.soft],
    ]


def example_from_json(item: list[Any], codec: SoftCodec | None = None) -> Example:
    codec = codec or SoftCodec()  # without a table only whole soft labels can be read
    rid, turns, soft, hard, *rest = item
    latest = codec.load(soft)
    others = tuple(s for s in map(codec.load, rest[0] if rest else []) if s is not None)
    return Example(
        rid,
        tuple(Turn.model_validate(t) for t in turns),
        latest,
        hard,
        (*others, latest) if others and latest else others,
    )


def _rng_state(rng: random.Random) -> list[Any]:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]
