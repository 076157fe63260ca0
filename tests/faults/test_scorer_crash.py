"""Two ``teacher`` processes share the requests topic; one is killed with SIGKILL mid-stream.

The survivor must take the dead one's partitions (the group rebalances once the dead
member's session expires) and every request must get at least one soft label:
whatever the dead process scored but had not committed is scored again, and those
duplicates are dropped by the trainer's join, which keys soft labels by request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from stream_distill.bus.broker import free_port
from stream_distill.bus.codec import decode, encode, headers_for
from stream_distill.bus.kafka import KafkaBus
from stream_distill.events import RequestEvent, SoftLabel
from stream_distill.testing import eventually
from stream_distill.trainer.join import JoinState

RATE_PER_S = 20
AFTER_KILL_S = 8.0  # requests keep coming this long after the kill


class Scorer:
    """One ``stream-distill teacher`` process with its own /metrics port and log file."""

    def __init__(self, name: str, env: dict[str, str], args: list[str], log: Path) -> None:
        self.name, self.log, self.port = name, log, free_port()
        env = {**env, "SD_TEACHER__METRICS_PORT": str(self.port)}
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_distill.cli", "teacher", *args],
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

    async def scored(self) -> float:
        """``sd_teacher_scored_total`` of this process (0 until its metrics answer)."""
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                text = (await client.get(f"http://127.0.0.1:{self.port}/metrics")).text
        except httpx.HTTPError:
            return 0.0
        m = re.search(r"^sd_teacher_scored_total (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def tail(self) -> str:
        return f"--- {self.name}\n" + self.log.read_text(errors="replace")[-3000:]


@contextlib.asynccontextmanager
async def soft_labels(bus: KafkaBus, first_at: dict[str, float]) -> AsyncIterator[list[SoftLabel]]:
    """Every soft label on the topic as it arrives (all partitions, no group)."""
    out: list[SoftLabel] = []
    consumer = bus.consumer([bus.topics.soft_labels])
    await consumer.start()

    async def poll() -> None:
        while True:
            for rec in await consumer.getmany(timeout_ms=200):
                label = decode(SoftLabel, rec.value)
                out.append(label)
                first_at.setdefault(label.request_id, time.monotonic())

    task = asyncio.create_task(poll())
    try:
        yield out
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.aclose()


async def test_survivor_takes_over_a_killed_scorer(
    kbus: KafkaBus,
    tiny_teacher_dir: Path,
    labels: tuple[str, ...],
    events: Callable[..., list[Any]],
    tmp_path: Path,
) -> None:
    topics = kbus.topics
    env = {
        **os.environ,
        "SD_KAFKA__TOPIC_PREFIX": topics.prefix,
        "SD_KAFKA__PARTITIONS": "2",
        # A dead member is noticed after the session timeout; keep the failover short.
        "SD_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "SD_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "SD_TEACHER__GROUP_ID": f"{topics.prefix}teachers",
        "SD_TEACHER__THREADS": "1",
        "SD_TEACHER__BATCH_SIZE": "8",
        "SD_TEACHER__BATCH_WAIT_MS": "20",
        "SD_TEACHER__EMIT_ATTENTION": "false",
    }
    scorers = []
    for name in ("a", "b"):
        args = ["--bootstrap-servers", kbus.bootstrap, "--data-dir", str(tmp_path / name),
                "--teacher-dir", str(tiny_teacher_dir)]  # fmt: skip
        scorers.append(Scorer(name, env, args, tmp_path / f"{name}.log"))
    victim, survivor = scorers

    sent: list[RequestEvent] = []
    after_kill: list[int] = []  # partitions of the requests sent after the kill
    sent_at: dict[str, float] = {}  # when each request after the kill was sent
    first_at: dict[str, float] = {}  # when its first soft label arrived
    killed = asyncio.Event()
    stop = asyncio.Event()
    pool = [req for req, _, _ in events(labels, 2000, seed=5, tag="sc")]

    async def produce() -> None:
        async with kbus.producer() as producer:
            next_at = time.monotonic()
            for req in pool:
                if stop.is_set():
                    return
                part, _ = await producer.send(
                    topics.requests,
                    encode(req),
                    key=req.conversation_id.encode(),
                    headers=headers_for(req),
                )
                sent.append(req)
                if killed.is_set():
                    after_kill.append(part)
                    sent_at[req.request_id] = time.monotonic()
                next_at += 1 / RATE_PER_S
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    t0 = time.monotonic()
    try:
        async with soft_labels(kbus, first_at) as got:
            feeder = asyncio.create_task(produce())

            async def both_scoring() -> bool:
                assert all(s.alive() for s in scorers), "\n".join(s.tail() for s in scorers)
                return all([await s.scored() > 0 for s in scorers])

            # Both members joined and each scores its share (a partition each).
            end = time.monotonic() + 90
            while not await both_scoring():
                assert time.monotonic() < end, "\n".join(s.tail() for s in scorers)
                await asyncio.sleep(0.5)
            t_both = time.monotonic() - t0
            victim.kill9()
            killed.set()
            before = await survivor.scored()
            await asyncio.sleep(AFTER_KILL_S)
            stop.set()
            await feeder

            ids = {r.request_id for r in sent}

            def all_labelled() -> bool:
                assert survivor.alive(), survivor.tail()
                return ids <= {s.request_id for s in got}

            await eventually(all_labelled, timeout_s=60, every_s=0.2)
            t_done = time.monotonic() - t0
            after = await survivor.scored()
    finally:
        for s in scorers:
            s.kill9()

    # After the kill requests landed on both partitions, and only the survivor was alive
    # to score them: it took over the victim's partition.
    assert set(after_kill) == {0, 1}, after_kill
    assert after - before >= len(after_kill), (before, after, len(after_kill))

    # At least once: every request has a label; re-scored ones are duplicates.
    counts = Counter(s.request_id for s in got)
    assert set(counts) == ids
    dups = sum(counts.values()) - len(counts)

    # The trainer's join keeps one label per request id (and teacher), whatever came twice.
    join = JoinState(holdout_fraction=0.0)
    for req in sent:
        join.add_request(req)
    for label in got:
        join.add_soft(label)
    assert join.stats.soft_labels == len(ids) and join.stats.duplicates == dups
    taken = join.take_ready(len(sent) * 2)
    assert sorted(e.request_id for e in taken) == sorted(ids)
    print(
        f"{len(ids)} requests, {dups} re-scored duplicates; both scoring at {t_both:.1f}s,"
        f" all labelled {t_done - t_both:.1f}s after the kill; longest wait for a label after"
        f" the kill {max(first_at[r] - t for r, t in sent_at.items()):.1f}s (the failover)"
    )
