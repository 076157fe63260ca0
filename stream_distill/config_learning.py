"""Settings of the continual student trainer: ``SD_TRAINER__*``.

Part of the one settings tree in :mod:`stream_distill.config`; kept apart because it is
one of the two largest sections (the teacher's is in :mod:`.config_teacher`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat

from stream_distill.config_base import Section


class TrainerSettings(Section):
    """The continual student trainer role."""

    checkpoint_dir: Path = Field(
        default=Path(".sd/trainer"),
        description="Where the atomic checkpoint lives (keep it on a volume).",
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve /metrics on this port (None: off)."
    )
    batch_size: int = Field(
        default=32, ge=1, description="Examples per optimizer step (fresh + replayed)."
    )
    lr: float = Field(default=3e-4, gt=0, description="AdamW learning rate of the body.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KD term.")
    temperature: float = Field(default=2.0, gt=0, description="Distillation temperature T.")
    temperature_schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant",
        description="T over steps: constant, or linear/cosine from T down to temperature_final.",
    )
    temperature_final: float = Field(
        default=1.0, gt=0, description="T reached after temperature_steps (linear, cosine)."
    )
    temperature_steps: int = Field(
        default=1000, ge=1, description="Steps the temperature schedule takes to decay."
    )
    strategy: Literal["online", "hard_only", "self", "multi_teacher", "offline"] = Field(
        default="online",
        description=(
            "online: teacher soft labels + hard labels; hard_only: no teacher; self: an EMA of"
            " the student is the teacher (online falls back to it while no soft labels arrive);"
            " multi_teacher: the KD target fuses every teacher's soft label; offline: record the"
            " joined stream to disk, train epochs over it when a round is due."
        ),
    )
    teacher_weighting: Literal["static", "adaptive"] = Field(
        default="static",
        description=(
            "multi_teacher: static weights (teacher_weights), or adaptive ones from each"
            " teacher's rolling accuracy on hard labels."
        ),
    )
    teacher_weights: dict[str, NonNegativeFloat] = Field(
        default_factory=dict,
        description="multi_teacher, static: teacher_id -> weight (unlisted teachers weigh 1).",
    )
    teacher_accuracy_decay: float = Field(
        default=0.99, gt=0, lt=1, description="Adaptive: decay of each teacher's rolling accuracy."
    )
    teacher_weight_temperature: float = Field(
        default=0.1, gt=0, description="Adaptive: weights are softmax(accuracy / this)."
    )
    teachers_expected: int = Field(
        default=1,
        ge=1,
        description="multi_teacher: without a hard label, an example waits for this many teachers.",
    )
    offline_train_after: int = Field(
        default=1000,
        ge=1,
        description=(
            "offline: a training round starts at this many examples, or at once when an"
            " operator sends SIGUSR1 to the trainer process."
        ),
    )
    offline_max_examples: int = Field(
        default=100000, ge=1, description="offline: bound of the recorded set (more are dropped)."
    )
    offline_epochs: int = Field(
        default=3, ge=1, description="offline: passes over the recorded set per round."
    )
    ema_decay: float = Field(
        default=0.995,
        gt=0,
        lt=1,
        description=(
            "Decay of the EMA of the weights (the EMA teacher; with publish_ema the candidate);"
            " step t uses min(this, (1+t)/(10+t))."
        ),
    )
    publish_ema: bool = Field(
        default=True,
        description=(
            "Offer the EMA of the weights as the candidate instead of the latest weights"
            " (Polyak averaging: steadier versions from a noisy stream)."
        ),
    )
    self_fallback_s: float = Field(
        default=120.0,
        gt=0,
        description="online: use the EMA teacher after this long without soft labels.",
    )
    imprint_new_labels: bool = Field(
        default=False,
        description=(
            "A label added to the student starts its classifier row from the mean features of"
            " the newest examples confirmed as it or scored as it by a teacher (imprinting;"
            " off: in the drift benchmark it did not speed up the student, whose rows are soon"
            " driven by the teacher's soft labels)."
        ),
    )
    novel_label_weight: float = Field(
        default=1.0,
        ge=0,
        description=(
            "A hard label that no teacher's label list holds (a new intent the teachers do not"
            " know yet) adds alpha × this × its CE: it is learnt at full weight, not (1-alpha)."
        ),
    )
    overruled_label_weight: float = Field(
        default=0.0,
        ge=0,
        description=(
            "A hard label that every teacher knows but ranks below another intent (the teacher"
            " is wrong on a confirmed answer) adds alpha × this × its CE (0: off)."
        ),
    )
    attention_weight: float = Field(
        default=0.1, ge=0, description="Weight of the [CLS] attention alignment term."
    )
    publish_every_steps: int = Field(
        default=50, ge=1, description="Offer a candidate after this many steps..."
    )
    publish_every_s: float = Field(
        default=60.0, gt=0, description="...or after this many seconds with new steps."
    )
    min_examples_to_train: int = Field(
        default=8, ge=1, description="A step runs on fewer fresh examples only when idle."
    )
    label_growth_min_soft: int = Field(
        default=3,
        ge=0,
        le=10000,
        description=(
            "A teacher label list with labels the student lacks grows the student's head once"
            " it came, hash-checked, in soft labels for this many requests (0: only hard labels"
            " grow it)."
        ),
    )
    join_window: int = Field(default=50000, ge=1, description="Requests kept awaiting labels.")
    threads: int = Field(
        default=1, ge=1, description="torch threads (1 per role: more stall on small hosts)."
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description=(
            "Forward passes of training steps under CPU autocast to bfloat16 (weights,"
            " gradients and optimizer state stay float32): ~2x faster steps where the CPU"
            " has AMX or AVX512-BF16; auto: bfloat16 exactly there. Exports are float32."
        ),
    )
    freeze_word_embeddings: bool = Field(
        default=True, description="Keep the vocabulary matrix fixed (faster steps, small state)."
    )
    holdout_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of request ids never trained on (the gate's test set).",
    )
    replay_size: int = Field(default=5000, ge=0, description="Reservoir of past examples.")
    replay_balance: Literal["reservoir", "class_balanced"] = Field(
        default="reservoir",
        description="One uniform reservoir, or one per class (hard label, else teacher argmax).",
    )
    replay_ratio: float = Field(
        default=0.5, ge=0, lt=1, description="Share of each batch drawn from the reservoir."
    )
    new_class_replay_share: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description=(
            "Share of each replay draw taken from recent examples of intents the student added"
            " within new_class_replay_steps (0: off), so new intents are rehearsed while they"
            " are learnt."
        ),
    )
    new_class_replay_steps: int = Field(
        default=2000, ge=1, description="Optimizer steps an added intent is rehearsed for."
    )
    new_class_publish_every_s: float = Field(
        default=10.0,
        gt=0,
        description=(
            "For new_class_publish_steps after the student adds an intent, offer a candidate"
            " this often (when shorter than publish_every_s): the serving version cannot"
            " answer the new intent at all, so each version that learnt more is worth more."
        ),
    )
    new_class_publish_steps: int = Field(
        default=500, ge=0, description="Optimizer steps the faster publishing lasts (0: off)."
    )
    idle_replay_factor: float = Field(
        default=4.0,
        ge=0,
        description=(
            "While no fresh batch is ready, keep learning from the reservoir alone, up to this"
            " many replayed examples per fresh example taken so far (0: only learn on arrivals)."
        ),
    )
    idle_replay_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description=(
            "Niceness of the thread that runs replay-only steps, so they use only CPU the other"
            " roles on the host leave over (0: same priority as fresh steps)."
        ),
    )
    checkpoint_every_steps: int = Field(
        default=100, ge=1, description="Write the checkpoint after this many steps..."
    )
    checkpoint_every_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "...or after this long with new steps (and at every publish and stop). A restart"
            " re-reads what came after the last one: exactly once either way."
        ),
    )
    head_lr_multiplier: float = Field(
        default=3.0, gt=0, description="The classifier head learns this much faster."
    )
    promotion_margin: float = Field(
        default=0.02, ge=0, le=1, description="Gate: held-out accuracy may trail serving by this."
    )
    agreement_margin: float = Field(
        default=0.02, ge=0, le=1, description="Gate: teacher agreement may trail serving by this."
    )
    quantize: Literal["none", "int8"] = Field(
        default="none", description="Publish fp32 ONNX, or dynamically quantised int8 weights."
    )
    int8_min_agreement: float = Field(
        default=0.99, ge=0, le=1, description="int8: argmax agreement with fp32 needed to publish."
    )
