"""An in-process twin of the bus for unit tests of stage logic.

Same contract as :mod:`.kafka` (``tests/test_bus_contract.py`` runs over both):
per-partition order, keys hashed to partitions, group offsets that survive a
consumer's restart, uncommitted records redelivered, self-assignment with seek.
Group members of one group split partitions round-robin at join time.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Self

from stream_distill.bus.base import Headers, OffsetReset, Record, TopicPartition, Topics


class MemoryLog:
    """The shared state of one fake cluster."""

    def __init__(self, partitions: int = 4) -> None:
        self.partitions = partitions
        self.logs: dict[str, list[list[Record]]] = {}
        self.committed: dict[str, dict[TopicPartition, int]] = defaultdict(dict)
        self.members: dict[str, list[MemoryConsumer]] = defaultdict(list)
        self.changed = asyncio.Condition()
        self.down = False

    def ensure(self, topic: str) -> list[list[Record]]:
        if topic not in self.logs:
            self.logs[topic] = [[] for _ in range(self.partitions)]
        return self.logs[topic]

    def end_offset(self, tp: TopicPartition) -> int:
        return len(self.ensure(tp.topic)[tp.partition])


class MemoryProducer:
    def __init__(self, log: MemoryLog) -> None:
        self._log = log
        self._rr = 0

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> tuple[int, int]:
        if self._log.down:
            raise ConnectionError("memory bus is down")
        parts = self._log.ensure(topic)
        if key is None:
            p, self._rr = self._rr % len(parts), self._rr + 1
        else:
            p = zlib.crc32(key) % len(parts)
        offset = len(parts[p])
        ts = int(time.time() * 1000)
        parts[p].append(Record(topic, p, offset, key, value, tuple(headers), ts))
        async with self._log.changed:
            self._log.changed.notify_all()
        return p, offset


class MemoryConsumer:
    def __init__(
        self,
        log: MemoryLog,
        topics: Sequence[str],
        group_id: str | None,
        offset_reset: OffsetReset,
        assign: Mapping[TopicPartition, int] | None,
    ) -> None:
        self._log = log
        self._topics = tuple(topics)
        self._group = group_id
        self._reset = offset_reset
        self._assign = dict(assign or {})
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()

    def _all_tps(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t in self._topics for p in range(len(self._log.ensure(t)))]

    def _initial(self, tp: TopicPartition) -> int:
        if self._group is not None and tp in self._log.committed[self._group]:
            return self._log.committed[self._group][tp]
        if tp in self._assign:
            return self._assign[tp]
        return 0 if self._reset == "earliest" else self._log.end_offset(tp)

    def _rebalance(self) -> None:
        tps = self._all_tps()
        if self._group is None:
            mine = tps
        else:
            members = self._log.members[self._group]
            idx = members.index(self)
            mine = [tp for i, tp in enumerate(tps) if i % len(members) == idx]
        self._positions = {tp: self._positions.get(tp, self._initial(tp)) for tp in mine}

    async def start(self) -> None:
        if self._group is not None:
            self._log.members[self._group].append(self)
            for member in self._log.members[self._group]:
                member._rebalance()
        else:
            self._rebalance()

    async def aclose(self) -> None:
        if self._group is not None and self in self._log.members[self._group]:
            self._log.members[self._group].remove(self)
            for member in self._log.members[self._group]:
                member._positions = {}
                member._rebalance()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _take(self, max_records: int | None) -> list[Record]:
        out: list[Record] = []
        for tp, pos in sorted(self._positions.items()):
            if tp in self._paused:
                continue
            part = self._log.ensure(tp.topic)[tp.partition]
            room = None if max_records is None else max_records - len(out)
            batch = part[pos : None if room is None else pos + room]
            out.extend(batch)
            self._positions[tp] = pos + len(batch)
        return out

    async def getmany(self, timeout_ms: int = 1000, max_records: int | None = None) -> list[Record]:
        if self._log.down:
            await asyncio.sleep(timeout_ms / 1000)
            return []
        out = self._take(max_records)
        if out or timeout_ms <= 0:
            return out
        try:
            async with self._log.changed:
                await asyncio.wait_for(self._log.changed.wait(), timeout_ms / 1000)
        except TimeoutError:
            return []
        return self._take(max_records)

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        if self._group is None:
            return  # like Kafka without a group: nowhere to commit
        self._log.committed[self._group].update(offsets or self._positions)

    def assignment(self) -> set[TopicPartition]:
        return set(self._positions)

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self._log.end_offset(tp) for tp in tps}

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)


class MemoryBus:
    """A factory over one :class:`MemoryLog` (share the log to share the cluster)."""

    def __init__(self, topics: Topics | None = None, log: MemoryLog | None = None) -> None:
        self.topics = topics or Topics()
        self.log = log or MemoryLog()

    async def ensure_topics(self, names: Sequence[str] | None = None) -> None:
        for name in names or self.topics.all():
            self.log.ensure(name)

    def producer(self) -> MemoryProducer:
        return MemoryProducer(self.log)

    def consumer(
        self,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        offset_reset: OffsetReset = "earliest",
        assign: Mapping[TopicPartition, int] | None = None,
    ) -> MemoryConsumer:
        return MemoryConsumer(self.log, topics, group_id, offset_reset, assign)

    def records(self, topic: str) -> list[Record]:
        """Every record of ``topic`` (test helper), partition by partition."""
        return [r for part in self.log.ensure(topic) for r in part]
