"""The last K verified sessions, so a rollback is a reference swap rather than a reload.

Each kept version remembers its *predecessor*: the version that was serving when it
was first swapped in. A rollback never rewrites that, so "roll back" from a version
always means "return to what served before it", however often the operator goes
back and forth.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from stream_distill.events import utc_now
from stream_distill.serving.session import StudentSession


@dataclass(frozen=True, slots=True)
class Pin:
    """Serving stays on ``version`` (rolled back to); versions up to ``above`` are skipped."""

    version: str
    above: str
    reason: str
    at: datetime = field(default_factory=utc_now)


@dataclass(slots=True)
class KeptVersion:
    session: StudentSession
    predecessor: str | None

    @property
    def version(self) -> str:
        return self.session.version


class KeptVersions:
    """Verified sessions, oldest first; the serving one is never evicted."""

    def __init__(self, keep: int) -> None:
        if keep < 1:
            raise ValueError("keep at least the serving version")
        self.keep = keep
        self._kept: OrderedDict[str, KeptVersion] = OrderedDict()

    def __contains__(self, version: object) -> bool:
        return version in self._kept

    def __iter__(self) -> Iterator[KeptVersion]:
        return iter(list(self._kept.values()))

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, version: str) -> KeptVersion | None:
        return self._kept.get(version)

    def add(self, session: StudentSession, predecessor: str | None, serving: str) -> None:
        """Keep ``session``; evict the oldest others beyond ``keep`` (never ``serving``)."""
        old = self._kept.pop(session.version, None)
        if old is not None:
            predecessor = old.predecessor
        self._kept[session.version] = KeptVersion(session, predecessor)
        for version in list(self._kept):
            if len(self._kept) <= self.keep:
                break
            if version not in (serving, session.version):
                del self._kept[version]  # its session is freed once no batch holds it

    def predecessor(self, version: str) -> str | None:
        """The version that served before ``version`` when it is still kept, else None."""
        kept = self._kept.get(version)
        if kept is None or kept.predecessor is None or kept.predecessor not in self._kept:
            return None
        return kept.predecessor
