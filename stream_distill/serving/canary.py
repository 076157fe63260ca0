"""Canary and shadow rollouts: a candidate version runs next to the live one before it serves.

With ``serve.rollout_mode`` ``canary`` or ``shadow`` a new version found by the watcher
(or one an operator names) becomes the *candidate* instead of being swapped in:

- **canary**: ``canary_fraction`` of the requests are answered by the candidate (through
  a batcher of its own). A request with a ``conversation_id`` is routed by a hash of it,
  so a conversation stays on one version; others are drawn at random. The live model is
  also run on a copy of each canary request, off the response path, so agreement is
  known for canary answers as well.
- **shadow**: every request (or ``shadow_fraction`` of them) is answered by the live
  model; a copy goes to the candidate off the response path and its answer is only
  recorded, never returned.

Copies wait in a bounded queue for one worker thread, which runs them only while no
request waits for a batch; when the queue is full a copy is dropped and counted, so a
slow candidate never delays a live answer (it still shares the CPU with it). Every answer names
the one version that computed it (the candidate for canary answers, the live model
otherwise), in the response and in the request event.

Per rollout and version: answers returned and mirrored, agreement where both models ran,
and the rolling accuracy of each version's answers (returned or not) on the rollout's
requests that got a hard label. With ``rollout_auto``, once candidate and live both have
``rollout_min_labels`` labels, the candidate is promoted when it is at most
``rollback_margin`` below the live accuracy (so a promoted version would not be rolled
back by the same rule) and aborted otherwise. An aborted candidate pins serve on the
live version the way a rollback does: the watcher skips versions up to the candidate
until a newer one appears or the pin is lifted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stream_distill.bus.tail import decode_or_park, tail_topic
from stream_distill.errors import NotReady
from stream_distill.events import HardLabel, Turn, utc_now
from stream_distill.serving.batcher import Batcher
from stream_distill.serving.predictor import Predictor
from stream_distill.serving.rollout import Mode, Rollout
from stream_distill.serving.session import StudentSession
from stream_distill.serving.versions import Pin
from stream_distill.serving.watcher import version_number

if TYPE_CHECKING:
    from stream_distill.bus.base import Record
    from stream_distill.serving.service import ServingCore

log = logging.getLogger(__name__)

HISTORY = 10
"""Finished rollouts remembered for ``GET /v1/rollout``."""

# Accuracies are ratios of small integers; a gap equal to the margin is within it.
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class _Copy:
    """A request answered by one model, for the other model of the rollout to run."""

    rollout: Rollout
    request_id: str
    dialogue: Sequence[Turn]
    session: Predictor
    answered: str


class RolloutController:
    """The candidate of ``core``; ``start()``/``aclose()``, then :meth:`route`/:meth:`answered`."""

    def __init__(self, core: ServingCore, *, seed: int | None = None) -> None:
        self.core = core
        self.settings = core.settings
        self.hooks = core.hooks
        self.current: Rollout | None = None
        self.history: deque[Rollout] = deque(maxlen=HISTORY)
        self.batcher = Batcher(self._candidate, core.settings, core.hooks, core._clock)
        self._rng = random.Random(seed)
        self._copies: asyncio.Queue[_Copy] = asyncio.Queue(core.settings.shadow_queue_size)
        # request id -> (rollout, {version: intent}) until its hard label arrives
        self._answers: OrderedDict[str, tuple[Rollout, dict[str, str]]] = OrderedDict()
        # Set once the hard-labels consumer holds its position (or has given up for now).
        self.positioned = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._labels: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    def _candidate(self) -> Predictor | None:
        # Requests routed just before a promotion or abort are answered by the live model.
        r = self.current
        return r.session if r is not None else self.core.session

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._tasks:
            return
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sd-mirror")
        self._tasks.append(asyncio.create_task(self._mirror(), name="sd-rollout-mirror"))

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        if self._labels is not None:
            tasks.append(self._labels)
            self._labels = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.batcher.aclose()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def holds(self, version: str) -> bool:
        """True when ``version`` is the running candidate (the watcher need not load it)."""
        r = self.current
        return r is not None and r.version == version

    def state(self) -> dict[str, Any]:
        r = self.current
        return {
            "mode": self.settings.rollout_mode,
            "current": r.as_dict() if r is not None else None,
            "history": [h.as_dict() for h in reversed(self.history)],
        }

    # -- starting and ending -----------------------------------------------------------
    def adopt(self, session: StudentSession, load_s: float) -> bool:
        """Take a freshly verified version as the candidate, unless it should go live at once."""
        mode = self.settings.rollout_mode
        if mode == "direct" or self.core.session is None:
            return False
        self._begin(session, mode, None, load_s)
        return True

    async def begin(self, version: str, mode: Mode, fraction: float | None = None) -> Rollout:
        """Roll out ``version`` (kept, the candidate already, or loaded from the registry).

        Raises :class:`NotReady` with no live model, ValueError when ``version`` is live,
        and whatever loading raises (the registry's error, ``ModelRejected``, ...).
        """
        live = self.core.session
        if live is None:
            raise NotReady("no model loaded yet")
        if version == live.version:
            raise ValueError(f"{version} is the live version")
        r, kept = self.current, self.core.kept.get(version)
        if r is not None and r.version == version:
            session, load_s = r.session, r.load_s
        elif kept is not None:
            session, load_s = kept.session, 0.0
        else:
            t0 = self.core._clock()
            session = await asyncio.to_thread(self.core._build, version, None)
            load_s = self.core._clock() - t0
        return self._begin(session, mode, fraction, load_s)

    def _begin(
        self, session: StudentSession, mode: Mode, fraction: float | None, load_s: float
    ) -> Rollout:
        live = self.core.session
        assert live is not None
        if self.current is not None:
            self._end(self.current, "superseded", f"superseded by {session.version}")
        if fraction is None:
            s = self.settings
            fraction = s.canary_fraction if mode == "canary" else s.shadow_fraction
        r = Rollout(
            session.version,
            mode,
            fraction,
            session,
            live.version,
            load_s,
            self.settings.online_window,
        )
        self.current = r
        self._follow_labels()
        log.info("%s of %s next to %s (fraction %.3f)", mode, r.version, r.live, fraction)
        self.hooks.on_rollout(r.version, mode, "started")
        return r

    def promote(self, reason: str = "manual") -> tuple[str, str]:
        """Serve the candidate; returns ``(from, to)``. LookupError without a rollout."""
        r = self._running()
        came_from = self.core.version
        assert came_from is not None
        pin = self.core.pin
        self._end(r, "promoted", reason)
        self.core.swap_in(r.session, r.load_s)
        if version_number(r.version) < version_number(came_from):
            # An older version must not be replaced by the next registry poll.
            ceiling = came_from if pin is None else max(came_from, pin.above, key=version_number)
            self.core.pin = Pin(r.version, ceiling, f"promoted: {reason}")
        return came_from, r.version

    def abort(self, reason: str = "manual") -> str:
        """Drop the candidate (the live model keeps serving); LookupError without a rollout."""
        r = self._running()
        self._end(r, "aborted", reason)
        live, pin = self.core.version, self.core.pin
        if live is not None and version_number(r.version) > version_number(live):
            ceiling = r.version if pin is None else max(r.version, pin.above, key=version_number)
            self.core.pin = Pin(live, ceiling, f"rollout aborted: {reason}")
        return r.version

    def _running(self) -> Rollout:
        r = self.current
        if r is None:
            raise LookupError("no rollout is running")
        return r

    def _end(self, r: Rollout, state: str, reason: str) -> None:
        r.state, r.reason, r.ended_at = state, reason, utc_now()
        if self.current is r:
            self.current = None
        self.history.append(r)
        log.warning("%s of %s %s: %s", r.mode, r.version, state, reason)
        self.hooks.on_rollout(r.version, r.mode, state)

    # -- requests ----------------------------------------------------------------------
    def route(self, live: Batcher, conversation_id: str | None) -> Batcher:
        """The batcher that answers this request: the candidate's for a canary share."""
        r = self.current
        if r is None or r.mode != "canary":
            return live
        return self.batcher if self._draw(r, conversation_id) < r.fraction else live

    def _draw(self, r: Rollout, conversation_id: str | None) -> float:
        if conversation_id is None:
            return self._rng.random()
        digest = hashlib.blake2b(f"{r.version}\0{conversation_id}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big") / 2.0**64

    def answered(
        self, request_id: str, session: Predictor, intent: str, dialogue: Sequence[Turn]
    ) -> None:
        """Count an answer; queue a copy for the other model where it should run too."""
        r = self.current
        if r is None:
            return
        version = session.version
        r.of(version).returned += 1
        self._remember(request_id, r, version, intent)
        other: Predictor | None = None
        if r.mode == "canary" and version == r.version:
            other = self.core.session
        elif r.mode == "shadow" and version != r.version:
            sampled = r.fraction >= 1.0 or self._rng.random() < r.fraction
            other = r.session if sampled else None
        self.hooks.on_rollout_answer(version, mirrored=False, agreed=None)
        if other is None or other.version == version:
            return
        try:
            self._copies.put_nowait(_Copy(r, request_id, dialogue, other, intent))
        except asyncio.QueueFull:
            r.dropped += 1
            self.hooks.on_mirror_dropped("queue-full")

    def _remember(self, request_id: str, r: Rollout, version: str, intent: str) -> None:
        entry = self._answers.get(request_id)
        if entry is None:
            self._answers[request_id] = (r, {version: intent})
            while len(self._answers) > self.settings.online_remember:
                self._answers.popitem(last=False)
        else:
            entry[1][version] = intent

    async def _mirror(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.settings.batch_max_size
        while True:
            copies = [await self._copies.get()]
            while len(copies) < limit and not self._copies.empty():
                copies.append(self._copies.get_nowait())
            groups: dict[int, list[_Copy]] = {}
            for c in copies:
                if c.rollout.running:  # a finished rollout's copies are not worth a run
                    groups.setdefault(id(c.session), []).append(c)
            for group in groups.values():
                await self._behind_requests()
                session = group[0].session
                dialogues = [c.dialogue for c in group]
                try:
                    probs = await loop.run_in_executor(self._executor, session.predict, dialogues)
                except Exception as exc:  # a bad candidate must not stop the mirror
                    log.warning("mirror run on %s failed: %s", session.version, exc)
                    for c in group:
                        c.rollout.dropped += 1
                        self.hooks.on_mirror_dropped(f"error: {type(exc).__name__}")
                    continue
                for c, row in zip(group, probs, strict=True):
                    self._compare(c, session.labels[int(np.argmax(row))])

    async def _behind_requests(self) -> None:
        """Wait while requests queue for a batch: copies get only the time answers leave."""
        while True:
            if not (self.core.batcher.queued or self.batcher.queued):
                return
            await asyncio.sleep(0.001)  # batchers signal arrivals, not an empty queue

    def _compare(self, c: _Copy, intent: str) -> None:
        r, version = c.rollout, c.session.version
        agreed = intent == c.answered
        r.of(version).mirrored += 1
        r.compared += 1
        r.agreed += agreed
        entry = self._answers.get(c.request_id)
        if entry is not None:  # its label may already have come
            entry[1][version] = intent
        self.hooks.on_rollout_answer(version, mirrored=True, agreed=agreed)

    # -- hard labels -------------------------------------------------------------------
    def _follow_labels(self) -> None:
        bus = self.core.bus
        if self._labels is not None or not self._tasks:
            return
        if bus is None:
            self.positioned.set()
            return
        topic = self.core.topics.hard_labels
        self._labels = asyncio.create_task(
            tail_topic(bus, topic, self._on_record, self.positioned), name="sd-rollout-labels"
        )

    async def _on_record(self, record: Record) -> None:
        core = self.core
        label = await decode_or_park(
            HardLabel, record, self.hooks, core.producer, core.topics.dead_letters
        )
        if label is not None:
            self.observe(label)

    def observe(self, label: HardLabel) -> bool:
        """Judge every answer (returned or mirrored) to a rollout request; True if one was ours."""
        entry = self._answers.pop(label.request_id, None)
        if entry is None:
            return False
        r, answers = entry
        for version, intent in answers.items():
            acc = r.of(version).accuracy
            acc.add(intent == label.intent)
            self.hooks.on_rollout_accuracy(version, acc.accuracy or 0.0, acc.labels)
        if r is self.current:
            self.check()
        return True

    def check(self) -> str | None:
        """Promote or abort the candidate once both versions have enough labels."""
        s, r, live = self.settings, self.current, self.core.version
        if not s.rollout_auto or r is None or live is None:
            return None
        mine, theirs = r.figures.get(r.version), r.figures.get(live)
        if mine is None or theirs is None:
            return None
        if min(mine.accuracy.labels, theirs.accuracy.labels) < s.rollout_min_labels:
            return None
        a, b = mine.accuracy.accuracy or 0.0, theirs.accuracy.accuracy or 0.0
        verdict = (
            f"{r.version} {a:.3f} over {len(mine.accuracy.recent)} labels vs "
            f"{live} {b:.3f} over {len(theirs.accuracy.recent)}"
        )
        if b - a <= s.rollback_margin + _EPS:
            self.promote(f"accuracy_ok: {verdict}")
            return "promoted"
        self.abort(f"accuracy_drop: {verdict}")
        return "aborted"
