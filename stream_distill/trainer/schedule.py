"""The distillation temperature as a pure function of the optimizer step.

A high T early spreads the teacher's mass over more labels (dark knowledge while the
student knows little); decaying it sharpens the target as the student catches up.
The step count travels in the checkpoint, so a restarted trainer resumes the
schedule where it stopped.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine"]


def temperature_at(step: int, schedule: Schedule, start: float, end: float, steps: int) -> float:
    """T at ``step``: ``start`` for constant; from ``start`` to ``end`` over ``steps`` otherwise.

    Past ``steps`` the schedule holds ``end``; a negative step counts as 0.
    """
    if schedule == "constant":
        return start
    progress = min(max(step, 0), steps) / steps
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown temperature schedule {schedule!r}")
