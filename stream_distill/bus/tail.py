"""Following one topic from its end (serve's model watcher, the teacher's swapper, ...).

Followers must keep running whatever the bus does, so a consumer here reconnects
with backoff forever instead of failing, and a record it cannot read is parked on
the dead-letter topic instead of stopping it. Every follower self-assigns all
partitions (no consumer group), so each process hears every record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from stream_distill.bus.base import Bus, Producer, Record
from stream_distill.bus.codec import decode
from stream_distill.errors import PoisonRecord
from stream_distill.events import Event
from stream_distill.metrics.hooks import Hooks

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)


async def tail_topic(
    bus: Bus,
    topic: str,
    handle: Callable[[Record], Awaitable[None]],
    positioned: asyncio.Event,
) -> None:
    """Hand every new record of ``topic`` to ``handle``, from "latest", until cancelled.

    ``positioned`` is set once the consumer has fixed its start offset (or the bus is
    broken), so callers and tests know that later records will be seen.
    """
    backoff = 0.5
    while True:
        consumer = bus.consumer([topic], group_id=None, offset_reset="latest")
        try:
            with contextlib.suppress(Exception):  # serve may lack the right to create it
                await bus.ensure_topics([topic])
            await consumer.start()
            if not consumer.assignment():
                raise RuntimeError(f"topic {topic} has no partitions yet")
            backoff = 0.5
            timeout_ms = 200  # a first fetch makes a lazy client resolve "latest" now
            while True:
                records = await consumer.getmany(timeout_ms=timeout_ms)
                positioned.set()
                timeout_ms = 1000
                for record in records:
                    await handle(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s consumer failed (%s); retrying in %.1fs", topic, exc, backoff)
        finally:
            with contextlib.suppress(Exception):
                await consumer.aclose()
        positioned.set()  # nobody should wait on a broken bus
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 10.0)


async def decode_or_park(
    kind: type[E],
    record: Record,
    hooks: Hooks,
    producer: Producer | None,
    dead_letters: str,
) -> E | None:
    """The event in ``record``, or None after parking the record on ``dead_letters``."""
    from stream_distill.bus.base import dead_letter

    try:
        return decode(kind, record.value)
    except PoisonRecord as exc:
        reason = str(exc)
        log.warning("poison record %s@%d: %s", record.tp, record.offset, reason)
        hooks.on_dead_letter(record.topic, reason)
        if producer is not None:
            try:
                await dead_letter(producer, dead_letters, record, reason)
            except Exception:
                log.exception("could not write a dead letter")
        return None
