"""The bus over any Kafka protocol broker; the only module that imports aiokafka."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka import TopicPartition as KTP
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError

from stream_distill.bus.base import Headers, OffsetReset, Record, TopicPartition, Topics
from stream_distill.config import KafkaSettings

log = logging.getLogger(__name__)


def connection_options(settings: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Options every aiokafka client gets: where, and how to authenticate."""
    opts: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    if settings.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            opts["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return opts


def _tp(tp: TopicPartition) -> KTP:
    return KTP(tp.topic, tp.partition)


def _record(r: ConsumerRecord[bytes, bytes]) -> Record:
    return Record(
        topic=r.topic,
        partition=r.partition,
        offset=r.offset,
        key=r.key,
        value=r.value if r.value is not None else b"",
        headers=tuple((k, bytes(v)) for k, v in r.headers),
        timestamp_ms=r.timestamp,
    )


class KafkaProducer:
    """acks=all; no idempotence (Tansu lacks it): duplicates are removed by ids downstream."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._p = AIOKafkaProducer(
            acks="all", enable_idempotence=False, linger_ms=2, max_batch_size=1 << 20, **options
        )

    async def start(self) -> None:
        await self._p.start()

    async def aclose(self) -> None:
        await self._p.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> tuple[int, int]:
        md = await self._p.send_and_wait(topic, value, key=key, headers=list(headers) or None)
        return md.partition, md.offset


class KafkaConsumer:
    """Manual commits only; group membership or self-assignment (see ``Bus.consumer``).

    Commits ride out a broker restart: one the group refuses because it rebalanced
    meanwhile, or one still unanswered after ``commit_timeout_s`` (aiokafka retries a
    commit to a topic the broker does not know forever, and a restarted broker that
    keeps data in memory has forgotten them all), is skipped with a warning; the
    records come again to whoever holds the partition next, as at-least-once allows.
    """

    def __init__(
        self,
        options: dict[str, Any],
        topics: Sequence[str],
        group_id: str | None,
        offset_reset: OffsetReset,
        assign: Mapping[TopicPartition, int] | None,
        *,
        commit_timeout_s: float = 10.0,
    ) -> None:
        self._topics = tuple(topics)
        self._group = group_id
        self._assign = dict(assign or {})
        self._commit_timeout_s = commit_timeout_s
        self._c = AIOKafkaConsumer(
            *(self._topics if group_id else ()),
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=offset_reset,
            **options,
        )

    async def start(self) -> None:
        await self._c.start()
        if self._group is None:
            await self._assign_all()

    async def _assign_all(self) -> None:
        await self._c.topics()  # loads metadata
        tps: list[KTP] = []
        for topic in self._topics:
            parts = self._c.partitions_for_topic(topic) or set()
            tps.extend(KTP(topic, p) for p in sorted(parts))
        self._c.assign(tps)
        for ktp in tps:
            offset = self._assign.get(TopicPartition(ktp.topic, ktp.partition))
            if offset is not None:
                self._c.seek(ktp, offset)

    async def aclose(self) -> None:
        await self._c.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def getmany(self, timeout_ms: int = 1000, max_records: int | None = None) -> list[Record]:
        batches = await self._c.getmany(timeout_ms=timeout_ms, max_records=max_records)
        out = [_record(r) for recs in batches.values() for r in recs]
        out.sort(key=lambda r: (r.topic, r.partition, r.offset))
        return out

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        kafka_offsets = None if offsets is None else {_tp(tp): o for tp, o in offsets.items()}
        try:
            await asyncio.wait_for(self._c.commit(kafka_offsets), self._commit_timeout_s)
        except CommitFailedError as exc:
            log.warning("commit skipped, the group rebalanced (records come again): %s", exc)
        except TimeoutError:
            log.warning("commit skipped after %.0fs (records come again)", self._commit_timeout_s)

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(t.topic, t.partition) for t in self._c.assignment()}

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        if not tps:
            return {}
        ends = await self._c.end_offsets([_tp(t) for t in tps])
        return {TopicPartition(k.topic, k.partition): int(v) for k, v in ends.items()}

    def pause(self, *tps: TopicPartition) -> None:
        self._c.pause(*(_tp(t) for t in tps))

    def resume(self, *tps: TopicPartition) -> None:
        self._c.resume(*(_tp(t) for t in tps))


class KafkaBus:
    """Producers, consumers and topic admin for one cluster."""

    def __init__(self, settings: KafkaSettings, bootstrap: str) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.topics = Topics(settings.topic_prefix)
        self._options = connection_options(settings, bootstrap)

    async def ensure_topics(self, names: Sequence[str] | None = None) -> None:
        wanted = list(names or self.topics.all())
        admin = AIOKafkaAdminClient(**self._options)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            if missing:
                new = [
                    NewTopic(n, self.settings.partitions, self.settings.replication_factor)
                    for n in missing
                ]
                with contextlib.suppress(TopicAlreadyExistsError):  # another role was first
                    await admin.create_topics(new)
        finally:
            await admin.close()

    def producer(self) -> KafkaProducer:
        return KafkaProducer(self._options)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        offset_reset: OffsetReset = "earliest",
        assign: Mapping[TopicPartition, int] | None = None,
    ) -> KafkaConsumer:
        options = {
            **self._options,
            "max_poll_interval_ms": self.settings.max_poll_interval_ms,
            "session_timeout_ms": self.settings.session_timeout_ms,
            "heartbeat_interval_ms": self.settings.heartbeat_interval_ms,
        }
        return KafkaConsumer(
            options,
            topics,
            group_id,
            offset_reset,
            assign,
            commit_timeout_s=self.settings.commit_timeout_ms / 1000,
        )


async def probe(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when a broker at ``bootstrap`` answers a metadata request."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.describe_cluster(), timeout_s)
        return True
    except (KafkaError, OSError, TimeoutError) as exc:
        log.debug("broker at %s not ready: %s", bootstrap, exc)
        return False
    finally:
        await admin.close()
