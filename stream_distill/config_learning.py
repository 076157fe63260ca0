"""Settings sections of the learning roles: the teacher scorer and updater, and the trainer.

Part of the one settings tree in :mod:`stream_distill.config` (``SD_TEACHER__*``,
``SD_TRAINER__*``); kept apart because these two sections are most of the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat

from stream_distill.config_base import Section


class TeacherSettings(Section):
    """The teacher scorer role."""

    teacher_id: str = Field(default="teacher", description="Names this teacher in its soft labels.")
    batch_size: int = Field(
        default=64,
        ge=1,
        description=(
            "Requests scored per model call at most (bfloat16 MiniLM-L6 on one core: ~290"
            " requests/s at 16, ~420 at 64)."
        ),
    )
    batch_wait_ms: float = Field(default=50.0, ge=0, description="How long a batch waits to fill.")
    threads: int = Field(
        default=1, ge=1, description="torch threads (1 per role: more stall on small hosts)."
    )
    emit_attention: bool = Field(
        default=True, description="Send the [CLS] attention vector for alignment."
    )
    group_id: str = Field(
        default="sd-teacher", description="Consumer group shared by all teacher processes."
    )
    store_dir: Path | None = Field(
        default=None,
        description="Versioned teacher store (a shared volume); None: <data_dir>/teacher-store.",
    )
    store_keep: int = Field(default=5, ge=1, description="Teacher versions kept in the store.")
    store_poll_s: float = Field(
        default=30.0,
        gt=0,
        description="Scorers also poll the store this often (the teacher-models topic is faster).",
    )
    update_every_labels: int = Field(
        default=500, ge=1, description="Fine-tune the teacher after this many new hard labels..."
    )
    update_every_s: float = Field(
        default=3600.0, gt=0, description="...or after this long with at least one new label."
    )
    new_intent_min_examples: int = Field(
        default=8,
        ge=1,
        description="Hard labels of an intent the teacher lacks that start an update at once.",
    )
    new_intent_join_examples: int = Field(
        default=2,
        ge=1,
        description=(
            "An update (whatever started it) also adds every unknown intent with this many hard"
            " labels, so intents that appear together are learnt together."
        ),
    )
    new_intent_refresh_until: int = Field(
        default=32,
        ge=0,
        description=(
            "An added intent is tuned again at once each time its hard labels double, until"
            " it was tuned with this many (0: only the periodic updates)."
        ),
    )
    update_steps: int = Field(
        default=100, ge=1, description="Optimizer steps per teacher update (fresh + replayed)."
    )
    update_batch_size: int = Field(default=16, ge=1, description="Examples per update step.")
    imprint_new_intents: bool = Field(
        default=True,
        description=(
            "Start a new intent's classifier row from the mean features of its examples "
            "(weight imprinting) instead of noise."
        ),
    )
    update_lr: float = Field(default=1e-4, gt=0, description="AdamW learning rate of updates.")
    update_replay_fraction: float = Field(
        default=0.75,
        ge=0,
        lt=1,
        description="Share of each update batch replayed from older labelled examples.",
    )
    update_distill_weight: float = Field(
        default=0.5,
        ge=0,
        description="Weight of the old teacher's logits on old intents (keeps what it knew).",
    )
    update_max_examples: int = Field(
        default=20000, ge=1, description="Labelled examples the updater keeps (oldest go first)."
    )
    update_join_window: int = Field(
        default=50000, ge=1, description="Requests the updater keeps awaiting hard labels."
    )
    update_holdout_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Share of request ids never tuned on (the update's validation set).",
    )
    update_min_holdout: int = Field(
        default=30,
        ge=1,
        description="Held-out labels of old intents needed before the no-worse check applies.",
    )
    update_margin: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Held-out accuracy on old intents an update may lose against the current.",
    )
    update_significance_z: float = Field(
        default=1.645,
        ge=0,
        description=(
            "An update is worse only when its loss on old intents exceeds update_margin by this"
            " many standard errors of the paired difference (1.645: one-sided 95 %; 0: the"
            " plain margin rule)."
        ),
    )
    relabel_recent: int = Field(
        default=2000,
        ge=0,
        description=(
            "After an update that adds intents, the updater scores the newest this many requests"
            " with the new version and publishes soft labels for those it assigns to an added"
            " intent, so the student learns them from the traffic already seen (0: off)."
        ),
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve /metrics on this port (None: off)."
    )
    max_in_flight: int = Field(
        default=256,
        ge=1,
        description=(
            "Requests fetched but not yet scored and committed; at this many the scorer pauses"
            " its partitions (and keeps polling, so the group does not rebalance)."
        ),
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description=(
            "bfloat16: score under CPU autocast, ~2.5x faster where the CPU has AMX or"
            " AVX512-BF16 (logits move ~0.03), much slower where it has neither; auto:"
            " bfloat16 exactly where the CPU has one of them, for batches of 8 rows or more"
            " (a lone request is faster in float32)."
        ),
    )
    sampling: Literal["all", "adaptive"] = Field(
        default="all",
        description=(
            "all: score every request; adaptive (recommended in production): the most uncertain,"
            " disagreement, floor, budget: ~0.25 of the requests with the defaults."
        ),
    )
    sample_budget_rps: float | None = Field(
        default=None,
        gt=0,
        description=(
            "adaptive: requests/s this scorer process may score (None: no cap). Per process:"
            " with N teacher processes give each total/N."
        ),
    )
    sample_burst: float | None = Field(
        default=None, ge=1, description="adaptive: tokens the budget saves up (None: one second's)."
    )
    sample_floor: float = Field(
        default=0.05, ge=0, le=1, description="adaptive: share of confident requests scored anyway."
    )
    sample_entropy_above: float = Field(
        default=1.0,
        ge=0,
        description="adaptive, absolute: student entropy (nats) that counts as uncertain.",
    )
    sample_margin_below: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="adaptive, absolute: top-1 minus top-2 that counts as uncertain.",
    )
    sample_uncertainty: Literal["relative", "absolute"] = Field(
        default="relative",
        description=(
            "adaptive: relative: uncertain = among the sample_uncertain_fraction most unsure"
            " (lowest margin) of recent requests; absolute: the entropy/margin thresholds."
        ),
    )
    sample_uncertain_fraction: float = Field(
        default=0.15, gt=0, lt=1, description="adaptive, relative: share of requests uncertain."
    )
    sample_uncertainty_window: int = Field(
        default=1000,
        ge=1,
        description="adaptive, relative: recent requests per student version behind that share.",
    )
    sample_disagreement_gain: float = Field(
        default=0.4,
        ge=0,
        description="adaptive: a confident request is scored with p = gain × disagreement rate.",
    )
    sample_window: int = Field(
        default=200, ge=1, description="adaptive: scored requests per intent behind that rate."
    )
    sample_min_observations: int = Field(
        default=20, ge=1, description="adaptive: below this, an intent uses the overall rate."
    )


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
