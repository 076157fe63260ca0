"""Keeps a serve replica on the newest good model: models topic first, registry poll as backstop.

The models consumer has no group: every replica self-assigns all partitions from
the end of the log and hears every announcement. Announcements can still be
missed (the bus was down, the record predates the assignment), so the registry
is also polled every few seconds; both paths only ever move *forward* and skip
versions already rejected by the poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from stream_distill.bus.base import Bus, Producer, Record, Topics
from stream_distill.events import ModelPublished
from stream_distill.metrics.hooks import Hooks
from stream_distill.registry.base import ModelStore
from stream_distill.serving.tail import decode_or_park, tail_topic

log = logging.getLogger(__name__)

LoadFn = Callable[[str, str | None], Awaitable[bool]]


def version_number(version: str) -> int:
    """``"v12"`` → 12 (registry versions are ``v<N>``); anything else sorts first."""
    return int(version[1:]) if version[:1] == "v" and version[1:].isdigit() else -1


class ModelWatcher:
    """Calls ``load(version, expected_sha256)`` for each newer version it learns of."""

    def __init__(
        self,
        registry: ModelStore,
        load: LoadFn,
        current: Callable[[], str | None],
        rejected: Callable[[str], bool],
        hooks: Hooks,
        *,
        bus: Bus | None,
        producer: Producer | None,
        topics: Topics,
        poll_interval_s: float,
    ) -> None:
        self.registry = registry
        self._load = load
        self._current = current
        self._rejected = rejected
        self.hooks = hooks
        self.bus = bus
        self.producer = producer
        self.topics = topics
        self.poll_interval_s = poll_interval_s
        # Set once the models consumer holds its position in the log (announcements from
        # then on are heard), or has given up for now.
        self.positioned = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def is_newer(self, version: str) -> bool:
        current = self._current()
        return current is None or version_number(version) > version_number(current)

    async def start(self) -> None:
        if self._tasks:
            return
        if self.bus is not None:
            self._tasks.append(asyncio.create_task(self._consume(), name="sd-models-consumer"))
        else:
            self.positioned.set()
        self._tasks.append(asyncio.create_task(self._poll(), name="sd-registry-poll"))

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def converge(self) -> None:
        """Load the newest loadable registry version newer than the serving one."""
        versions = await asyncio.to_thread(self.registry.list_versions)
        for version in reversed(versions):
            if not self.is_newer(version):
                return
            if not self._rejected(version) and await self._load(version, None):
                return

    async def _poll(self) -> None:
        while True:
            try:
                await self.converge()
            except Exception:
                log.exception("registry poll failed")
            await asyncio.sleep(self.poll_interval_s)

    async def _consume(self) -> None:
        assert self.bus is not None
        await tail_topic(self.bus, self.topics.models, self._on_record, self.positioned)

    async def _on_record(self, record: Record) -> None:
        event = await decode_or_park(
            ModelPublished, record, self.hooks, self.producer, self.topics.dead_letters
        )
        if event is None:
            return
        if self.is_newer(event.version):
            await self._load(event.version, event.sha256)
