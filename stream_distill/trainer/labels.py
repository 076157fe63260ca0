"""When a teacher's label list may grow the student's label space (pure Python, no torch).

The student's head grows in two ways (old rows are kept, new ones appended; see
:func:`stream_distill.models.factory.extend_head`):

* a hard label naming an intent the student lacks (a confirmed answer);
* a teacher label list holding labels the student lacks, e.g. after the teacher
  updater published a version that learned a new intent.

Growth cannot be undone (labels are never dropped), so a label list is trusted only
when all of this holds for the soft labels that carry it:

* each passed the event schema (finite logits, one per label) — poison never counts;
* its ``label_set_version`` is the hash of its ``labels``, i.e. it is a list a teacher
  stamped, not a hand-made or corrupted one;
* the list has no duplicates, every new name is a valid intent name (1 to
  ``MAX_LABEL_CHARS`` characters, not blank) and it shares at least two labels with
  the student (the KD rule: a foreign label set teaches nothing and grows nothing);
* the same list came in soft labels for ``min_soft`` distinct requests (setting
  ``trainer.label_growth_min_soft``; 0 turns growth from soft labels off).

New labels are appended in the teacher's order. KD stays aligned by label name (see
:meth:`stream_distill.trainer.learner.Learner._teacher_rows`), so a teacher and a
student whose lists differ in order or extent still compare label for label. The
votes round-trip through the trainer checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from stream_distill.events import SoftLabel, label_set_version

MAX_LABEL_CHARS = 100  # as HardLabel.intent
MAX_CANDIDATES = 32  # label lists awaiting votes; the oldest is forgotten beyond this


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_LABEL_CHARS and bool(name.strip())


class LabelGrowth:
    """Counts the requests each candidate teacher label list arrived with."""

    def __init__(self, min_soft: int) -> None:
        self.min_soft = min_soft
        self._votes: OrderedDict[str, set[str]] = OrderedDict()
        self.rejected = 0

    def new_labels(self, soft: SoftLabel, known: Iterable[str]) -> tuple[str, ...]:
        """Labels of ``soft`` the student should add now (empty: none, or not yet trusted)."""
        if self.min_soft <= 0:
            return ()
        have = set(known)
        new = tuple(name for name in soft.labels if name not in have)
        if not new:
            return ()
        if not self._trusted_list(soft, have):
            self.rejected += 1
            return ()
        key = soft.label_set_version
        votes = self._votes.setdefault(key, set())
        self._votes.move_to_end(key)
        votes.add(soft.request_id)
        while len(self._votes) > MAX_CANDIDATES:
            self._votes.popitem(last=False)
        if len(votes) < self.min_soft:
            return ()
        del self._votes[key]
        return new

    @staticmethod
    def _trusted_list(soft: SoftLabel, have: set[str]) -> bool:
        labels: Sequence[str] = soft.labels
        if soft.label_set_version != label_set_version(labels):
            return False
        if len(set(labels)) != len(labels):
            return False
        if not all(_valid_name(name) for name in labels if name not in have):
            return False
        return sum(name in have for name in labels) >= 2

    def to_json(self) -> dict[str, Any]:
        return {"votes": {k: sorted(v) for k, v in self._votes.items()}}

    def load_json(self, data: dict[str, Any] | None) -> None:
        votes = (data or {}).get("votes", {})
        self._votes = OrderedDict((k, set(v)) for k, v in votes.items())
