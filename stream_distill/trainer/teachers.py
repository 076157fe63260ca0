"""Several teachers, one target: label alignment, fusion and per-teacher weights (no torch).

Each teacher's softened distribution ``softmax(logits / T)`` is first restricted to the
labels the student knows (matched by name, renormalised there), then the teachers are
mixed: ``p(y) = Σ_i w_i p_i(y) / Σ_i w_i``. A teacher that does not know ``y`` puts no
mass on it. The fused target is returned as logits ``T · log p`` so the KD loss
``softmax(logits / T)`` reproduces ``p`` exactly; labels no teacher knows get the
masking logit. Golden values in tests/test_teachers.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from stream_distill.events import SoftLabel

MASKED = -1e4  # the learner's masking logit: softmax turns it into ~0 at any T we use
_TINY = 1e-30


def softened(logits: Sequence[float], temperature: float) -> list[float]:
    """``softmax(logits / T)`` in plain floats, stable for large logits."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    e = [math.exp(x - top) for x in scaled]
    total = sum(e)
    return [v / total for v in e]


def aligned(
    teacher_labels: Sequence[str], probs: Sequence[float], labels: Sequence[str]
) -> list[float] | None:
    """``probs`` over ``teacher_labels`` moved to the order of ``labels``, renormalised over the
    shared labels (others get 0); None when fewer than two labels are shared."""
    by_name = dict(zip(teacher_labels, probs, strict=True))
    shared = [name for name in labels if name in by_name]
    if len(shared) < 2:
        return None
    mass = sum(by_name[name] for name in shared)
    if mass <= 0.0:
        return None
    return [by_name[name] / mass if name in by_name else 0.0 for name in labels]


def fuse(
    teachers: Sequence[tuple[Sequence[str], Sequence[float], float]],
    labels: Sequence[str],
    temperature: float,
) -> list[float] | None:
    """Fused target logits over ``labels`` from ``(teacher labels, logits, weight)`` triples.

    Teachers with weight 0 or fewer than two shared labels are left out; None when no
    teacher is left (the row then has no KD target).
    """
    mix = [0.0] * len(labels)
    total_weight = 0.0
    for teacher_labels, logits, weight in teachers:
        if weight <= 0.0:
            continue
        probs = aligned(teacher_labels, softened(logits, temperature), labels)
        if probs is None:
            continue
        total_weight += weight
        for j, p in enumerate(probs):
            mix[j] += weight * p
    if total_weight <= 0.0:
        return None
    return [
        temperature * math.log(max(m / total_weight, _TINY)) if m > 0.0 else MASKED for m in mix
    ]


def argmax_label(soft: SoftLabel) -> str:
    """The label a soft label ranks first."""
    return soft.labels[max(range(len(soft.logits)), key=soft.logits.__getitem__)]


class TeacherPanel:
    """Per-teacher weights: static from settings, or adaptive from rolling accuracy.

    A teacher's accuracy on hard labels is an exponentially decayed hit rate with a
    Laplace prior, ``(hits + 1) / (seen + 2)``: 0.5 before any evidence, never exactly
    0 or 1. Adaptive weights are ``softmax(accuracy / τ)`` over the teachers of a row.
    """

    def __init__(
        self,
        weighting: Literal["static", "adaptive"] = "static",
        static: Mapping[str, float] | None = None,
        decay: float = 0.99,
        temperature: float = 0.1,
    ) -> None:
        self.weighting = weighting
        self.static = dict(static or {})
        self.decay = decay
        self.temperature = temperature
        self.hits: dict[str, float] = {}
        self.seen: dict[str, float] = {}

    def observe(self, softs: Sequence[SoftLabel], hard: str) -> None:
        """Score every teacher's argmax against the confirmed intent."""
        for soft in softs:
            tid = soft.teacher_id
            hit = 1.0 if argmax_label(soft) == hard else 0.0
            self.hits[tid] = self.decay * self.hits.get(tid, 0.0) + hit
            self.seen[tid] = self.decay * self.seen.get(tid, 0.0) + 1.0

    def accuracy(self, teacher_id: str) -> float:
        return (self.hits.get(teacher_id, 0.0) + 1.0) / (self.seen.get(teacher_id, 0.0) + 2.0)

    def weights(self, teacher_ids: Sequence[str]) -> list[float]:
        """One weight per id, in order (adaptive weights sum to 1)."""
        if self.weighting == "static":
            return [self.static.get(tid, 1.0) for tid in teacher_ids]
        if not teacher_ids:
            return []
        scores = [self.accuracy(tid) / self.temperature for tid in teacher_ids]
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        return [v / sum(e) for v in e]

    def target(
        self, softs: Sequence[SoftLabel], labels: Sequence[str], temperature: float
    ) -> list[float] | None:
        """The fused KD target of one example (see :func:`fuse`)."""
        weights = self.weights([s.teacher_id for s in softs])
        return fuse(
            [(s.labels, s.logits, w) for s, w in zip(softs, weights, strict=True)],
            labels,
            temperature,
        )

    def to_json(self) -> dict[str, Any]:
        return {"hits": dict(self.hits), "seen": dict(self.seen)}

    def load_json(self, data: Mapping[str, Any]) -> None:
        self.hits = {k: float(v) for k, v in data.get("hits", {}).items()}
        self.seen = {k: float(v) for k, v in data.get("seen", {}).items()}
