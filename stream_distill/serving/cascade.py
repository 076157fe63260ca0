"""Deadline-aware cascade: an unsure student asks the teacher, if the budget allows.

When a request opted in (its ``"cascade"`` field, else ``serve.cascade_default``) and
the student's top probability is below ``serve.cascade_threshold``, serve asks a
``teacher-serve`` (``serve.cascade_url``) over HTTP, but only when the budget left
covers the teacher's expected latency: an EWMA of observed calls, never below
``serve.cascade_min_budget_ms``. The call's timeout is the budget left, so the answer
is never later than the request's deadline. A teacher that fails, sheds or is late
costs nothing but the time left: the student's answer goes out, never an error.

The teacher's answer is returned (``model_version`` ``"teacher:<version>"``,
``answered_by`` ``"teacher"``) and published as a :class:`SoftLabel` (teacher id
``"cascade"``) in the background, so the trainer learns from it. The request event
still describes the student's own answer: it is what the student is judged on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import httpx
from pydantic import BaseModel, ConfigDict

from stream_distill.bus.base import Producer, Topics
from stream_distill.bus.codec import encode, headers_for
from stream_distill.config import ServeSettings
from stream_distill.events import SoftLabel, TopIntent, Turn, label_set_version
from stream_distill.metrics.hooks import Hooks
from stream_distill.serving.answer import Ranked

if TYPE_CHECKING:
    from stream_distill.serving.answer import ClassifyResult

log = logging.getLogger(__name__)

TEACHER_ID = "cascade"
"""``teacher_id`` of the soft labels the cascade publishes."""

EWMA_ALPHA = 0.2
"""Weight of the newest call in the teacher-latency estimate."""

MAX_PENDING_LABELS = 1000
"""Soft labels on their way to the bus at most; beyond, they are dropped and counted."""

LABELS_TIMEOUT_S = 5.0

SLACK_S = 0.003
"""Budget kept back from a teacher call, to return the student's answer still in time."""


class _TeacherAnswer(BaseModel):
    """The part of a teacher-serve ``/v1/classify`` answer the cascade reads."""

    model_config = ConfigDict(extra="ignore")

    intent: str
    confidence: float
    top: tuple[TopIntent, ...]
    model_version: str


