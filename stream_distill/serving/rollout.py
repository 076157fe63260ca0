"""One canary or shadow rollout: the candidate, its live counterpart, and the figures of both.

:mod:`.canary` runs rollouts; this module only holds what one of them saw, for
``GET /v1/rollout``, ``GET /v1/models`` and the automatic verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from stream_distill.events import utc_now
from stream_distill.serving.online import VersionAccuracy
from stream_distill.serving.session import StudentSession

Mode = Literal["canary", "shadow"]


@dataclass(slots=True)
class VersionFigures:
    """One version's part in a rollout."""

    accuracy: VersionAccuracy
    returned: int = 0
    mirrored: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "returned": self.returned,
            "mirrored": self.mirrored,
            "accuracy": self.accuracy.accuracy,
            "labels": self.accuracy.labels,
        }


@dataclass(eq=False, slots=True)
class Rollout:
    """A candidate next to the live model, and what was seen of both."""

    version: str
    mode: Mode
    fraction: float
    session: StudentSession
    live: str
    load_s: float
    window: int
    started_at: datetime = field(default_factory=utc_now)
    state: str = "running"
    reason: str = ""
    ended_at: datetime | None = None
    compared: int = 0
    agreed: int = 0
    dropped: int = 0
    figures: dict[str, VersionFigures] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def of(self, version: str) -> VersionFigures:
        fig = self.figures.get(version)
        if fig is None:
            fig = self.figures[version] = VersionFigures(VersionAccuracy(self.window))
        return fig

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "mode": self.mode,
            "fraction": self.fraction,
            "live": self.live,
            "state": self.state,
            "reason": self.reason,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "compared": self.compared,
            "agreed": self.agreed,
            "agreement": self.agreed / self.compared if self.compared else None,
            "mirror_dropped": self.dropped,
            "versions": {v: f.as_dict() for v, f in self.figures.items()},
        }
