"""One contract over every bus twin: the in-memory one and the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from stream_distill.bus.base import Bus, Record, TopicPartition, Topics, dead_letter
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.kafka import KafkaBus
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import KafkaSettings


@pytest.fixture(params=["memory", "kafka"])
async def bus(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Bus]:
    if request.param == "memory":
        b: Bus = MemoryBus(Topics(prefix))
    else:
        broker: EmbeddedBroker = request.getfixturevalue("broker")
        b = KafkaBus(KafkaSettings(topic_prefix=prefix), broker.bootstrap)
    await b.ensure_topics()
    yield b


async def _drain(consumer: object, want: int, timeout_s: float = 20.0) -> list[Record]:
    out: list[Record] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while len(out) < want and loop.time() < end:
        out += await consumer.getmany(timeout_ms=200)  # type: ignore[attr-defined]
    return out


async def test_order_per_key_and_headers(bus: Bus) -> None:
    topic = bus.topics.requests
    async with bus.producer() as p:
        for i in range(30):
            await p.send(topic, f"{i}".encode(), key=f"c{i % 3}".encode(), headers=(("h", b"x"),))
    async with bus.consumer([topic]) as c:
        recs = await _drain(c, 30)
    assert len(recs) == 30
    assert all(r.headers == (("h", b"x"),) for r in recs)
    for k in (b"c0", b"c1", b"c2"):
        vals = [int(r.value) for r in recs if r.key == k]
        assert vals == sorted(vals) and len(vals) == 10
        assert len({r.partition for r in recs if r.key == k}) == 1


async def test_group_commit_resume_and_redelivery(bus: Bus) -> None:
    topic = bus.topics.soft_labels
    async with bus.producer() as p:
        for i in range(20):
            await p.send(topic, f"{i}".encode(), key=f"k{i}".encode())
    async with bus.consumer([topic], group_id="g") as c:
        first = await _drain(c, 20)
        assert len(first) == 20
        # commit only half of each partition's records
        half: dict[TopicPartition, int] = {}
        for r in first:
            if int(r.value) < 10:
                half[r.tp] = max(half.get(r.tp, 0), r.offset + 1)
        await c.commit(half)
    expected = {int(r.value) for r in first if r.offset >= half.get(r.tp, 0)}
    assert expected >= set(range(10, 20))
    async with bus.consumer([topic], group_id="g") as c:
        again = await _drain(c, len(expected))
    # exactly what lies past the committed offsets comes back: nothing lost, nothing earlier
    assert sorted(int(r.value) for r in again) == sorted(expected)


async def test_self_assignment_seeks_to_given_offsets(bus: Bus) -> None:
    topic = bus.topics.hard_labels
    async with bus.producer() as p:
        for i in range(8):
            await p.send(topic, f"{i}".encode(), key=b"same")
    async with bus.consumer([topic]) as c:
        recs = await _drain(c, 8)
    tp = recs[0].tp
    async with bus.consumer([topic], assign={tp: 5}) as c:
        rest = await _drain(c, 3)
        assert tp in c.assignment()
    assert [int(r.value) for r in rest] == [5, 6, 7]


async def test_latest_skips_history(bus: Bus) -> None:
    topic = bus.topics.models
    async with bus.producer() as p:
        await p.send(topic, b"old", key=b"m")
        async with bus.consumer([topic], offset_reset="latest") as c:
            await c.getmany(timeout_ms=300)
            await p.send(topic, b"new", key=b"m")
            recs = await _drain(c, 1)
    assert [r.value for r in recs] == [b"new"]


async def test_dead_letter_carries_origin(bus: Bus) -> None:
    src = Record(bus.topics.requests, 2, 41, b"k", b"\xff junk", ())
    async with bus.producer() as p:
        await dead_letter(p, bus.topics.dead_letters, src, "not JSON")
    async with bus.consumer([bus.topics.dead_letters]) as c:
        recs = await _drain(c, 1)
    h = dict(recs[0].headers)
    assert recs[0].value == b"\xff junk"
    assert h["sd-original-topic"] == bus.topics.requests.encode()
    assert h["sd-original-partition"] == b"2" and h["sd-original-offset"] == b"41"
    assert h["sd-error"] == b"not JSON"


async def test_end_offsets_measure_lag(bus: Bus) -> None:
    topic = bus.topics.feedback_raw
    async with bus.producer() as p:
        for i in range(5):
            await p.send(topic, f"{i}".encode(), key=b"one-key")
    async with bus.consumer([topic]) as c:
        recs = await _drain(c, 5)
        tp = recs[0].tp
        ends = await c.end_offsets([tp])
    assert ends == {tp: 5}
