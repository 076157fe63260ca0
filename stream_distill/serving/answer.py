"""One answer: the probabilities of a batch row summarised for the caller and the event."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from stream_distill.events import new_id
from stream_distill.serving.predictor import Predictor


class Ranked(NamedTuple):
    """One entry of an answer's top-k; an event carries it as a ``TopIntent``.

    A plain tuple: building pydantic models for the top-k cost the answer several
    microseconds before it could leave; the event is built after it left.
    """

    intent: str
    p: float


@dataclass(frozen=True, slots=True)
class ClassifyResult:
    request_id: str
    intent: str
    confidence: float
    top: tuple[Ranked, ...]
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
    p: list[float] = row.tolist()
    order = sorted(range(len(p)), key=p.__getitem__, reverse=True)  # stable: ties keep order
    labels = session.labels
    # p is clipped to [0, 1] where it is shown: rounding could leave a share a hair outside
    top = tuple(Ranked(labels[i], min(1.0, max(0.0, p[i]))) for i in order[: max(1, top_k)])
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
