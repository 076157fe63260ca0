"""Settings of the teacher roles (scorer, updater, ``teacher-serve``): ``SD_TEACHER__*``.

Part of the one settings tree in :mod:`stream_distill.config`; kept apart because it is
one of the two largest sections (the trainer's is in :mod:`.config_learning`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

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
