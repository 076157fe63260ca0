"""Feedback a chatbot writes straight to Kafka: ``feedback-raw`` → ``HardLabel``, at least once.

A record's value is the JSON body of ``POST /v1/feedback`` plus ``"principal"``
(or an ``sd-principal`` header; the field wins). Records go through the same
:class:`~stream_distill.feedback.collector.FeedbackCollector` as HTTP posts, so
the same schema, request-id and intent policy and the same de-duplication apply,
and a label is acknowledged by the broker (acks=all) before its offset is
committed. There is no bearer token here: whoever may write to the raw topic is
trusted to name the principal, so the topic's ACLs are the trust boundary (grant
produce on it to the chatbot's service account only). No rate limit either: the
consumer reads at its own pace.

A record that fails validation goes to the dead-letter topic with the reason in
its ``sd-error`` header (``"<kind>: <detail>"``) and is committed past. A record
without ``feedback_id`` gets one derived from its topic, partition and offset, so
a redelivery after a crash is recognised as a duplicate.

Consumer group ``serve.feedback_group_id`` (default ``sd-feedback``): any number
of serve replicas (with ``serve.feedback_consume_raw``) or standalone
``stream-distill feedback`` processes share the partitions. A replica only knows
the request ids it answered itself, so with several replicas set
``serve.feedback_unknown_request=accept``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from pydantic import ValidationError

from stream_distill.bus.base import Bus, Consumer, Record, TopicPartition, dead_letter
from stream_distill.errors import FeedbackRejected, FeedbackUnavailable, UnknownIntent
from stream_distill.feedback.collector import FeedbackCollector, FeedbackIn
from stream_distill.metrics.hooks import Hooks

log = logging.getLogger(__name__)

GROUP_ID = "sd-feedback"  # the default of serve.feedback_group_id
PRINCIPAL_HEADER = "sd-principal"
POLL_MS = 200  # bounds how late a stop is noticed
RETRY_S = 1.0


class BadFeedback(Exception):
    """A raw record that is not valid feedback; ``kind`` becomes the metric label."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def parse(record: Record) -> tuple[str, FeedbackIn]:
    """The principal and body of a raw record, or :class:`BadFeedback`."""
    try:
        raw = json.loads(record.value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadFeedback("poison", f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BadFeedback("poison", f"expected a JSON object, got {type(raw).__name__}")
    principal = raw.pop("principal", None)
    if principal is None:
        principal = next((v.decode() for k, v in record.headers if k == PRINCIPAL_HEADER), None)
    if not isinstance(principal, str) or not principal.strip():
        raise BadFeedback("invalid", "no principal (field 'principal' or header sd-principal)")
    raw.setdefault("feedback_id", f"raw-{record.topic}-{record.partition}-{record.offset}")
    try:
        return principal.strip(), FeedbackIn.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadFeedback("invalid", f"{where}: {first['msg']}" if where else first["msg"]) from exc


class RawFeedbackConsumer:
    """``topics.feedback_raw`` into ``collector``: ``start()``/``aclose()``, or :meth:`run`."""

    def __init__(
        self,
        bus: Bus,
        collector: FeedbackCollector,
        hooks: Hooks | None = None,
        *,
        group_id: str = GROUP_ID,
    ) -> None:
        self.bus = bus
        self.collector = collector
        self.hooks = hooks or Hooks()
        self.group_id = group_id
        self.accepted = 0
        self.dead_lettered = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        topics = self.bus.topics
        await self.bus.ensure_topics([topics.feedback_raw, topics.hard_labels, topics.dead_letters])
        self._stop.clear()
        self._task = asyncio.create_task(self.run(self._stop), name="sd-feedback-raw")

    async def aclose(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; a record in hand is finished or left uncommitted."""
        consumer = self.bus.consumer([self.bus.topics.feedback_raw], group_id=self.group_id)
        async with consumer:
            while not stop.is_set():
                records = await consumer.getmany(timeout_ms=POLL_MS)
                done: dict[TopicPartition, int] = {}
                for record in records:
                    if not await self._handle(record, stop):
                        break
                    done[record.tp] = record.offset + 1
                await self._commit(consumer, done)

    async def _commit(self, consumer: Consumer, done: dict[TopicPartition, int]) -> None:
        # After a rebalance a partition may be gone: committing it would fail the batch.
        owned = consumer.assignment()
        offsets = {tp: off for tp, off in done.items() if tp in owned}
        if offsets:
            await consumer.commit(offsets)

    async def _handle(self, record: Record, stop: asyncio.Event) -> bool:
        """True once ``record`` is acknowledged or dead-lettered; False if stopped first."""
        try:
            principal, body = parse(record)
        except BadFeedback as exc:
            return await self._park(record, exc.kind, str(exc), stop)
        while True:
            try:
                await self.collector.submit(principal, body)
                self.accepted += 1
                return True
            except FeedbackRejected as exc:
                kind = "unknown_intent" if isinstance(exc, UnknownIntent) else "unknown_request"
                return await self._park(record, kind, f"{kind}: {exc}", stop)
            except FeedbackUnavailable:
                # Not committed, so not lost: wait for the broker.
                if stop.is_set():
                    return False
                await asyncio.sleep(RETRY_S)

    async def _park(self, record: Record, kind: str, reason: str, stop: asyncio.Event) -> bool:
        while True:
            try:
                await dead_letter(
                    self.collector.producer, self.bus.topics.dead_letters, record, reason
                )
                break
            except Exception as exc:
                log.warning("dead letter for %s failed (%s); retrying", record.tp, exc)
                if stop.is_set():
                    return False
                await asyncio.sleep(RETRY_S)
        log.info("feedback record %s@%d parked: %s", record.tp, record.offset, reason)
        self.hooks.on_dead_letter(record.topic, kind)
        self.dead_lettered += 1
        return True
