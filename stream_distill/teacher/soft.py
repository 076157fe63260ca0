"""Soft labels from a teacher's output: one place for the scorer and the updater's relabel."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stream_distill.events import SoftLabel, Turn
from stream_distill.models.precision import use_bfloat16_for
from stream_distill.teacher.model import TeacherModel, TeacherOutput


def predict(
    model: TeacherModel,
    dialogues: Sequence[Sequence[Turn]],
    *,
    attention: bool,
    precision: str,
) -> TeacherOutput:
    """``model.predict`` under the configured precision (call it in the worker thread:
    CPU autocast is per thread)."""
    bf16 = use_bfloat16_for(precision, len(dialogues))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.predict(dialogues, attention=attention)


def soft_labels(
    model: TeacherModel, teacher_id: str, request_ids: Sequence[str], out: TeacherOutput
) -> list[SoftLabel]:
    """One :class:`SoftLabel` per request id, row ``i`` of ``out`` for ``request_ids[i]``."""
    labels: list[SoftLabel] = []
    for i, request_id in enumerate(request_ids):
        # Six decimals keep the JSON short and sit far below what a KD loss can feel.
        logits = tuple(round(float(x), 6) for x in out.logits[i])
        attn = tuple(round(x, 5) for x in out.attention[i]) if out.attention else None
        labels.append(
            SoftLabel(
                request_id=request_id,
                teacher_id=teacher_id,
                teacher_version=model.version,
                labels=model.labels,
                label_set_version=model.label_set_version,
                logits=logits,
                attention=attn,
            )
        )
    return labels
