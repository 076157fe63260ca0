"""The paired test both promotion gates use (the teacher updater's and the trainer's)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def significantly_worse(
    before: Sequence[bool], after: Sequence[bool], margin: float, z: float
) -> bool:
    """Paired one-sided test (McNemar's, normal approximation) on the same examples.

    ``b``: right before and wrong after; ``c``: the reverse. The candidate is worse when
    ``b - c`` exceeds the margin's share of the examples by more than ``z`` standard
    errors (``sqrt(b + c)``). With ``z`` = 0 this is the plain margin rule; with a few
    dozen held-out labels it keeps one or two unlucky examples from vetoing an update.
    """
    b = sum(x and not y for x, y in zip(before, after, strict=True))
    c = sum(y and not x for x, y in zip(before, after, strict=True))
    return b - c > margin * len(before) + z * math.sqrt(b + c)
