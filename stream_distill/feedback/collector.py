"""Feedback → ``HardLabel`` events, authenticated, validated, de-duplicated, acknowledged.

A post is answered 202 only once the broker acknowledged the label (acks=all),
so a client that saw 202 may forget it. Ids of accepted feedback are remembered
in a bounded LRU: a retried post with the same ``feedback_id`` is answered 202
with ``"duplicate": true`` and writes nothing more. (Across replicas or restarts
duplicates can still reach the log; the trainer de-duplicates by ``feedback_id``.)

Policy, checked before anything is written (nothing is written when it refuses):

* **Unknown request ids.** Inside serve, every ``/v1/classify`` answer is recorded
  in :class:`~stream_distill.feedback.known.KnownRequests` for
  ``serve.feedback_join_window_s``. Feedback on a request id not in it is refused
  with 404 under ``serve.feedback_unknown_request = "reject"`` (the default: a
  typo or a forged id never becomes a training label). Behind a load balancer
  with several replicas the answer may have come from another replica, and a
  restart forgets: there use ``"accept"``, and the trainer's join drops labels
  whose request never shows up on the requests topic. A collector built without
  ``known`` (the standalone ``feedback`` role) cannot tell and skips this check.
* **Unknown intents.** The intent must be one of the labels of the model that
  answered the request (or, for a request not known here, of the model serving
  now). Any other intent is a *new* intent: accepted only from principals in
  ``serve.feedback_intent_admins``, otherwise 422. With no label list at all (no
  model loaded yet) intents cannot be checked and are accepted.
* **Rate.** Each principal has a token bucket (``serve.feedback_rate_per_s``,
  ``serve.feedback_burst``); over it, 429 with ``Retry-After``. Only HTTP posts
  are limited (:meth:`FeedbackCollector.admit`); the raw topic is read at the
  consumer's own pace.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from stream_distill.bus.base import Producer, Topics
from stream_distill.bus.codec import encode, headers_for
from stream_distill.config import ServeSettings
from stream_distill.errors import FeedbackUnavailable, RateLimited, UnknownIntent, UnknownRequest
from stream_distill.events import HardLabel, HardLabelSource, new_id
from stream_distill.feedback.known import KnownRequests
from stream_distill.metrics.hooks import Hooks

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


class FeedbackIn(BaseModel):
    """The body of ``POST /v1/feedback``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    feedback_id: str | None = Field(
        default=None, min_length=1, max_length=128, description="Client id for retries."
    )
    request_id: str = Field(min_length=1, max_length=128, description="Request being labelled.")
    intent: str = Field(min_length=1, max_length=100, description="The true intent.")
    source: HardLabelSource = Field(default="user_confirmed", description="Who confirmed it.")


@dataclass(frozen=True, slots=True)
class FeedbackAccepted:
    feedback_id: str
    duplicate: bool = False


