"""One answer: the probabilities of a batch row summarised for the caller and the event."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stream_distill.events import TopIntent, new_id
from stream_distill.serving.predictor import Predictor


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    request_id: str
    intent: str
    confidence: float
    top: tuple[TopIntent, ...]
    model_version: str
    latency_ms: float
    entropy: float
    margin: float
    deadline_missed: bool
    answered_by: str | None = None
    """``"student"`` or ``"teacher"`` when the cascade saw the request, else None."""


def summarise(
    row: np.ndarray, session: Predictor, top_k: int, latency_ms: float, deadline_ms: float
) -> ClassifyResult:
    """Top-k, entropy and margin of one probability row of ``session``."""
    # Plain floats: for a few dozen labels numpy's per-call cost exceeds the arithmetic.
    p = [min(1.0, max(0.0, x)) for x in row.tolist()]
    order = sorted(range(len(p)), key=p.__getitem__, reverse=True)  # stable: ties keep order
    labels = session.labels
    # p is clipped to [0, 1] and labels are strings: nothing left for validation to check
    top = tuple(TopIntent.model_construct(intent=labels[i], p=p[i]) for i in order[: max(1, top_k)])
    second = p[order[1]] if len(order) > 1 else 0.0
    entropy = max(0.0, -sum(x * math.log(x) for x in p if x > 0.0))
    return ClassifyResult(
        request_id=new_id(),
        intent=top[0].intent,
        confidence=top[0].p,
        top=top,
        model_version=session.version,
        latency_ms=latency_ms,
        entropy=entropy if math.isfinite(entropy) else 0.0,
        margin=min(1.0, max(0.0, top[0].p - second)),
        deadline_missed=latency_ms > deadline_ms,
    )
