"""Feedback → ``HardLabel`` events, authenticated, validated, de-duplicated, acknowledged.

A post is answered 202 only once the broker acknowledged the label (acks=all),
so a client that saw 202 may forget it. Ids of accepted feedback are remembered
in a bounded LRU: a retried post with the same ``feedback_id`` is answered 202
with ``"duplicate": true`` and writes nothing more. (Across replicas or restarts
duplicates can still reach the log; the trainer de-duplicates by ``feedback_id``.)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from stream_distill.bus.base import Producer, Topics
from stream_distill.bus.codec import encode, headers_for
from stream_distill.config import ServeSettings
from stream_distill.errors import FeedbackUnavailable
from stream_distill.events import HardLabel, HardLabelSource, new_id
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
    ) -> None:
        self.producer = producer
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

    async def submit(self, principal: str, body: FeedbackIn) -> FeedbackAccepted:
        """Publish the label and wait for the broker; raise :class:`FeedbackUnavailable`."""
        feedback_id = body.feedback_id or new_id()
        if feedback_id in self._seen:
            self._seen.move_to_end(feedback_id)
            self.hooks.on_feedback("duplicate")
            return FeedbackAccepted(feedback_id, duplicate=True)
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
