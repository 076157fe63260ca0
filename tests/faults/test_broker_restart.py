"""Stop the broker under classify load, keep sending, start it again on the same port.

serve must answer every request with 200 throughout. Request events of the outage
wait in serve's bounded queue (and go out once the broker is back) or, when it is
full, are dropped and counted in ``sd_events_dropped_total``. The broker comes back
with the topics created (``EmbeddedBroker(topics=...)``, as ``stream-distill broker``
does), since it lost them with the rest of its memory. After the restart new events
reach the topic without restarting serve, and a consumer group member that lived
through the outage reads them and commits again (a commit it loses is skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from stream_distill.bus.broker import EmbeddedBroker, free_port
from stream_distill.bus.codec import decode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import KafkaSettings
from stream_distill.errors import PoisonRecord
from stream_distill.events import RequestEvent
from stream_distill.registry.store import Registry
from stream_distill.testing import eventually, publish_bow, serve_for_test

LABELS = ("order_status", "refund", "cancel_order", "greeting")
RATE_PER_S = 25
OUTAGE_S = 4.0
QUEUE = 20  # small, so an outage both buffers events and drops (and counts) the overflow


@dataclass
class Load:
    """Classify requests at a steady rate; ids and status codes by phase."""

    client: httpx.AsyncClient
    phase: str = "before"
    ids: dict[str, list[str]] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            body = {"conversation_id": f"c{i % 17}", "turns": [{"role": "user", "text": f"t {i}"}]}
            phase = self.phase
            try:
                r = await self.client.post("/v1/classify", json=body)
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))
            else:
                self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    self.ids.setdefault(phase, []).append(r.json()["request_id"])
                else:
                    self.errors.append(f"{r.status_code} {r.text[:200]}")
            i += 1
            next_at += 1 / RATE_PER_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


@dataclass
class Reader:
    """A consumer group member on the requests topic that commits what it read."""

    seen: set[str] = field(default_factory=set)
    commits: list[float] = field(default_factory=list)  # when each commit returned
    task: asyncio.Task[None] | None = None


@contextlib.asynccontextmanager
async def reader(bus: KafkaBus) -> AsyncIterator[Reader]:
    """Polls and commits through the outage; an error out of either ends its task."""
    consumer = bus.consumer([bus.topics.requests], group_id=f"{bus.topics.prefix}restart")
    await consumer.start()
    out = Reader()

    async def poll() -> None:
        while True:
            records = await consumer.getmany(timeout_ms=200)
            for rec in records:
                with contextlib.suppress(PoisonRecord):
                    out.seen.add(decode(RequestEvent, rec.value).request_id)
            if records:
                await consumer.commit()
                out.commits.append(time.monotonic())

    out.task = asyncio.create_task(poll())
    try:
        yield out
    finally:
        out.task.cancel()
        await asyncio.gather(out.task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.aclose(), 10)


def _dropped(metrics: str) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^sd_events_dropped_total\{reason="([^"]+)"\} (\S+)$', metrics, re.M)
    }


@pytest.mark.timeout(150)
async def test_serve_rides_out_a_broker_restart(tmp_path: Path, prefix: str) -> None:
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, LABELS, seed=1)
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    try:
        # A commit that stalls on the restarted broker is skipped after this long.
        settings = KafkaSettings(topic_prefix=prefix, partitions=2, commit_timeout_ms=3000)
        bus = KafkaBus(settings, broker.bootstrap)
        await bus.ensure_topics()
        stop = asyncio.Event()
        async with (
            serve_for_test(registry, bus, event_queue_size=QUEUE) as (_, client),
            reader(bus) as group,
        ):
            seen = group.seen
            load = Load(client)
            task = asyncio.create_task(load.run(stop))
            try:
                # Before: the group member has joined and reads what serve publishes.
                await eventually(lambda: len(seen) >= 10, timeout_s=40, every_s=0.1)

                # Off the event loop: serve and the load run in it meanwhile.
                await asyncio.to_thread(broker.stop)
                load.phase = "outage"
                await asyncio.sleep(OUTAGE_S)
                # Back on the same port, with the topics created before clients reconnect.
                broker = EmbeddedBroker(port=port, topics=bus.topics.all(), partitions=2)
                await asyncio.to_thread(broker.start)
                load.phase = "after"
                t_back = time.monotonic()

                # After: events of requests answered after the restart reach the topic.
                def after_seen() -> int:
                    return sum(1 for rid in load.ids.get("after", []) if rid in seen)

                await eventually(lambda: after_seen() >= 10, timeout_s=60, every_s=0.1)
                # ...and the group member commits again on the restarted broker.
                await eventually(lambda: max(group.commits, default=0) > t_back, 30, 0.1)
                recovered_s = time.monotonic() - t_back
                load.phase = "final"
                await asyncio.sleep(2.0)
            finally:
                stop.set()
                await task
            final = load.ids.get("final", [])
            await eventually(lambda: all(r in seen for r in final), timeout_s=30, every_s=0.1)
            assert group.task is not None and not group.task.done()  # no error ended it
            metrics = (await client.get("/metrics")).text

        # No request failed because of the bus.
        assert not load.errors, load.errors[:5]
        assert set(load.statuses) == {200}, load.statuses
        assert len(load.ids.get("outage", [])) >= RATE_PER_S * OUTAGE_S / 2, load.ids.keys()
        assert final
        # Outage events were delivered after the restart or dropped with a counted reason.
        assert "# TYPE sd_events_dropped_total counter" in metrics
        dropped = _dropped(metrics)
        outage = load.ids["outage"]
        delivered = sum(1 for rid in outage if rid in seen)
        assert delivered + sum(dropped.values()) >= len(outage), (delivered, dropped, len(outage))
        # The buffer went out once the broker was back (a send the broker refused twice,
        # still in its first moments, is counted as a bus error).
        assert delivered + dropped.get("bus-error", 0) >= QUEUE, (delivered, dropped)
        assert dropped.get("queue-full", 0) > 0, dropped  # the overflow was counted
        print(
            f"outage {OUTAGE_S}s: {len(outage)} answered, {delivered} events delivered later,"
            f" dropped {dropped}; events flowing {recovered_s:.1f}s after the restart"
        )
    finally:
        broker.stop()
