"""The bus seam: what every stage may ask of a Kafka-like log.

Two twins implement it: :mod:`.kafka` (aiokafka, any Kafka protocol broker) and
:mod:`.memory` (in-process, for unit tests). ``tests/test_bus_contract.py``
runs one contract over both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, Self

Headers = tuple[tuple[str, bytes], ...]
OffsetReset = Literal["earliest", "latest"]


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    """One record as read from the log."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers = ()
    timestamp_ms: int = 0

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one prefix."""

    prefix: str = "sd."

    @property
    def requests(self) -> str:
        return f"{self.prefix}requests"

    @property
    def soft_labels(self) -> str:
        return f"{self.prefix}soft-labels"

    @property
    def hard_labels(self) -> str:
        return f"{self.prefix}hard-labels"

    @property
    def models(self) -> str:
        return f"{self.prefix}models"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}dead-letters"

    @property
    def feedback_raw(self) -> str:
        return f"{self.prefix}feedback-raw"

    @property
    def teacher_models(self) -> str:
        return f"{self.prefix}teacher-models"

    def all(self) -> tuple[str, ...]:
        return (
            self.requests,
            self.soft_labels,
            self.hard_labels,
            self.models,
            self.dead_letters,
            self.feedback_raw,
            self.teacher_models,
        )


class Producer(Protocol):
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc: object) -> None: ...

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> tuple[int, int]:
        """Send and wait for the broker's acknowledgement; returns (partition, offset)."""
        ...


class Consumer(Protocol):
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc: object) -> None: ...

    async def getmany(self, timeout_ms: int = 1000, max_records: int | None = None) -> list[Record]:
        """Records fetched since the last call (possibly none after ``timeout_ms``)."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Commit the next offset to read per partition (default: the consumed position)."""
        ...

    def assignment(self) -> set[TopicPartition]: ...
    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset the next record of each partition will get (for lag)."""
        ...

    def pause(self, *tps: TopicPartition) -> None: ...
    def resume(self, *tps: TopicPartition) -> None: ...


class Bus(Protocol):
    """A factory of producers and consumers bound to one cluster."""

    topics: Topics

    async def ensure_topics(self, names: Sequence[str] | None = None) -> None:
        """Create the topics if missing (default: all of ``topics``)."""
        ...

    def producer(self) -> Producer: ...

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        offset_reset: OffsetReset = "earliest",
        assign: Mapping[TopicPartition, int] | None = None,
    ) -> Consumer:
        """A consumer.

        With ``group_id`` it joins that consumer group and resumes from the group's
        committed offsets. Without, it assigns every partition of ``topics`` to itself
        and starts at the offsets in ``assign`` (others at ``offset_reset``): this is
        how the trainer resumes from offsets kept in its own checkpoint.
        """
        ...


async def dead_letter(producer: Producer, dlq_topic: str, record: Record, reason: str) -> None:
    """Park a record that could not be processed, with where it came from and why."""
    headers: Headers = (
        *record.headers,
        ("sd-original-topic", record.topic.encode()),
        ("sd-original-partition", str(record.partition).encode()),
        ("sd-original-offset", str(record.offset).encode()),
        ("sd-error", reason[:1000].encode("utf-8", "replace")),
    )
    await producer.send(dlq_topic, record.value, key=record.key, headers=headers)