class FeedbackCollector:
    """Turns authenticated feedback into acknowledged ``HardLabel`` records.

    Authentication: ``Authorization: Bearer <token>`` checked in constant time
    against every token of ``settings.feedback_tokens`` (principal → token); the
    matching principal is written into the label. When ``feedback_tokens`` is
    empty, feedback is open and attributed to ``"anonymous"``: for local
    development only, never expose such a replica.
    """

    def __init__(
        self,
        producer: Producer,
        topics: Topics,
        settings: ServeSettings,
        hooks: Hooks | None = None,
        *,
        dedup_capacity: int = 100_000,
        send_timeout_s: float = 10.0,
        known: KnownRequests | None = None,
        labels: Callable[[], Sequence[str] | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.producer = producer
        self.known = known
        self._current_labels = labels or (lambda: None)
        self._clock = clock
        self._reject_unknown = settings.feedback_unknown_request == "reject"
        self._admins = frozenset(settings.feedback_intent_admins)
        self._rate = settings.feedback_rate_per_s
        self._burst = float(settings.feedback_burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, at)
        self.topics = topics
        self.hooks = hooks or Hooks()
        self.send_timeout_s = send_timeout_s
        self._tokens = [
            (principal, token.get_secret_value().encode())
            for principal, token in settings.feedback_tokens.items()
        ]
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._capacity = dedup_capacity
        self._inflight: dict[str, asyncio.Future[FeedbackAccepted]] = {}

    @property
    def open(self) -> bool:
        """True when no tokens are configured (local development)."""
        return not self._tokens

    def authenticate(self, authorization: str | None) -> str | None:
        """The principal whose token is presented, or None."""
        if self.open:
            return ANONYMOUS
        scheme, _, presented = (authorization or "").partition(" ")
        given = presented.strip().encode()
        found: str | None = None
        for principal, token in self._tokens:  # no early exit: time does not tell which matched
            if hmac.compare_digest(given, token) and scheme.lower() == "bearer" and given:
                found = principal
        if found is None:
            self.hooks.on_feedback("unauthorized")
        return found

    def admit(self, principal: str) -> None:
        """Take one token from ``principal``'s bucket or raise :class:`RateLimited`."""
        now = self._clock()
        tokens, at = self._buckets.get(principal, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._buckets[principal] = (tokens, now)
            self.hooks.on_feedback("rate_limited")
            raise RateLimited(
                f"{principal}: over {self._rate:g} posts/s", (1.0 - tokens) / self._rate
            )
        self._buckets[principal] = (tokens - 1.0, now)

    def validate(self, principal: str, body: FeedbackIn) -> None:
        """Raise :class:`UnknownRequest` or :class:`UnknownIntent` per the module's policy."""
        served = self.known.get(body.request_id) if self.known is not None else None
        if served is None and self.known is not None and self._reject_unknown:
            self.hooks.on_feedback("unknown_request")
            raise UnknownRequest(
                f"request {body.request_id!r} was not answered here within the join window"
            )
        labels = served.labels if served is not None else self._current_labels()
        if labels is None or body.intent in labels:
            return
        if principal in self._admins:
            log.info("new intent %r added by %s", body.intent, principal)
            self.hooks.on_feedback("new_intent")
            return
        self.hooks.on_feedback("unknown_intent")
        raise UnknownIntent(
            f"intent {body.intent!r} is not one of the model's labels and {principal!r}"
            " may not add intents"
        )

    async def submit(self, principal: str, body: FeedbackIn) -> FeedbackAccepted:
        """Validate, publish the label and wait for the broker.

        Raises :class:`UnknownRequest`, :class:`UnknownIntent` (nothing written) or
        :class:`FeedbackUnavailable`. A known ``feedback_id`` is a duplicate before
        anything else: a retry stays 202 even once its request left the window.
        """
        feedback_id = body.feedback_id or new_id()
        if feedback_id in self._seen:
            self._seen.move_to_end(feedback_id)
            self.hooks.on_feedback("duplicate")
            return FeedbackAccepted(feedback_id, duplicate=True)
        if feedback_id not in self._inflight:
            self.validate(principal, body)
        pending = self._inflight.get(feedback_id)
        if pending is not None:  # the same id is being written right now: share its outcome
            first = await asyncio.shield(pending)
            self.hooks.on_feedback("duplicate")
            return FeedbackAccepted(first.feedback_id, duplicate=True)
        future: asyncio.Future[FeedbackAccepted] = asyncio.get_running_loop().create_future()
        self._inflight[feedback_id] = future
        try:
            label = HardLabel(
                feedback_id=feedback_id,
                request_id=body.request_id,
                intent=body.intent,
                source=body.source,
                principal=principal,
            )
            await self._publish(label)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # mark it retrieved: only waiters, if any, act on it
            raise
        finally:
            del self._inflight[feedback_id]
        self._remember(feedback_id)
        accepted = FeedbackAccepted(feedback_id)
        future.set_result(accepted)
        self.hooks.on_feedback("accepted")
        return accepted

    async def _publish(self, label: HardLabel) -> None:
        try:
            await asyncio.wait_for(
                self.producer.send(
                    self.topics.hard_labels,
                    encode(label),
                    key=label.request_id.encode(),
                    headers=headers_for(label),
                ),
                self.send_timeout_s,
            )
        except Exception as exc:
            log.warning("feedback %s not acknowledged: %s", label.feedback_id, exc)
            self.hooks.on_feedback("unavailable")
            raise FeedbackUnavailable(f"broker did not acknowledge: {exc}") from exc

    def _remember(self, feedback_id: str) -> None:
        self._seen[feedback_id] = None
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
