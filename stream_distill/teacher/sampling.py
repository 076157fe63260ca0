"""Adaptive sampling: which requests are worth the teacher's time.

A pure policy (no I/O, clock and RNG injected). Per request it asks, in order:

1. **uncertain**: the student was unsure; always wanted. ``sample_uncertainty`` says how:

   - ``relative`` (default): its uncertainty, ``1 - margin`` (top-1 minus top-2 probability),
     is among the highest ``sample_uncertain_fraction`` of the last
     ``sample_uncertainty_window`` requests (the current batch included), i.e. above the
     rolling ``1 - sample_uncertain_fraction`` quantile; ties at the threshold are not.
     A student distilled at temperature 4 is flat on every answer (entropy ~2 nats over
     tens of labels), so absolute thresholds call all of it uncertain; the ranking still
     says which answers are shaky. The margin does not depend on the label count (which
     the event does not carry) nor on the distribution's tail.
     Each student version has its own window (a new version is usually surer: judged
     against the old one's scores, too few of its answers would count as uncertain; in a
     canary two versions answer side by side); until a version's window holds ``WARMUP``
     scores the absolute thresholds decide for its requests.
   - ``absolute``: entropy at or above ``sample_entropy_above``, or margin at or below
     ``sample_margin_below``.
2. **disagreement**: with probability ``min(1, gain × rate)``, where ``rate`` is the rolling
   student–teacher disagreement of the served intent (of all intents while that intent has too
   few observations; none at all before ``sample_min_observations``).
3. **random_floor**: with probability ``sample_floor``, so confident traffic keeps being checked
   and the disagreement rates keep being fed. One uniform draw decides 2 and 3 together: a
   confident request is wanted with probability ``max(p_disagreement, floor)``.

Wanted requests then need a token from a bucket refilled at ``sample_budget_rps`` (capacity
``sample_burst``); within a batch the uncertain ones take tokens first, then disagreement, then
floor, and within a reason the most uncertain first (lowest margin, then highest entropy).
Those left without a token are ``budget_exhausted``; the unwanted are
``skipped_confident``. Skipped requests are committed unscored. With no budget the scored
share is about
``sample_uncertain_fraction + (1 - sample_uncertain_fraction) × max(floor, gain × rate)``:
with the defaults 0.15 + 0.85 × max(0.05, 0.4 × rate), 0.19–0.27 for disagreement rates up
to 0.35 (a young student; the rates fall as it learns).

The budget belongs to one scorer process: N teacher processes in one group spend up to
N × ``sample_budget_rps`` together, so give each ``total / N``.

The disagreement rates are measured on the confident requests that were scored (uncertain
ones are sampled anyway, and their errors would inflate the rates): they find the intents
where the student is confidently wrong; they are not an accuracy estimate.
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stream_distill.config import TeacherSettings
from stream_distill.events import RequestEvent
from stream_distill.metrics.hooks import Hooks

UNCERTAIN = "uncertain"
DISAGREEMENT = "disagreement"
RANDOM_FLOOR = "random_floor"
BUDGET_EXHAUSTED = "budget_exhausted"
SKIPPED_CONFIDENT = "skipped_confident"
REASONS = (UNCERTAIN, DISAGREEMENT, RANDOM_FLOOR, BUDGET_EXHAUSTED, SKIPPED_CONFIDENT)
_PRIORITY = {UNCERTAIN: 0, DISAGREEMENT: 1, RANDOM_FLOOR: 2}
RATE_WINDOW = 1000  # decisions behind the sampling-rate gauge
WARMUP = 20  # uncertainty scores the relative threshold needs (before: absolute thresholds)
VERSIONS_KEPT = 4  # student versions with an uncertainty window (the oldest goes first)


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether one request is scored, and why."""

    score: bool
    reason: str


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    @property
    def tokens(self) -> float:
        now = self._clock()
        # max(): a clock that steps back must not drain the bucket
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        return self._tokens

    def take(self) -> bool:
        if self.tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Disagreement:
    """Rolling student–teacher disagreement, overall and per served intent."""

    def __init__(self, window: int, min_observations: int) -> None:
        self.window = window
        self.min_observations = min_observations
        self._overall: deque[bool] = deque(maxlen=window)
        self._by_intent: dict[str, deque[bool]] = {}

    @property
    def observed(self) -> int:
        """Observations in the overall window."""
        return len(self._overall)

    def observe(self, served_intent: str, teacher_intent: str) -> None:
        differs = served_intent != teacher_intent
        self._overall.append(differs)
        self._by_intent.setdefault(served_intent, deque(maxlen=self.window)).append(differs)

    def rate(self, served_intent: str | None = None) -> float | None:
        """Of ``served_intent`` when it has enough observations, else overall; None: too few."""
        if served_intent is not None:
            mine = self._by_intent.get(served_intent)
            if mine is not None and len(mine) >= self.min_observations:
                return sum(mine) / len(mine)
        if len(self._overall) >= self.min_observations:
            return sum(self._overall) / len(self._overall)
        return None


