"""Online accuracy of each served version against hard labels, and automatic rollback.

serve remembers (boundedly) which version gave which answer to each of its own
requests; a group-less consumer reads the hard-labels topic from the end of the
log, so every replica judges its own answers. Labels for requests this replica
did not answer (or has forgotten) are ignored, and each request counts once.

When the serving version has ``rollback_min_labels`` labels and its rolling
accuracy is more than ``rollback_margin`` below that of its predecessor (with as
many labels), ``rollback(to, reason)`` is called.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stream_distill.bus.base import Bus, Producer, Record, Topics
from stream_distill.config import ServeSettings
from stream_distill.events import HardLabel
from stream_distill.metrics.hooks import Hooks
from stream_distill.serving.tail import decode_or_park, tail_topic

log = logging.getLogger(__name__)

# Accuracies are ratios of small integers; a gap equal to the margin must not trip it.
_EPS = 1e-9

RollbackFn = Callable[[str, str], bool]


@dataclass(slots=True)
class VersionAccuracy:
    """Correctness of the last ``window`` labelled answers of one version."""

    window: int
    labels: int = 0
    recent: deque[bool] = field(default_factory=deque)

    def add(self, correct: bool) -> None:
        self.labels += 1
        self.recent.append(correct)
        if len(self.recent) > self.window:
            self.recent.popleft()

    @property
    def accuracy(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None


class OnlineAccuracy:
    """Judges served answers by hard labels; ``start()``/``aclose()`` run the consumer."""

    def __init__(
        self,
        settings: ServeSettings,
        hooks: Hooks,
        *,
        current: Callable[[], str | None],
        predecessor: Callable[[str], str | None],
        rollback: RollbackFn,
        bus: Bus | None = None,
        producer: Producer | None = None,
        topics: Topics | None = None,
    ) -> None:
        self.settings = settings
        self.hooks = hooks
        self._current = current
        self._predecessor = predecessor
        self._rollback = rollback
        self.bus = bus
        self.producer = producer
        self.topics = topics or (bus.topics if bus is not None else Topics())
        self._answers: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.by_version: dict[str, VersionAccuracy] = {}
        # Set once the hard-labels consumer holds its position (or has given up for now).
        self.positioned = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- answers and labels ------------------------------------------------------------
    def remember(self, request_id: str, version: str, intent: str) -> None:
        self._answers[request_id] = (version, intent)
        while len(self._answers) > self.settings.online_remember:
            self._answers.popitem(last=False)

    def stats(self, version: str) -> VersionAccuracy | None:
        return self.by_version.get(version)

    def observe(self, label: HardLabel) -> bool:
        """Count one label; True when it concerned an answer of ours (first label only)."""
        answer = self._answers.pop(label.request_id, None)
        if answer is None:
            return False
        version, served = answer
        acc = self.by_version.get(version)
        if acc is None:
            acc = self.by_version[version] = VersionAccuracy(self.settings.online_window)
        acc.add(served == label.intent)
        self.hooks.on_online_accuracy(version, acc.accuracy or 0.0, acc.labels)
        if version == self._current():
            self.check(version)
        return True

    def check(self, version: str) -> bool:
        """Roll back from ``version`` if it answers clearly worse than its predecessor."""
        s = self.settings
        if not s.auto_rollback:
            return False
        previous = self._predecessor(version)
        mine = self.by_version.get(version)
        theirs = self.by_version.get(previous) if previous is not None else None
        if previous is None or mine is None or theirs is None:
            return False
        if min(mine.labels, theirs.labels) < s.rollback_min_labels:
            return False
        a, b = mine.accuracy or 0.0, theirs.accuracy or 0.0
        if b - a <= s.rollback_margin + _EPS:
            return False
        reason = (
            f"accuracy_drop: {version} {a:.3f} over {len(mine.recent)} labels vs "
            f"{previous} {b:.3f} over {len(theirs.recent)}"
        )
        return self._rollback(previous, reason)

    # -- consumer ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        if self.bus is None:
            self.positioned.set()
            return
        self._task = asyncio.create_task(self._consume(), name="sd-online-accuracy")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _consume(self) -> None:
        assert self.bus is not None
        await tail_topic(self.bus, self.topics.hard_labels, self._on_record, self.positioned)

    async def _on_record(self, record: Record) -> None:
        label = await decode_or_park(
            HardLabel, record, self.hooks, self.producer, self.topics.dead_letters
        )
        if label is None:
            return
        self.observe(label)
