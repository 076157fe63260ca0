"""The wire contract: typed, frozen, versioned events.

Every record on a stream_distill topic is one of these models serialised as JSON
(see :mod:`stream_distill.bus.codec`). Fields are documented where they are
declared; timestamps are timezone-aware UTC. ``schema_version`` lets readers
reject records written by an incompatible producer instead of misreading them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

Role = Literal["user", "agent", "system"]


def utc_now() -> datetime:
    """Current time, timezone-aware (UTC)."""
    return datetime.now(UTC)


_ID_BYTES = 16
_IDS_PER_READ = 256
_id_lock = threading.Lock()
_id_pool: list[bytes] = []


def _forget_ids() -> None:
    _id_pool.clear()  # a forked child must never hand out its parent's ids


os.register_at_fork(after_in_child=_forget_ids)


def new_id() -> str:
    """A fresh random identifier (hex UUID4 from the OS's secure random source).

    The random bytes are read for 256 ids at a time: one ``getrandom`` call per id
    costs little CPU, but it releases the GIL, and on a busy server getting it back
    can take far longer than the call.
    """
    with _id_lock:
        if not _id_pool:
            raw = os.urandom(_ID_BYTES * _IDS_PER_READ)
            _id_pool.extend(raw[i : i + _ID_BYTES] for i in range(0, len(raw), _ID_BYTES))
        b = _id_pool.pop()
    return uuid.UUID(bytes=b, version=4).hex


def label_set_version(labels: Sequence[str]) -> str:
    """``SoftLabel.label_set_version``: short sha256 of the label list, order included."""
    return hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()[:12]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Turn(_Frozen):
    """One turn of a dialogue."""

    role: Role = Field(description="Who spoke: the chatbot's user, the agent (bot) or system.")
    text: str = Field(description="What was said (redacted before it leaves serve).")


class TopIntent(_Frozen):
    """One entry of a ranked prediction."""

    intent: str = Field(description="Intent name.")
    p: float = Field(ge=0.0, le=1.0, description="Probability of that intent.")


class Event(_Frozen):
    """Base of all events: carries the schema version and the topic it belongs on."""

    kind: ClassVar[str] = "event"
    schema_version: Literal[1] = Field(default=1, description="Wire schema version.")
    ts: AwareDatetime = Field(
        default_factory=utc_now, description="When the event was created (UTC)."
    )


class RequestEvent(Event):
    """One answered classify request, as the teacher and trainer see it."""

    kind: ClassVar[str] = "request"
    request_id: str = Field(min_length=1, max_length=128, description="Unique id of the request.")
    conversation_id: str = Field(
        min_length=1, max_length=128, description="Dialogue id (the record key)."
    )
    turns: tuple[Turn, ...] = Field(
        min_length=1, description="Dialogue so far, current user turn last."
    )
    served_intent: str = Field(description="Intent returned to the caller.")
    top: tuple[TopIntent, ...] = Field(default=(), description="Top-k of the served distribution.")
    entropy: float = Field(ge=0.0, description="Entropy (nats) of the student's distribution.")
    margin: float = Field(ge=0.0, le=1.0, description="Top-1 minus top-2 probability.")
    model_version: str = Field(description="Student version that produced the answer.")
    latency_ms: float = Field(ge=0.0, description="Server-side latency of the answer.")


class SoftLabel(Event):
    """A teacher's opinion on one request."""

    kind: ClassVar[str] = "soft-label"
    request_id: str = Field(min_length=1, max_length=128, description="Request the label is for.")
    teacher_id: str = Field(min_length=1, description="Which teacher (for multi-teacher fusion).")
    teacher_version: str = Field(description="Version of that teacher's weights.")
    labels: tuple[str, ...] = Field(
        min_length=1, description="The teacher's label list (logit order)."
    )
    label_set_version: str = Field(
        description="Hash of ``labels``; changes when the label space grows."
    )
    logits: tuple[float, ...] = Field(min_length=1, description="Raw logits, one per label.")
    attention: tuple[float, ...] | None = Field(
        default=None, description="Optional [CLS]→token attention of the last layer, per token."
    )

    @field_validator("logits", "attention")
    @classmethod
    def _finite(cls, v: tuple[float, ...] | None, info: ValidationInfo) -> tuple[float, ...] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError(f"{info.field_name} must be finite")
        return v

    @model_validator(mode="after")
    def _widths_match(self) -> SoftLabel:
        if len(self.logits) != len(self.labels):
            raise ValueError(f"{len(self.logits)} logits for {len(self.labels)} labels")
        return self


HardLabelSource = Literal["user_confirmed", "agent", "annotator", "cascade"]


class HardLabel(Event):
    """A confirmed answer for one request."""

    kind: ClassVar[str] = "hard-label"
    feedback_id: str = Field(
        min_length=1, max_length=128, description="Unique id (de-duplication key)."
    )
    request_id: str = Field(min_length=1, max_length=128, description="Request being labelled.")
    intent: Annotated[str, Field(min_length=1, max_length=100)] = Field(
        description="The true intent."
    )
    source: HardLabelSource = Field(
        default="user_confirmed", description="Where the label came from."
    )
    principal: str = Field(default="anonymous", description="Authenticated writer of the label.")


class ModelMetrics(_Frozen):
    """Figures that justified a promotion."""

    holdout_accuracy: float | None = Field(
        default=None, description="Accuracy on held-out hard labels."
    )
    teacher_agreement: float | None = Field(
        default=None, description="Argmax agreement with the teacher."
    )
    examples_seen: int = Field(default=0, ge=0, description="Training examples consumed so far.")
    steps: int = Field(default=0, ge=0, description="Optimizer steps so far.")
    max_abs_logit_diff: float | None = Field(default=None, description="ONNX vs torch on a sample.")


class ModelPublished(Event):
    """A new student version is in the registry and may be served."""

    kind: ClassVar[str] = "model"
    version: str = Field(min_length=1, description="Version name (folder under versions/).")
    uri: str = Field(description="Where the version lives (registry URI).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of model.onnx.")
    labels: tuple[str, ...] = Field(min_length=1, description="Label list (output order).")
    metrics: ModelMetrics = Field(default_factory=ModelMetrics, description="Promotion figures.")
    parent: str | None = Field(default=None, description="Version this one was trained from.")


class TeacherPublished(Event):
    """A new teacher version is in the teacher store; every scorer should swap to it."""

    kind: ClassVar[str] = "teacher-model"
    version: str = Field(min_length=1, description="Store version (folder under versions/).")
    teacher_id: str = Field(min_length=1, description="Which teacher (as in its soft labels).")
    teacher_version: str = Field(
        min_length=1, description="Weights version the soft labels will carry."
    )
    uri: str = Field(description="Where the version lives (teacher store URI).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of manifest.json.")
    labels: tuple[str, ...] = Field(min_length=1, description="Label list (logit order).")
    label_set_version: str = Field(description="Hash of ``labels``.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Validation figures that justified the update."
    )
    parent: str | None = Field(default=None, description="Version this one was tuned from.")
    reason: str = Field(default="", description="What triggered the update.")


EVENT_TYPES: dict[str, type[Event]] = {
    t.kind: t for t in (RequestEvent, SoftLabel, HardLabel, ModelPublished, TeacherPublished)
}
