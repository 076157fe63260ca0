"""kill -9 the trainer process at random moments, once inside a checkpoint write.

Afterwards the last checkpoint must hold every hard label exactly once and offsets
that say exactly how many records of each partition were consumed.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream_distill.bus.base import Producer, TopicPartition, Topics
from stream_distill.bus.codec import encode, headers_for
from stream_distill.bus.kafka import KafkaBus
from stream_distill.events import HardLabel
from stream_distill.registry.store import Registry
from stream_distill.testing import publish_bow
from stream_distill.trainer.checkpoint import CheckpointStore, decode_offsets
from stream_distill.trainer.join import JoinState

SEED = int(os.environ.get("SD_FAULT_SEED", "0")) or random.randrange(1, 10**6)
CHUNK = 80  # requests per round: a 60-request backlog is more than one 10-step checkpoint
MAX_ROUNDS = 8


class TrainerProc:
    """The ``trainer`` command as an operator runs it, with its output in a log file."""

    def __init__(self, env: dict[str, str], args: list[str], log: Path) -> None:
        self.env, self.args, self.log = env, args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stream_distill.cli", "trainer", *self.args],
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _next_offsets(acks: list[tuple[str, int, int]]) -> dict[TopicPartition, int]:
    """From (topic, partition, offset) acknowledgements: the next offset per partition."""
    out: dict[TopicPartition, int] = {}
    for topic, part, off in acks:
        tp = TopicPartition(topic, part)
        out[tp] = max(out.get(tp, 0), off + 1)
    return out


def _staging(ckpt: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(ckpt) if e.name.startswith(".staging-")]
    except FileNotFoundError:
        return []


def _kill_inside_write(proc: TrainerProc, ckpt: Path, timeout_s: float) -> bool:
    """Spin until a checkpoint is being staged and SIGKILL at once; True when it was seen."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and proc.alive():
        if _staging(ckpt):
            os.kill(proc.pid, signal.SIGKILL)
            return True
    return False


def _latest(ckpt: Path) -> str | None:
    return CheckpointStore(ckpt).latest_name() if ckpt.exists() else None


async def _wait_progress(
    proc: TrainerProc, ckpt: Path, since: str | None, timeout_s: float
) -> None:
    """Until the trainer has written a checkpoint newer than ``since`` (it is consuming)."""
    end = time.monotonic() + timeout_s
    while _latest(ckpt) == since:
        assert proc.alive(), proc.tail()
        assert time.monotonic() < end, "trainer made no progress:\n" + proc.tail()
        await asyncio.sleep(0.05)


async def _wait_idle(proc: TrainerProc, ckpt: Path, quiet_s: float, timeout_s: float) -> None:
    """Until no checkpoint came for ``quiet_s`` (one comes every 10 steps): all is learned."""
    end = time.monotonic() + timeout_s
    last, changed = _latest(ckpt), time.monotonic()
    while time.monotonic() - changed < quiet_s:
        assert proc.alive(), proc.tail()
        assert time.monotonic() < end, "trainer never went idle:\n" + proc.tail()
        await asyncio.sleep(0.05)
        if (now := _latest(ckpt)) != last:
            last, changed = now, time.monotonic()


def _check_consistent(ckpt: Path, topics: Topics) -> None:
    """What a crash leaves behind loads whole, and its offsets agree with its join state."""
    snap = CheckpointStore(ckpt).load()
    assert snap is not None and snap.model_state and snap.optim_state
    state = snap.state
    join = JoinState()
    join.load_json(state["join"])
    consumed: dict[str, int] = {}
    for tp, off in decode_offsets(state["offsets"]).items():
        consumed[tp.topic] = consumed.get(tp.topic, 0) + off
    # Each record read is in the state once (requests and soft labels are never re-sent
    # here, so every hard-label record is either applied or a known duplicate).
    assert consumed.get(topics.requests, 0) == join.stats.requests
    assert consumed.get(topics.soft_labels, 0) == join.stats.soft_labels
    assert consumed.get(topics.hard_labels, 0) == join.stats.hard_labels + join.stats.duplicates
    assert len(state["join"]["feedback_ids"]) == join.stats.hard_labels


