"""Export the student to ONNX, gate it, write it to the registry and announce it."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from stream_distill.bus.base import Producer, Topics
from stream_distill.bus.codec import encode, headers_for
from stream_distill.errors import RegistryError
from stream_distill.events import ModelMetrics, ModelPublished, Turn
from stream_distill.models.export import export_onnx, onnx_logits, onnx_max_abs_diff
from stream_distill.registry.base import ModelStore, ModelVersion
from stream_distill.trainer.join import JoinState
from stream_distill.trainer.learner import Learner

log = logging.getLogger(__name__)

MIN_HOLDOUT = 20
# Always part of the export check, so even the first version (no traffic yet) is compared.
CANNED: tuple[tuple[Turn, ...], ...] = (
    (Turn(role="user", text="where is my order?"),),
    (Turn(role="user", text="x"),),
    (
        Turn(role="user", text="I want a refund for order #A12345, it arrived broken " * 4),
        Turn(role="agent", text="Sorry to hear that."),
        Turn(role="user", text="yes please do that"),
    ),
)
EXPORT_TOLERANCE = 1e-4


@dataclass
class Candidate:
    onnx: bytes
    metrics: ModelMetrics
    accepted: bool
    reason: str


class Publisher:
    """Gates candidates against the version serve runs now, read back from the registry.

    The comparison uses the published ONNX itself (sha256-verified), so it holds after a
    trainer restart and measures exactly what users get.
    """

    def __init__(
        self, registry: ModelStore, topics: Topics, tokenizer_json: str, margin: float
    ) -> None:
        self.registry = registry
        self.topics = topics
        self.tokenizer_json = tokenizer_json
        self.margin = margin
        self.published_version: str | None = None

    def evaluate(self, learner: Learner, join: JoinState) -> Candidate:
        """Runs in a worker thread: export, check export, score on held-out labels."""
        onnx = export_onnx(learner.model, learner.encoder.max_length)
        holdout = list(join.holdout)
        dialogues = [turns for turns, _ in holdout]
        intents = [y for _, y in holdout]
        sample = dialogues[:16] + [ex.turns for ex in join.recent_soft(16)] + list(CANNED)
        diff = onnx_max_abs_diff(learner.model, onnx, learner.encoder.encode(sample))
        acc = learner.accuracy(dialogues, intents) if len(holdout) >= MIN_HOLDOUT else None
        agreement = _teacher_agreement(learner, join)
        metrics = ModelMetrics(
            holdout_accuracy=acc,
            teacher_agreement=agreement,
            examples_seen=learner.examples_seen,
            steps=learner.steps,
            max_abs_logit_diff=diff,
        )
        if not diff <= EXPORT_TOLERANCE:
            return Candidate(onnx, metrics, False, f"ONNX differs from torch by {diff:.2e}")
        if acc is not None and self.published_version is not None:
            before = self._published_accuracy(learner, dialogues, intents)
            if before is not None and acc < before - self.margin:
                return Candidate(
                    onnx, metrics, False, f"held-out accuracy {acc:.3f} < serving {before:.3f}"
                )
        return Candidate(onnx, metrics, True, "ok")

    async def publish(self, producer: Producer, learner: Learner, cand: Candidate) -> ModelVersion:
        mv = self.registry.publish(
            cand.onnx,
            learner.labels,
            self.tokenizer_json,
            parent=self.published_version,
            metrics=cand.metrics.model_dump(),
            max_length=learner.encoder.max_length,
        )
        event = ModelPublished(
            version=mv.version,
            uri=self.registry.uri(mv.version),
            sha256=mv.sha256,
            labels=learner.labels,
            metrics=cand.metrics,
            parent=self.published_version,
        )
        await producer.send(
            self.topics.models, encode(event), key=b"student", headers=headers_for(event)
        )
        self.published_version = mv.version
        log.info("published %s %s", mv.version, cand.metrics.model_dump())
        return mv

    def _published_accuracy(
        self, learner: Learner, dialogues: list[Any], intents: list[str]
    ) -> float | None:
        """Held-out accuracy of the serving version (None if it is gone or unreadable)."""
        assert self.published_version is not None
        try:
            mv = self.registry.load(self.published_version)
        except RegistryError as exc:
            log.warning("cannot score %s for the gate: %s", self.published_version, exc)
            return None
        batches = [
            learner.encoder.encode(dialogues[i : i + 64]) for i in range(0, len(dialogues), 64)
        ]
        pred = onnx_logits(mv.model, batches).argmax(axis=1)
        return sum(mv.labels[int(p)] == y for p, y in zip(pred, intents, strict=True)) / len(
            intents
        )


def _teacher_agreement(learner: Learner, join: JoinState) -> float | None:
    recent = [ex for ex in join.recent_soft(200) if ex.soft and ex.soft.labels == learner.labels]
    if not recent:
        return None
    probs = learner.predict_many([ex.turns for ex in recent])
    agree = sum(
        int(p.argmax()) == max(range(len(ex.soft.logits)), key=ex.soft.logits.__getitem__)
        for p, ex in zip(probs, recent, strict=True)
        if ex.soft is not None
    )
    value = agree / len(recent)
    return value if math.isfinite(value) else None
