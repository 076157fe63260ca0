"""The serving core: one current model swapped atomically, answers, request events.

``ServingCore._session`` is the only mutable state a request touches: requests
are answered in micro-batches (:mod:`.batcher`), each of which reads it once,
so every answer names exactly the version that computed it, while a swap simply
rebinds the attribute (the old session is freed when its last batch drops it).
Candidates are loaded, sha256-checked and verified off the event loop; a failed
one never replaces the serving model.

The last ``keep_versions`` verified sessions stay in memory (:mod:`.versions`), so a
rollback, by an operator or by :mod:`.online` when a new version's online accuracy
drops, is the same reference swap. A rollback pins serve: the watcher skips every
version up to the one rolled back from, until a newer one appears or ``unpin()``.

Request events leave through :mod:`.publisher`, off the request path: a full queue
or a failing bus drops and counts them, never an HTTP error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from stream_distill.bus.base import Bus, Producer, Topics
from stream_distill.config import ServeSettings
from stream_distill.errors import (
    DeadlineExceeded,
    IntegrityError,
    ModelRejected,
    NotReady,
    Overloaded,
    StreamDistillError,
)
from stream_distill.events import Turn, utc_now
from stream_distill.metrics.hooks import Hooks
from stream_distill.registry.base import ModelStore
from stream_distill.serving.answer import ClassifyResult, summarise
from stream_distill.serving.batcher import Batcher
from stream_distill.serving.canary import RolloutController
from stream_distill.serving.cascade import Cascade
from stream_distill.serving.online import OnlineAccuracy
from stream_distill.serving.predictor import Predictor
from stream_distill.serving.publisher import EventPublisher
from stream_distill.serving.redact import Redactor, redact
from stream_distill.serving.session import StudentSession, answer_left, in_background
from stream_distill.serving.versions import KeptVersions, Pin
from stream_distill.serving.watcher import ModelWatcher, version_number

log = logging.getLogger(__name__)

KEEP_HISTORY = 100
"""Swapped-in versions remembered for ``/v1/models``."""

__all__ = ["ClassifyResult", "LoadedVersion", "Pin", "ServingCore", "redact"]


@dataclass(frozen=True, slots=True)
class LoadedVersion:
    """A version that passed sha256 checks and verification and was swapped in."""

    version: str
    sha256: str
    labels: tuple[str, ...]
    load_s: float
    loaded_at: datetime = field(default_factory=utc_now)


class ServingCore:
    """Current model, hot swaps, classify, request events. ``start()``/``aclose()``.

    ``bus`` (optional) feeds the model watcher; ``producer`` (optional, owned by the
    caller) receives request events and dead letters on ``topics`` (default: the bus's).
    Without a producer no request events are written.
    """

    def __init__(
        self,
        registry: ModelStore,
        settings: ServeSettings,
        hooks: Hooks | None = None,
        *,
        bus: Bus | None = None,
        producer: Producer | None = None,
        topics: Topics | None = None,
        poll_interval_s: float = 5.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.bus = bus
        self.producer = producer
        self.topics = topics or (bus.topics if bus is not None else Topics())
        self._clock = clock
        self._session: Predictor | None = None
        self._draining = False
        self.redactor = Redactor.from_settings(settings)
        self.batcher = Batcher(lambda: self._session, settings, self.hooks, clock)
        self.verified: deque[LoadedVersion] = deque(maxlen=KEEP_HISTORY)
        self.rejected: dict[str, str] = {}
        self._load_lock = asyncio.Lock()
        self.events = (
            EventPublisher(
                producer, self.topics.requests, self.hooks, self.redactor, settings.event_queue_size
            )
            if producer is not None
            else None
        )
        self._loaded = asyncio.Event()
        # (request_id, model_version, labels) of every answer: feedback checks against it
        self.on_answer: Callable[[str, str, tuple[str, ...]], None] | None = None
        self.kept = KeptVersions(settings.keep_versions)
        self.pin: Pin | None = None
        self.online = OnlineAccuracy(
            settings,
            self.hooks,
            current=lambda: self.version,
            predecessor=self.kept.predecessor,
            rollback=lambda to, reason: self.rollback(to, reason)[0] != to,
            bus=bus,
            producer=producer,
            topics=self.topics,
        )
        self.watcher = ModelWatcher(
            registry,
            self.load_version,
            lambda: self.version,
            lambda v: v in self.rejected or self.held_back(v),
            self.hooks,
            bus=bus,
            producer=producer,
            topics=self.topics,
            poll_interval_s=poll_interval_s,
        )
        self.cascade = (
            Cascade(settings, self.hooks, producer=producer, topics=self.topics, clock=clock)
            if settings.cascade_enabled
            else None
        )
        self.rollout = RolloutController(self)  # canary/shadow candidates (serve.rollout_mode)

    # -- state -------------------------------------------------------------------------
    @property
    def session(self) -> Predictor | None:
        return self._session

    @property
    def ready(self) -> bool:
        return self._session is not None

    @property
    def draining(self) -> bool:
        """True once shutdown began: still answering, but no longer ready for new traffic."""
        return self._draining

    def begin_drain(self) -> None:
        self._draining = True

    @property
    def version(self) -> str | None:
        s = self._session
        return s.version if s else None

    async def wait_ready(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), timeout_s)
        return self.ready

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start publishing request events and watching for models (loads run in background)."""
        if self.events is not None:
            self.events.start()
        self.batcher.start()
        self.rollout.start()
        if self.cascade is not None:
            await self.cascade.start()
        await self.online.start()
        await self.watcher.start()

    async def aclose(self, drain_timeout_s: float = 5.0) -> None:
        """Stop watching, give queued events ``drain_timeout_s`` to reach the bus, stop."""
        await self.watcher.aclose()
        await self.online.aclose()
        await self.rollout.aclose()
        await self.batcher.aclose()
        if self.cascade is not None:
            await self.cascade.aclose()
        if self.events is not None:
            await self.events.aclose(drain_timeout_s)

    async def __aenter__(self) -> ServingCore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- models ------------------------------------------------------------------------
    async def load_version(self, version: str, expected_sha256: str | None = None) -> bool:
        """Load, verify and swap in ``version``; False (old model keeps serving) if rejected."""
        async with self._load_lock:
            current = self._session
            if current is not None and current.version == version:
                return True
            if self.rollout.holds(version):
                return True
            if self.held_back(version):  # announced again after a rollback from it
                return False
            t0 = self._clock()
            try:
                session = await in_background(self._build, version, expected_sha256)
            except Exception as exc:  # no candidate may take the watcher down
                reason = _reason(exc)
                self.rejected[version] = reason
                log.warning(
                    "model %s rejected, %s keeps serving: %s", version, self.version, reason
                )
                self.hooks.on_swap(version, self._clock() - t0, ok=False, reason=reason)
                return False
            if self.held_back(version):  # a rollback landed while it was loading
                return False
            self.rejected.pop(version, None)
            if not self.rollout.adopt(session, self._clock() - t0):  # else a candidate
                self.swap_in(session, self._clock() - t0)
            return True

    def swap_in(self, session: StudentSession, took_s: float) -> None:
        """Serve the verified ``session`` now (kept for rollbacks; ends any pin)."""
        version = session.version
        self.kept.add(session, self.version, serving=version)
        self.pin = None  # a version newer than the pinned ceiling ends the pin
        self._session = session
        self.verified.append(LoadedVersion(version, session.sha256, session.labels, took_s))
        log.info("serving model %s (sha256 %s, %.0f ms)", version, session.sha256, took_s * 1e3)
        self.hooks.on_swap(version, took_s, ok=True)
        self.hooks.on_model_serving(version)
        self._loaded.set()

    def install(self, predictor: Predictor) -> None:
        """Serve ``predictor``, a model that does not come from the registry (the teacher)."""
        self._session = predictor
        self.verified.append(
            LoadedVersion(predictor.version, predictor.sha256, predictor.labels, 0.0)
        )
        self.hooks.on_model_serving(predictor.version)
        self._loaded.set()

    def held_back(self, version: str) -> bool:
        """True while a rollback pin keeps the watcher from ``version``."""
        pin = self.pin
        return pin is not None and version_number(version) <= version_number(pin.above)

    def rollback(self, to_version: str | None = None, reason: str = "manual") -> tuple[str, str]:
        """Serve the kept ``to_version`` (default: the serving one's predecessor) and pin it.

        Returns ``(from, to)``. Raises :class:`NotReady` with no model, LookupError when
        the version is not kept (or there is no predecessor to return to).
        """
        current = self._session
        if current is None:
            raise NotReady("no model loaded yet")
        target = to_version or self.kept.predecessor(current.version)
        if target is None:
            raise LookupError(f"{current.version} has no kept predecessor")
        kept = self.kept.get(target)
        if kept is None:
            raise LookupError(f"{target} is not kept (kept: {[k.version for k in self.kept]})")
        if target == current.version:
            return target, target
        ceiling = (current.version,) if self.pin is None else (current.version, self.pin.above)
        self.pin = Pin(target, max(ceiling, key=version_number), reason)
        self._session = s = kept.session
        self.verified.append(LoadedVersion(s.version, s.sha256, s.labels, 0.0))
        log.warning("rolled back from %s to %s: %s", current.version, target, reason)
        self.hooks.on_rollback(current.version, target, reason)
        self.hooks.on_model_serving(target)
        return current.version, target

    def unpin(self) -> Pin | None:
        """Let the watcher move forward again (to the newest loadable version)."""
        pin, self.pin = self.pin, None
        return pin

    def _build(self, version: str, expected_sha256: str | None) -> StudentSession:
        mv = self.registry.load(version)  # verifies every file against the manifest
        if expected_sha256 is not None and mv.sha256 != expected_sha256:
            raise IntegrityError(f"{version}: announced sha256 {expected_sha256} != {mv.sha256}")
        session = StudentSession.from_version(mv, self.settings)
        session.verify()
        return session

    # -- requests ----------------------------------------------------------------------
    async def classify(
        self,
        turns: Sequence[Turn],
        conversation_id: str | None = None,
        *,
        deadline_ms: float | None = None,
        cascade: bool | None = None,
    ) -> ClassifyResult:
        """Answer one dialogue (current user turn last) within ``deadline_ms``.

        ``cascade`` opts in or out of asking the teacher (:mod:`.cascade`), if enabled.

        Raises :class:`NotReady` (no model), :class:`Overloaded` (queue full) or
        :class:`DeadlineExceeded` (the budget cannot be met, ``reject`` policy).
        """
        t0 = self._clock()
        if self._session is None:
            self.hooks.on_request("shed", 0.0, None)
            raise NotReady("no model loaded yet")
        budget = deadline_ms or self.settings.deadline_ms
        try:
            batcher = self.rollout.route(self.batcher, conversation_id)
            answer = await batcher.run(turns, t0 + budget / 1e3)
        except (DeadlineExceeded, Overloaded, NotReady) as exc:
            outcome = "deadline" if isinstance(exc, DeadlineExceeded) else "shed"
            self.hooks.on_request(outcome, (self._clock() - t0) * 1e3, self.version)
            raise
        except Exception:
            self.hooks.on_request("error", (self._clock() - t0) * 1e3, self.version)
            raise
        session = answer.session
        latency_ms = (self._clock() - t0) * 1e3
        result = summarise(answer.probs, session, self.settings.top_k, latency_ms, budget)
        answered = result  # the teacher's, when the cascade asked it; below, the student's
        if self.cascade is not None and self.cascade.wanted(cascade):
            cid = conversation_id or result.request_id
            answered = await self.cascade.consult(
                result, turns, cid, started=t0, deadline=t0 + budget / 1e3
            )
        # The bookkeeping waits until the answer has left: the caller's task sends it
        # without suspending, so the loop runs this right after, before any new input.
        asyncio.get_running_loop().call_soon(
            self._answered, result, answered, session, turns, conversation_id
        )
        return answered

    def _answered(
        self,
        result: ClassifyResult,
        answered: ClassifyResult,
        session: Predictor,
        turns: Sequence[Turn],
        conversation_id: str | None,
    ) -> None:
        """Metrics, online accuracy, canary/shadow, known ids and the request event."""
        answer_left()
        outcome = "deadline" if answered.deadline_missed else "ok"
        self.hooks.on_request(outcome, answered.latency_ms, session.version)
        self.online.remember(result.request_id, session.version, result.intent)
        self.rollout.answered(result.request_id, session, result.intent, turns)
        if self.on_answer is not None:
            self.on_answer(result.request_id, session.version, session.labels)
        if self.events is not None:  # redaction and the event are built later still
            self.events.enqueue(result, turns, conversation_id or result.request_id)


def _reason(exc: BaseException) -> str:
    """``"<kind>: <detail>"``; the kind becomes a metric label."""
    if isinstance(exc, IntegrityError):
        kind = "integrity"
    elif isinstance(exc, ModelRejected):
        kind = "verify"
    elif isinstance(exc, StreamDistillError):
        kind = "registry"
    else:
        kind = "error"
    return f"{kind}: {exc}"
