"""Held-out figures for the demo report: student versions, the teacher, topic counts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stream_distill.bus.base import Bus
from stream_distill.config import ServeSettings
from stream_distill.data.synthetic import LabeledTurn
from stream_distill.registry.base import ModelStore


def student_accuracy(registry: ModelStore, version: str, examples: Sequence[LabeledTurn]) -> float:
    """Accuracy of a published ONNX version (sha256-verified load) on held-out turns."""
    from stream_distill.serving.session import StudentSession

    session = StudentSession.from_version(registry.load(version), ServeSettings())
    hits = 0
    for i in range(0, len(examples), 64):
        chunk = examples[i : i + 64]
        probs = session.predict([ex.turns for ex in chunk])
        hits += sum(
            session.labels[int(p.argmax())] == ex.intent for p, ex in zip(probs, chunk, strict=True)
        )
    return hits / len(examples)


def teacher_accuracy(teacher_dir: Path, examples: Sequence[LabeledTurn]) -> float:
    from stream_distill.teacher.model import TeacherModel

    teacher = TeacherModel.load(teacher_dir)
    predicted = teacher.predict_labels([ex.turns for ex in examples])
    return sum(p == ex.intent for p, ex in zip(predicted, examples, strict=True)) / len(examples)


async def count_records(bus: Bus, topic: str, idle_polls: int = 3) -> int:
    """Records on ``topic`` now (reads it from the start; fine for demo sizes)."""
    n, idle = 0, 0
    async with bus.consumer([topic], group_id=None, offset_reset="earliest") as c:
        while idle < idle_polls:
            got = await c.getmany(timeout_ms=300, max_records=10000)
            n += len(got)
            idle = 0 if got else idle + 1
    return n