async def test_trainer_survives_sigkill(
    kbus: KafkaBus,
    tiny_teacher_dir: Path,
    labels: tuple[str, ...],
    events: Callable[..., list[Any]],
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, labels)  # something already serves: no first publish to wait for
    data_dir, ckpt = tmp_path / "data", tmp_path / "data" / "trainer"
    env = {
        **os.environ,
        "SD_KAFKA__TOPIC_PREFIX": kbus.topics.prefix,
        "SD_MODEL__STUDENT_LAYERS": "[0]",
        "SD_MODEL__MAX_LENGTH": "32",
        "SD_TRAINER__BATCH_SIZE": "8",
        "SD_TRAINER__MIN_EXAMPLES_TO_TRAIN": "1",
        "SD_TRAINER__PUBLISH_EVERY_STEPS": "1000000",
        "SD_TRAINER__PUBLISH_EVERY_S": "1000000",
        "SD_TRAINER__THREADS": "1",
        "SD_TRAINER__CHECKPOINT_EVERY_STEPS": "10",
        "SD_TRAINER__CHECKPOINT_EVERY_S": "2",
    }
    args = ["--bootstrap-servers", kbus.bootstrap, "--registry", str(registry.root),
            "--data-dir", str(data_dir), "--teacher-dir", str(tiny_teacher_dir)]  # fmt: skip
    trainer = TrainerProc(env, args, tmp_path / "trainer.log")

    acks: list[tuple[str, int, int]] = []
    sent_hard: list[HardLabel] = []
    duplicates = 0
    n_requests = 0
    topics = kbus.topics

    async def feed(producer: Producer, chunk: list[Any], pause_s: float = 0.0) -> None:
        """Send ``chunk`` in pieces of ten, with replays of feedback already sent."""
        nonlocal duplicates, n_requests
        for i in range(0, len(chunk), 10):
            sends = []
            for req, soft, hard in chunk[i : i + 10]:
                key = req.conversation_id.encode()
                sends.append((topics.requests, encode(req), key, headers_for(req)))
                sends.append((topics.soft_labels, encode(soft), key, headers_for(soft)))
                if int(hard.request_id.rsplit("r", 1)[1]) % 2 == 0:
                    sends.append((topics.hard_labels, encode(hard), key, headers_for(hard)))
                    sent_hard.append(hard)
            # Some of these replays were learned before an earlier crash.
            for dup in rng.sample(sent_hard, min(2, len(sent_hard))):
                sends.append((topics.hard_labels, encode(dup), dup.request_id.encode(), ()))
                duplicates += 1
            for topic, value, key, headers in sends:
                part, off = await producer.send(topic, value, key=key, headers=headers)
                acks.append((topic, part, off))
            n_requests += len(chunk[i : i + 10])
            await asyncio.sleep(rng.uniform(0, pause_s))

    kills = inside_write = 0
    t0 = time.monotonic()
    async with kbus.producer() as producer:
        try:
            for round_no in range(MAX_ROUNDS):
                if kills >= 3 and inside_write >= 1:
                    break
                chunk = events(labels, CHUNK, seed=SEED + round_no, tag=f"k{round_no}")
                since = _latest(ckpt)
                trainer.start()
                if inside_write == 0 and kills >= 1:
                    # The backlog makes checkpoints come (one per 10 steps) while we watch.
                    await feed(producer, chunk)
                    seen = await asyncio.to_thread(_kill_inside_write, trainer, ckpt, 60.0)
                    trainer.kill9()
                    # A staging folder left behind proves the write was cut short.
                    inside_write += bool(seen and _staging(ckpt))
                else:
                    await feed(producer, chunk[:60])
                    await _wait_progress(trainer, ckpt, since, timeout_s=60)
                    # The rest arrives while the trainer runs; the kill lands somewhere in it.
                    trickle = asyncio.create_task(feed(producer, chunk[60:], pause_s=0.5))
                    await asyncio.sleep(rng.uniform(0.0, 1.0))
                    assert trainer.alive(), trainer.tail()
                    trainer.kill9()
                    await trickle
                kills += 1
                print(f"kill {kills} at {time.monotonic() - t0:.1f}s", flush=True)
                _check_consistent(ckpt, topics)
            assert kills >= 3 and inside_write >= 1, (kills, inside_write, SEED)

            # The last run: consume everything, then a clean stop writes the final checkpoint.
            since = _latest(ckpt)
            trainer.start()
            await feed(producer, events(labels, CHUNK, seed=SEED + MAX_ROUNDS, tag="last"))
            await _wait_progress(trainer, ckpt, since, timeout_s=60)
            await _wait_idle(trainer, ckpt, quiet_s=2.0, timeout_s=60)
            assert trainer.proc is not None
            trainer.proc.send_signal(signal.SIGTERM)
            assert trainer.proc.wait(30) == 0, trainer.tail()
        finally:
            if trainer.alive():
                trainer.kill9()

    snap = CheckpointStore(ckpt).load()
    assert snap is not None
    state = snap.state
    # Offsets: exactly the records each partition holds, none skipped, none twice.
    assert decode_offsets(state["offsets"]) == _next_offsets(acks), SEED
    _check_consistent(ckpt, topics)

    join = JoinState()
    join.load_json(state["join"])
    fids = [h.feedback_id for h in sent_hard]
    applied = state["join"]["feedback_ids"]
    assert sorted(applied) == sorted(fids) and len(set(applied)) == len(applied)
    assert join.stats.hard_labels == len(fids)
    # Every re-read after a crash was rolled back with the state: the only duplicates
    # the join saw are the replays this test sent on purpose.
    assert join.stats.duplicates == duplicates, (join.stats, duplicates, SEED)
    assert join.stats.requests == join.stats.soft_labels == n_requests

    # Every hard label reached the weights once: trained (or held out), nothing pending.
    assert join.ready_count == 0
    pending = state["join"]["pending"]
    trained_hard = [p for p in pending if p[3] is not None and p[5]]
    assert len(trained_hard) == len(fids)
    assert len(join.holdout) == sum(1 for p in pending if p[3] and join.is_holdout(p[0]))
    assert state["steps"] > 0 and state["examples_seen"] <= 8 * state["steps"]
    for name, tensor in snap.model_state.items():
        assert all(math.isfinite(x) for x in tensor.flatten().tolist()[:1000]), name
    assert not _staging(ckpt)  # stale staging folders are cleaned by the next save
