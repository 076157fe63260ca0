"""The ``offline`` strategy's recorded stream: joined examples on disk, trained in rounds.

The trainer appends every joined example to ``<checkpoint dir>/offline/round-<k>.jsonl``
instead of learning from it. When a round is due (enough examples, or an explicit
request) it trains ``offline_epochs`` passes over the file, gates and publishes, then
starts round ``k + 1``. The checkpoint records the round and the file's byte size: a
restart truncates the file to that size, so the examples re-read from the log after
the checkpoint are recorded once (exactly-once, as for online learning). A round's
file is deleted only after the checkpoint that moved past it is written.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stream_distill.trainer.join import Example
from stream_distill.trainer.replay import example_from_json, example_to_json

log = logging.getLogger(__name__)


class OfflineStore:
    """An append-only JSONL file of examples per round, bounded by ``max_examples``."""

    def __init__(self, directory: Path, max_examples: int) -> None:
        self.dir = Path(directory)
        self.max_examples = max_examples
        self.round = 0
        self.count = 0
        self.size = 0
        self.dropped = 0

    @property
    def path(self) -> Path:
        return self.dir / f"round-{self.round:06d}.jsonl"

    def append(self, examples: Sequence[Example]) -> int:
        """Record ``examples`` (beyond the bound they are dropped and counted); how many kept."""
        room = max(0, self.max_examples - self.count)
        kept = list(examples[:room])
        self.dropped += len(examples) - len(kept)
        if not kept:
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        data = b"".join(
            json.dumps(example_to_json(ex), separators=(",", ":")).encode() + b"\n" for ex in kept
        )
        with open(self.path, "ab") as fh:
            fh.write(data)
        self.count += len(kept)
        self.size += len(data)
        return len(kept)

    def examples(self) -> list[Example]:
        """The round's examples, one per request id (a later record, e.g. with a late hard
        label, replaces an earlier one in place)."""
        if self.size == 0:
            return []
        with open(self.path, "rb") as fh:
            raw = fh.read(self.size)
        by_id: dict[str, Example] = {}
        for line in raw.splitlines():
            ex = example_from_json(json.loads(line))
            by_id[ex.request_id] = ex
        return list(by_id.values())

    def sync(self) -> None:
        """Make the recorded bytes durable (before a checkpoint refers to them)."""
        if self.path.exists():
            with open(self.path, "rb+") as fh:
                os.fsync(fh.fileno())

    def rotate(self) -> None:
        """Start the next round (the old file stays until :meth:`prune`)."""
        self.round += 1
        self.count = self.size = 0

    def prune(self) -> None:
        """Delete every round file but the current one."""
        for f in self.dir.glob("round-*.jsonl"):
            if f != self.path:
                f.unlink(missing_ok=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "count": self.count,
            "size": self.size,
            "dropped": self.dropped,
        }

    def load_json(self, data: dict[str, Any] | None) -> None:
        """Return to a checkpointed position (None: empty, round 0); later bytes are cut."""
        data = data or {}
        self.round = int(data.get("round", 0))
        self.count = int(data.get("count", 0))
        self.size = int(data.get("size", 0))
        self.dropped = int(data.get("dropped", 0))
        on_disk = self.path.stat().st_size if self.path.exists() else 0
        if on_disk < self.size:
            log.error("offline record %s lost data (%d < %d bytes)", self.path, on_disk, self.size)
            self.count = self.size = on_disk = 0
            self.path.unlink(missing_ok=True)
        if on_disk > self.size == 0:
            self.path.unlink()
        elif on_disk > self.size:
            with open(self.path, "rb+") as fh:
                fh.truncate(self.size)
                os.fsync(fh.fileno())
        if self.dir.exists():
            self.prune()


def round_batches(
    examples: Sequence[Example], epochs: int, batch_size: int, seed: int
) -> list[list[Example]]:
    """``epochs`` shuffled passes over ``examples`` in batches (the last of a pass may be short)."""
    rng = random.Random(seed)
    out: list[list[Example]] = []
    for _ in range(epochs):
        order = list(examples)
        rng.shuffle(order)
        out.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))
    return out
