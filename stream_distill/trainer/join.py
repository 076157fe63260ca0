"""Join request text, soft labels and hard labels by request id (pure Python, no torch).

Rules:
* an example is *ready* once its request and at least one label (soft or hard) are
  here; it is handed out for training once;
* a hard label that arrives after its example was trained makes the example ready
  again, now with the label (late feedback is still learned);
* duplicates are ignored: a request id seen twice, a soft label from the same
  teacher (and teacher version) twice, a feedback id seen before (applied ids are
  remembered, bounded);
* one soft label is kept per teacher id (a newer teacher version replaces its
  predecessor), so several teachers' opinions can be fused; a trained example whose
  teacher relabels it with another label set (it learnt new intents) is ready again;
  with ``min_teachers`` above 1 an example without a hard label waits for that many
  teachers;
* a stable slice of request ids (``holdout_fraction``) is never trained on; their
  hard labels form the held-out set the promotion gate scores on;
* the state is bounded by ``window`` requests; what falls out is counted.

The whole state round-trips through JSON so the trainer can checkpoint it with
its offsets (exactly-once learning without broker transactions).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from stream_distill.events import HardLabel, RequestEvent, SoftLabel, Turn
from stream_distill.trainer.state_codec import SoftCodec


@dataclass(frozen=True, slots=True)
class Example:
    """What the learner trains on."""

    request_id: str
    turns: tuple[Turn, ...]
    soft: SoftLabel | None
    """The latest soft label, whichever teacher sent it."""
    hard: str | None
    softs: tuple[SoftLabel, ...] = ()
    """Every teacher's soft label (one per teacher id); empty means ``(soft,)``."""

    @property
    def teacher_labels(self) -> tuple[SoftLabel, ...]:
        if self.softs:
            return self.softs
        return (self.soft,) if self.soft is not None else ()


@dataclass(slots=True)
class _Pending:
    request: RequestEvent | None = None
    soft: SoftLabel | None = None
    hard: HardLabel | None = None
    trained: bool = False
    trained_hard: bool = False
    softs: dict[str, SoftLabel] = field(default_factory=dict)


@dataclass
class JoinStats:
    requests: int = 0
    soft_labels: int = 0
    hard_labels: int = 0
    duplicates: int = 0
    evicted: int = 0
    evicted_untrained: int = 0
    late_hard: int = 0
    relabelled: int = 0


