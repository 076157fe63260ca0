"""What serve runs: anything that turns dialogues into probabilities over its labels.

The ONNX student (:class:`~stream_distill.serving.session.StudentSession`) is the usual
one; :mod:`stream_distill.teacher.serve` puts the torch teacher in its place, so the
same HTTP app, batcher and deadlines serve either, and serving never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_distill.events import Turn


class Predictor(Protocol):
    """A model serve can answer with; ``predict`` runs on one worker thread at a time."""

    @property
    def version(self) -> str:
        """Names the model in every answer it computes."""
        ...

    @property
    def labels(self) -> tuple[str, ...]:
        """Output order of :meth:`predict`'s columns."""
        ...

    @property
    def sha256(self) -> str:
        """Digest of the weights, shown by ``/v1/models``."""
        ...

    def predict(self, dialogues: Sequence[Sequence[Turn]]) -> npt.NDArray[np.float32]:
        """Probabilities ``[len(dialogues), len(labels)]``, rows summing to one."""
        ...
