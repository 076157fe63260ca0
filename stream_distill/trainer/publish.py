"""Export the student to ONNX, gate it, write it to the registry and announce it.

The gate publishes a candidate only if it is not worse than the serving version, by
``promotion_margin``, on held-out hard labels AND, by ``agreement_margin``, on argmax
agreement with the teacher (the latest soft labels of held-out requests, or of recent
ones while the held-out slice is small). Both sides are scored through their ONNX
files, so the figures are what users get (int8 included).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stream_distill.bus.base import Producer, Topics
from stream_distill.bus.codec import encode, headers_for
from stream_distill.config import TrainerSettings
from stream_distill.errors import RegistryError
from stream_distill.events import ModelMetrics, ModelPublished, Turn
from stream_distill.models.export import (
    compare_onnx,
    export_onnx,
    onnx_logits,
    onnx_max_abs_diff,
    quantize_int8,
)
from stream_distill.models.text import TextEncoder
from stream_distill.registry.base import ModelStore, ModelVersion
from stream_distill.trainer.join import JoinState
from stream_distill.trainer.learner import Learner

log = logging.getLogger(__name__)

MIN_HOLDOUT = 20
AGREEMENT_SLICE = 200
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
    manifest: dict[str, Any] = field(default_factory=dict)
    """Everything the manifest records: ``metrics`` plus the serving figures and checks."""


@dataclass(frozen=True)
class Scores:
    accuracy: float | None
    agreement: float | None


@dataclass(frozen=True)
class EvalSet:
    """What a model is scored on: held-out hard labels and teacher choices."""

    dialogues: list[tuple[Turn, ...]]
    intents: list[str]
    agree_dialogues: list[tuple[Turn, ...]]
    choices: list[str]
    agreement_slice: str

    def score(self, model: bytes, labels: Sequence[str], encoder: TextEncoder) -> Scores:
        rows = self.dialogues + self.agree_dialogues
        batches = [encoder.encode(rows[i : i + 64]) for i in range(0, len(rows), 64)]
        names = [labels[int(j)] for j in onnx_logits(model, batches).argmax(axis=1)] if rows else []
        held, agree = names[: len(self.dialogues)], names[len(self.dialogues) :]
        acc = _share(held, self.intents) if len(self.intents) >= MIN_HOLDOUT else None
        return Scores(acc, _share(agree, self.choices))


def _share(got: Sequence[str], want: Sequence[str]) -> float | None:
    if not want:
        return None
    value = sum(a == b for a, b in zip(got, want, strict=True)) / len(want)
    return value if math.isfinite(value) else None


def eval_set(learner: Learner, join: JoinState) -> EvalSet:
    holdout = list(join.holdout)
    recent, where = join.recent_soft(AGREEMENT_SLICE, holdout=True), "holdout"
    if len(recent) < MIN_HOLDOUT:  # few held-out soft labels yet: the newest ones at all
        recent, where = join.recent_soft(AGREEMENT_SLICE), "recent"
    pairs = [(ex.turns, learner.teacher_choice(ex)) for ex in recent]
    kept = [(t, c) for t, c in pairs if c is not None]
    return EvalSet(
        [turns for turns, _ in holdout],
        [y for _, y in holdout],
        [t for t, _ in kept],
        [c for _, c in kept],
        where,
    )


class Publisher:
    """Gates candidates against the version serve runs now, read back from the registry.

    The comparison uses the published ONNX itself (sha256-verified), so it holds after a
    trainer restart and measures exactly what users get.
    """

    def __init__(
        self,
        registry: ModelStore,
        topics: Topics,
        tokenizer_json: str,
        settings: TrainerSettings,
    ) -> None:
        self.registry = registry
        self.topics = topics
        self.tokenizer_json = tokenizer_json
        self.settings = settings
        self.published_version: str | None = None

    def evaluate(self, learner: Learner, join: JoinState) -> Candidate:
        """Runs in a worker thread: export, check export (and int8), score, compare."""
        model = learner.candidate_model()
        fp32 = export_onnx(model, learner.encoder.max_length)
        ev = eval_set(learner, join)
        sample = ev.dialogues[:16] + ev.agree_dialogues[:16] + list(CANNED)
        diff = onnx_max_abs_diff(model, fp32, learner.encoder.encode(sample))
        extra: dict[str, Any] = {
            "quantize": self.settings.quantize,
            "temperature": learner.temperature,
            "agreement_slice": ev.agreement_slice,
            "agreement_examples": len(ev.choices),
            "holdout_examples": len(ev.intents),
        }
        artifact, reason = fp32, ""
        if not diff <= EXPORT_TOLERANCE:
            reason = f"ONNX differs from torch by {diff:.2e}"
        elif self.settings.quantize == "int8":
            artifact = quantize_int8(fp32)
            rows = ev.dialogues + ev.agree_dialogues + list(CANNED)
            batches = [learner.encoder.encode(rows[i : i + 64]) for i in range(0, len(rows), 64)]
            agreement, prob_diff = compare_onnx(fp32, artifact, batches)
            extra.update(int8_agreement=agreement, int8_max_prob_diff=prob_diff)
            if not agreement >= self.settings.int8_min_agreement:
                reason = (
                    f"int8 agrees with fp32 on {agreement:.3f} of the sample"
                    f" < {self.settings.int8_min_agreement:.3f}"
                )
        mine = ev.score(artifact, learner.labels, learner.encoder)
        metrics = ModelMetrics(
            holdout_accuracy=mine.accuracy,
            teacher_agreement=mine.agreement,
            examples_seen=learner.examples_seen,
            steps=learner.steps,
            max_abs_logit_diff=diff,
        )
        if not reason:
            reason = self._compare(mine, ev, learner.encoder, extra)
        manifest = {**metrics.model_dump(), **extra}
        return Candidate(artifact, metrics, not reason, reason or "ok", manifest)

    def _compare(
        self, mine: Scores, ev: EvalSet, encoder: TextEncoder, extra: dict[str, Any]
    ) -> str:
        """Why the candidate is worse than serving ("" when it is not)."""
        serving = self._serving_scores(ev, encoder)
        if serving is None:
            return ""
        extra.update(
            serving_holdout_accuracy=serving.accuracy,
            serving_teacher_agreement=serving.agreement,
        )
        s = self.settings
        acc, before = mine.accuracy, serving.accuracy
        if acc is not None and before is not None and acc < before - s.promotion_margin:
            return f"held-out accuracy {acc:.3f} < serving {before:.3f}"
        agree, was = mine.agreement, serving.agreement
        if agree is not None and was is not None and agree < was - s.agreement_margin:
            return f"teacher agreement {agree:.3f} < serving {was:.3f}"
        return ""

    async def publish(self, producer: Producer, learner: Learner, cand: Candidate) -> ModelVersion:
        mv = self.registry.publish(
            cand.onnx,
            learner.labels,
            self.tokenizer_json,
            parent=self.published_version,
            metrics=cand.manifest or cand.metrics.model_dump(),
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

    def _serving_scores(self, ev: EvalSet, encoder: TextEncoder) -> Scores | None:
        """The serving version's figures on the same set (None if none, gone or unreadable)."""
        if self.published_version is None:
            return None
        try:
            mv = self.registry.load(self.published_version)
        except RegistryError as exc:
            log.warning("cannot score %s for the gate: %s", self.published_version, exc)
            return None
        return ev.score(mv.model, mv.labels, encoder)