@dataclass
class JoinState:
    window: int = 50000
    holdout_fraction: float = 0.1
    holdout_size: int = 2000
    applied_ids_size: int = 200000
    stats: JoinStats = field(default_factory=JoinStats)
    min_teachers: int = 1

    def __post_init__(self) -> None:
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._ready: OrderedDict[str, None] = OrderedDict()
        self._feedback_ids: OrderedDict[str, None] = OrderedDict()
        self.holdout: deque[tuple[tuple[Turn, ...], str]] = deque(maxlen=self.holdout_size)

    # -- inputs ---------------------------------------------------------------------------
    def is_holdout(self, request_id: str) -> bool:
        digest = hashlib.sha256(request_id.encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2**32 < self.holdout_fraction

    def _slot(self, request_id: str) -> _Pending:
        slot = self._pending.get(request_id)
        if slot is None:
            slot = self._pending[request_id] = _Pending()
            self._evict()
        return slot

    def _evict(self) -> None:
        while len(self._pending) > self.window:
            rid, old = self._pending.popitem(last=False)
            self._ready.pop(rid, None)
            self.stats.evicted += 1
            if not old.trained:
                self.stats.evicted_untrained += 1

    def add_request(self, ev: RequestEvent) -> None:
        slot = self._slot(ev.request_id)
        if slot.request is not None:
            self.stats.duplicates += 1
            return
        self.stats.requests += 1
        slot.request = ev
        self._update(ev.request_id, slot)

    def add_soft(self, ev: SoftLabel) -> None:
        slot = self._slot(ev.request_id)
        prev = slot.softs.get(ev.teacher_id)
        if prev is not None and prev.teacher_version == ev.teacher_version:
            self.stats.duplicates += 1
            return
        self.stats.soft_labels += 1
        slot.soft = slot.softs[ev.teacher_id] = ev
        relabel = prev is not None and prev.label_set_version != ev.label_set_version
        if relabel and slot.trained and not self.is_holdout(ev.request_id):
            # A newer teacher version with other intents relabelled it: learn it again.
            self.stats.relabelled += 1
            slot.trained = False
        self._update(ev.request_id, slot)

    def add_hard(self, ev: HardLabel) -> bool:
        """False when this feedback id was applied before."""
        if ev.feedback_id in self._feedback_ids:
            self.stats.duplicates += 1
            return False
        self._feedback_ids[ev.feedback_id] = None
        while len(self._feedback_ids) > self.applied_ids_size:
            self._feedback_ids.popitem(last=False)
        self.stats.hard_labels += 1
        slot = self._slot(ev.request_id)
        if slot.trained and not slot.trained_hard:
            self.stats.late_hard += 1
        slot.hard = ev
        self._update(ev.request_id, slot)
        return True

    def _update(self, rid: str, slot: _Pending) -> None:
        if slot.request is None:
            return
        if self.is_holdout(rid):
            if slot.hard is not None and not slot.trained_hard:
                slot.trained_hard = slot.trained = True  # "used": recorded once
                self.holdout.append((slot.request.turns, slot.hard.intent))
            return
        has_label = len(slot.softs) >= self.min_teachers or slot.hard is not None
        if has_label and (not slot.trained or (slot.hard is not None and not slot.trained_hard)):
            self._ready[rid] = None

    # -- outputs --------------------------------------------------------------------------
    @property
    def ready_count(self) -> int:
        return len(self._ready)

    def take_ready(self, n: int) -> list[Example]:
        out: list[Example] = []
        while self._ready and len(out) < n:
            rid, _ = self._ready.popitem(last=False)
            slot = self._pending[rid]
            assert slot.request is not None
            slot.trained = True
            slot.trained_hard = slot.hard is not None
            hard = slot.hard.intent if slot.hard is not None else None
            out.append(Example(rid, slot.request.turns, slot.soft, hard, _softs(slot)))
        return out

    def recent_soft(self, n: int, holdout: bool | None = None) -> list[Example]:
        """Up to ``n`` of the newest examples with a soft label (for agreement checks).

        ``holdout`` True keeps only held-out request ids, False only trained ones.
        """
        out: list[Example] = []
        if holdout and self.holdout_fraction <= 0.0:
            return out
        for rid in reversed(self._pending):
            slot = self._pending[rid]
            if slot.request is None or slot.soft is None:
                continue
            if holdout is None or self.is_holdout(rid) == holdout:
                out.append(Example(rid, slot.request.turns, slot.soft, None, _softs(slot)))
                if len(out) >= n:
                    break
        return out

    def examples_of(self, intents: set[str], n: int, scan: int = 5000) -> dict[str, list[Example]]:
        """Up to ``n`` of the newest trained-side examples per intent of ``intents``: by the
        confirmed intent, else by the latest soft label's top intent. Held-out ids never
        appear (they judge candidates); at most ``scan`` newest requests are looked at."""
        out: dict[str, list[Example]] = {}
        for looked, rid in enumerate(reversed(self._pending)):
            if looked >= scan:
                break
            slot = self._pending[rid]
            if slot.request is None or self.is_holdout(rid):
                continue
            intent = slot.hard.intent if slot.hard is not None else _top(slot.soft)
            if intent not in intents or len(out.get(intent, ())) >= n:
                continue
            hard = slot.hard.intent if slot.hard is not None else None
            example = Example(rid, slot.request.turns, slot.soft, hard, _softs(slot))
            out.setdefault(intent, []).append(example)
        return out

    # -- checkpoint -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        def dump(e: RequestEvent | HardLabel | None) -> Any:
            return e.model_dump(mode="json") if e is not None else None

        codec = SoftCodec()  # soft labels are most of the bytes: see trainer.state_codec
        pending = [
            [
                rid,
                dump(p.request),
                codec.dump(p.soft),
                dump(p.hard),
                p.trained,
                p.trained_hard,
                [codec.dump(s) for s in p.softs.values() if s is not p.soft],
            ]
            for rid, p in self._pending.items()
        ]
        return {
            "label_lists": codec.table(),
            "pending": pending,
            "ready": list(self._ready),
            "feedback_ids": list(self._feedback_ids),
            "holdout": [[[t.model_dump() for t in turns], y] for turns, y in self.holdout],
            "stats": asdict(self.stats),  # a copy: vars() would alias live counters
        }

    def load_json(self, data: dict[str, Any]) -> None:
        self.__post_init__()
        codec = SoftCodec(data.get("label_lists", ()))
        for rid, req, soft, hard, trained, trained_hard, *rest in data["pending"]:
            latest = codec.load(soft)
            others = [s for s in map(codec.load, rest[0] if rest else []) if s is not None]
            softs = {s.teacher_id: s for s in [*others, *([latest] if latest else [])]}
            self._pending[rid] = _Pending(
                RequestEvent.model_validate(req) if req else None,
                latest,
                HardLabel.model_validate(hard) if hard else None,
                trained,
                trained_hard,
                softs,
            )
        self._ready = OrderedDict((rid, None) for rid in data["ready"])
        self._feedback_ids = OrderedDict((fid, None) for fid in data["feedback_ids"])
        for turns, y in data["holdout"]:
            self.holdout.append((tuple(Turn.model_validate(t) for t in turns), y))
        self.stats = JoinStats(**data["stats"])


def _top(soft: SoftLabel | None) -> str | None:
    if soft is None:
        return None
    return soft.labels[max(range(len(soft.logits)), key=soft.logits.__getitem__)]


def _softs(slot: _Pending) -> tuple[SoftLabel, ...]:
    # A single teacher's label travels as ``soft`` alone (replay and checkpoints stay small).
    return tuple(slot.softs.values()) if len(slot.softs) > 1 else ()