class Cascade:
    """Student answer in, final answer out (:meth:`consult`); ``start()``/``aclose()``."""

    def __init__(
        self,
        settings: ServeSettings,
        hooks: Hooks,
        *,
        producer: Producer | None,
        topics: Topics,
        clock: Callable[[], float],
    ) -> None:
        if not settings.cascade_url:
            raise ValueError("the cascade needs serve.cascade_url")
        self.url = settings.cascade_url
        self.default = settings.cascade_default
        self.threshold = settings.cascade_threshold
        self.min_budget_s = settings.cascade_min_budget_ms / 1e3
        self.top_k = settings.top_k
        self.hooks = hooks
        self.producer = producer
        self.topics = topics
        self._clock = clock
        self.estimate_s = 0.0
        """EWMA of teacher call latency in seconds (0 until the first call ended)."""
        self._client: httpx.AsyncClient | None = None
        self._labels: dict[str, tuple[str, ...]] = {}  # teacher version -> its label order
        self._pending: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._client is None:
            # No retries, no redirects: a second try never fits in what is left of a budget.
            self._client = httpx.AsyncClient(base_url=self.url, follow_redirects=False)

    async def aclose(self, drain_timeout_s: float = 2.0) -> None:
        """Give soft labels in flight ``drain_timeout_s`` to reach the bus, then stop."""
        if self._pending:
            _, late = await asyncio.wait(self._pending, timeout=drain_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- requests ----------------------------------------------------------------------
    def wanted(self, asked: bool | None) -> bool:
        """Whether a request that said ``asked`` (None: nothing) takes part."""
        return self.default if asked is None else asked

    def budget_needed_s(self) -> float:
        """Least time left for which the teacher is asked."""
        return max(self.min_budget_s, self.estimate_s)

    async def consult(
        self,
        student: ClassifyResult,
        turns: Sequence[Turn],
        conversation_id: str,
        *,
        started: float,
        deadline: float,
    ) -> ClassifyResult:
        """The teacher's answer when it is needed and arrives in time; else ``student``.

        ``started`` and ``deadline`` are the request's start and deadline on the clock.
        """
        if student.confidence >= self.threshold:
            self.hooks.on_cascade("confident", None)
            return dataclasses.replace(student, answered_by="student")
        left = deadline - self._clock() - SLACK_S
        if left < self.budget_needed_s():
            self.hooks.on_cascade("skipped_budget", None)
            return dataclasses.replace(student, answered_by="student")
        t0 = self._clock()
        try:
            answer = await asyncio.wait_for(self._ask(turns, left), left)
        except (TimeoutError, httpx.TimeoutException):
            took = self._clock() - t0
            self._observe(took)  # a lower bound, but it keeps a slow teacher from being asked
            return self._fallback(student, "timeout", took, started, deadline)
        except Exception as exc:  # refused, shed (503), malformed...: the student answers
            log.debug("cascade teacher failed: %r", exc)
            return self._fallback(student, "teacher_error", self._clock() - t0, started, deadline)
        took = self._clock() - t0
        self._observe(took)
        self.hooks.on_cascade("answered", took * 1e3)
        self._publish_later(student.request_id, conversation_id, answer)
        now = self._clock()
        return dataclasses.replace(
            student,
            intent=answer.intent,
            confidence=answer.confidence,
            top=tuple(Ranked(t.intent, t.p) for t in answer.top[: self.top_k]),
            model_version=f"teacher:{answer.model_version}",
            latency_ms=(now - started) * 1e3,
            deadline_missed=now > deadline,
            answered_by="teacher",
        )

    async def _ask(self, turns: Sequence[Turn], left_s: float) -> _TeacherAnswer:
        if self._client is None:
            await self.start()
        assert self._client is not None
        body = {
            "turns": [{"role": t.role, "text": t.text} for t in turns],
            # The teacher sheds at once what it cannot answer in time, instead of queueing it.
            "deadline_ms": max(1.0, round(left_s * 1e3, 3)),
        }
        r = await self._client.post("/v1/classify", json=body, timeout=left_s)
        r.raise_for_status()
        return _TeacherAnswer.model_validate_json(r.content)

    def _fallback(
        self, student: ClassifyResult, outcome: str, took_s: float, started: float, deadline: float
    ) -> ClassifyResult:
        self.hooks.on_cascade(outcome, took_s * 1e3)
        now = self._clock()
        return dataclasses.replace(
            student,
            latency_ms=(now - started) * 1e3,
            deadline_missed=now > deadline,
            answered_by="student",
        )

    def _observe(self, took_s: float) -> None:
        first = self.estimate_s == 0.0
        self.estimate_s = (
            took_s if first else EWMA_ALPHA * took_s + (1 - EWMA_ALPHA) * self.estimate_s
        )

    # -- soft labels -------------------------------------------------------------------
    def _publish_later(self, request_id: str, conversation_id: str, answer: _TeacherAnswer) -> None:
        if self.producer is None:
            return
        if len(self._pending) >= MAX_PENDING_LABELS:
            self.hooks.on_event_dropped("cascade-queue-full")
            return
        task = asyncio.create_task(self._publish(request_id, conversation_id, answer))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, request_id: str, conversation_id: str, answer: _TeacherAnswer) -> None:
        assert self.producer is not None
        try:
            labels = await self._teacher_labels(answer.model_version)
            label = soft_label(request_id, answer.model_version, labels, answer.top)
            await self.producer.send(
                self.topics.soft_labels,
                encode(label),
                key=conversation_id.encode(),
                headers=headers_for(label),
            )
        except Exception as exc:  # a lost label costs the trainer one example, nothing more
            log.warning("cascade soft label for %s dropped: %s", request_id, exc)
            self.hooks.on_event_dropped("cascade-soft-label")

    async def _teacher_labels(self, version: str) -> tuple[str, ...]:
        """The teacher's label list in logit order (asked once per teacher version)."""
        known = self._labels.get(version)
        if known is not None:
            return known
        assert self._client is not None
        r = await self._client.get("/v1/models", timeout=LABELS_TIMEOUT_S)
        r.raise_for_status()
        serving = r.json().get("serving") or {}
        if serving.get("version") != version:
            raise ValueError(f"teacher now serves {serving.get('version')!r}, not {version!r}")
        labels = tuple(str(x) for x in serving.get("labels") or ())
        if not labels:
            raise ValueError("teacher lists no labels")
        self._labels[version] = labels
        return labels


def soft_label(
    request_id: str, teacher_version: str, labels: tuple[str, ...], top: Sequence[TopIntent]
) -> SoftLabel:
    """A soft label from a teacher's ranked answer: logits are log-probabilities.

    Labels missing from ``top`` (a teacher answering top-k only) share what is left of
    the probability mass evenly; teacher-serve lists every label, so nothing is missing.
    """
    given = {t.intent: t.p for t in top}
    unknown = set(given) - set(labels)
    if unknown:
        raise ValueError(f"teacher answered unknown labels {sorted(unknown)}")
    missing = [label for label in labels if label not in given]
    rest = max(0.0, 1.0 - sum(given.values())) / len(missing) if missing else 0.0
    probs = [given.get(label, rest) for label in labels]
    logits = tuple(round(math.log(max(p, 1e-9)), 6) for p in probs)
    return SoftLabel(
        request_id=request_id,
        teacher_id=TEACHER_ID,
        teacher_version=teacher_version,
        labels=labels,
        label_set_version=label_set_version(labels),
        logits=logits,
    )