def uncertainty(event: RequestEvent) -> float:
    """How unsure the student was, in [0, 1]: one minus the top-1/top-2 margin."""
    return 1.0 - event.margin


class RollingTop:
    """Where the top ``share`` of the last ``window`` values begins."""

    def __init__(self, window: int, share: float) -> None:
        self.window = window
        self.share = share
        self._values: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._values)

    def extend(self, values: Sequence[float]) -> None:
        self._values.extend(values)

    def threshold(self) -> float | None:
        """The largest value not in the top ``share`` (``round(share × n)`` values lie above
        it when they are distinct); None when empty."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        return ordered[max(0, len(ordered) - 1 - round(self.share * len(ordered)))]


class AdaptiveSampler:
    """Decides per request whether the teacher scores it (see the module docstring)."""

    def __init__(
        self,
        settings: TeacherSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.hooks = hooks or Hooks()
        budget = settings.sample_budget_rps
        burst = settings.sample_burst or max(1.0, budget or 1.0)
        self.bucket = TokenBucket(budget, burst, clock) if budget is not None else None
        self.disagreement = Disagreement(settings.sample_window, settings.sample_min_observations)
        self.decisions: Counter[str] = Counter()
        self._recent: deque[bool] = deque(maxlen=RATE_WINDOW)
        self._scores: dict[str, RollingTop] = {}  # by student version
        self._thresholds: dict[str, float] = {}  # relative mode, once a version is warm

    @property
    def rate(self) -> float:
        """Fraction of the last decisions (up to 1000) that were scored; 0 before any."""
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    def uncertain(self, event: RequestEvent) -> bool:
        """The student was unsure of its answer (see ``sample_uncertainty``).

        Relative: strictly above the threshold of the last :meth:`choose`, so a stream of
        equal scores has no uncertain requests (nothing to rank them by).
        """
        threshold = self._thresholds.get(event.model_version)
        if threshold is not None:
            return uncertainty(event) > threshold
        s = self.settings
        return event.entropy >= s.sample_entropy_above or event.margin <= s.sample_margin_below

    def threshold(self, model_version: str) -> float | None:
        """Relative mode: a version's answers above this are uncertain; None: absolute."""
        return self._thresholds.get(model_version)

    def _update_thresholds(self, events: Sequence[RequestEvent]) -> None:
        s = self.settings
        if s.sample_uncertainty != "relative":
            return
        by_version: dict[str, list[float]] = {}
        for e in events:
            by_version.setdefault(e.model_version, []).append(uncertainty(e))
        for version, scores in by_version.items():
            window = self._scores.pop(version, None) or RollingTop(
                s.sample_uncertainty_window, s.sample_uncertain_fraction
            )
            self._scores[version] = window  # (re)inserted: the most recently seen is last
            window.extend(scores)
            threshold = window.threshold()
            if threshold is not None and len(window) >= min(WARMUP, window.window):
                self._thresholds[version] = threshold
        while len(self._scores) > VERSIONS_KEPT:
            oldest = next(iter(self._scores))
            del self._scores[oldest]
            self._thresholds.pop(oldest, None)

    def want(self, event: RequestEvent) -> str | None:
        """Why ``event`` should be scored (one RNG draw per call), or None."""
        s = self.settings
        u = self.rng.random()
        if self.uncertain(event):
            return UNCERTAIN
        rate = self.disagreement.rate(event.served_intent)
        p_disagree = min(1.0, s.sample_disagreement_gain * rate) if rate is not None else 0.0
        if u < p_disagree:
            return DISAGREEMENT
        if u < s.sample_floor:
            return RANDOM_FLOOR
        return None

    def choose(self, events: Sequence[RequestEvent]) -> list[Decision]:
        """One decision per event, in order; tokens go to the most wanted first.

        The batch joins the uncertainty window before the threshold is taken, so one
        threshold serves the whole batch and the decisions do not depend on its order.
        """
        self._update_thresholds(events)
        wants = [self.want(e) for e in events]
        decisions = [Decision(False, SKIPPED_CONFIDENT)] * len(events)
        wanted = [(i, w) for i, w in enumerate(wants) if w is not None]
        # by reason, then the most uncertain first; stable: arrival order among equals
        wanted.sort(key=lambda iw: (_PRIORITY[iw[1]], events[iw[0]].margin, -events[iw[0]].entropy))
        for i, reason in wanted:
            granted = self.bucket is None or self.bucket.take()
            decisions[i] = Decision(True, reason) if granted else Decision(False, BUDGET_EXHAUSTED)
        counts = Counter(d.reason for d in decisions)
        for reason, n in counts.items():
            self.hooks.on_teacher_sampling(reason, n)
        self.decisions.update(counts)
        self._recent.extend(d.score for d in decisions)
        if decisions:
            self.hooks.on_teacher_sampling_rate(self.rate)
        return decisions

    def observe(self, event: RequestEvent, teacher_intent: str) -> None:
        """Feed back what the teacher said about a scored request (confident ones count)."""
        if not self.uncertain(event):
            self.disagreement.observe(event.served_intent, teacher_intent)
