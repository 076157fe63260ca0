"""The continual trainer role: consume, join, learn, checkpoint, publish.

One writer. It assigns itself every partition of the three input topics and
seeks to the offsets stored in its own checkpoint (no consumer group), so a
restart resumes exactly where the last checkpoint left off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from stream_distill.bus.base import Bus, Producer, Record, TopicPartition, dead_letter
from stream_distill.bus.codec import decode
from stream_distill.config import TrainerSettings
from stream_distill.errors import PoisonRecord
from stream_distill.events import HardLabel, RequestEvent, SoftLabel
from stream_distill.metrics.hooks import Hooks
from stream_distill.registry.store import Registry
from stream_distill.trainer.checkpoint import (
    CheckpointStore,
    Snapshot,
    decode_offsets,
    encode_offsets,
    load_optimizer_tensors,
    optimizer_tensors,
)
from stream_distill.trainer.join import JoinState
from stream_distill.trainer.learner import Learner
from stream_distill.trainer.publish import Publisher
from stream_distill.trainer.replay import ReplayBuffer

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_STEPS = 10
PROMOTION_MARGIN = 0.02


@dataclass
class TrainerStats:
    steps: int = 0
    published: list[str] = field(default_factory=list)
    rejected: int = 0
    dead_letters: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        bus: Bus,
        registry: Registry,
        learner: Learner,
        settings: TrainerSettings,
        tokenizer_json: str,
        hooks: Hooks | None = None,
    ) -> None:
        self.bus = bus
        self.topics = bus.topics
        self.registry = registry
        self.learner = learner
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.join = JoinState(
            window=settings.join_window, holdout_fraction=settings.holdout_fraction
        )
        self.replay = ReplayBuffer(settings.replay_size)
        self.store = CheckpointStore(settings.checkpoint_dir)
        self.publisher = Publisher(registry, bus.topics, tokenizer_json, PROMOTION_MARGIN)
        self.offsets: dict[TopicPartition, int] = {}
        self.stats = TrainerStats()
        self._decoders: dict[str, Any] = {
            self.topics.requests: (RequestEvent, self.join.add_request),
            self.topics.soft_labels: (SoftLabel, self.join.add_soft),
            self.topics.hard_labels: (HardLabel, self.join.add_hard),
        }

    # -- checkpoint -------------------------------------------------------------------------
    def restore(self) -> bool:
        snap = self.store.load()
        if snap is None:
            return False
        st = snap.state
        if tuple(st["labels"]) != self.learner.labels:
            raise RuntimeError("checkpoint label list differs from the student's")
        self.learner.model.load_state_dict(snap.model_state)
        params = list(self.learner.model.parameters())
        load_optimizer_tensors(self.learner.optimizer, params, snap.optim_state)
        self.learner.steps = st["steps"]
        self.learner.examples_seen = st["examples_seen"]
        self.join.load_json(st["join"])
        self.replay.load_json(st["replay"])
        self.offsets = decode_offsets(st["offsets"])
        self.publisher.published_version = st.get("published_version")
        log.info("restored checkpoint at step %d", self.learner.steps)
        return True

    async def checkpoint(self) -> None:
        """Snapshot in the loop (consistent), write in a worker thread."""
        snap = self._snapshot()
        await asyncio.to_thread(self.store.save, snap)

    def _snapshot(self) -> Snapshot:
        params = list(self.learner.model.parameters())
        return Snapshot(
            model_state={k: v.detach().clone() for k, v in self.learner.model.state_dict().items()},
            optim_state=optimizer_tensors(self.learner.optimizer, params),
            state={
                "labels": list(self.learner.labels),
                "steps": self.learner.steps,
                "examples_seen": self.learner.examples_seen,
                "join": self.join.to_json(),
                "replay": self.replay.to_json(),
                "offsets": encode_offsets(self.offsets),
                "published_version": self.publisher.published_version,
            },
        )

    # -- the loop ---------------------------------------------------------------------------
    async def _ingest(self, producer: Producer, records: list[Record]) -> None:
        for rec in records:
            kind, add = self._decoders[rec.topic]
            try:
                add(decode(kind, rec.value))
            except PoisonRecord as exc:
                await dead_letter(producer, self.topics.dead_letters, rec, str(exc))
                self.hooks.on_dead_letter(rec.topic, "poison")
                self.stats.dead_letters += 1
            self.offsets[rec.tp] = rec.offset + 1

    def _new_per_batch(self) -> int:
        """How many fresh examples a batch takes; the rest comes from the reservoir."""
        if not len(self.replay):
            return self.settings.batch_size
        replayed = int(self.settings.batch_size * self.settings.replay_ratio)
        return max(1, self.settings.batch_size - replayed)

    async def _step(self) -> None:
        new = self.join.take_ready(self._new_per_batch())
        old = self.replay.sample(
            self.settings.batch_size - len(new), exclude={ex.request_id for ex in new}
        )
        for ex in new:
            self.replay.add(ex)
        batch = new + old
        losses = await asyncio.to_thread(self.learner.learn_many, batch)
        self.stats.steps += 1
        self.stats.last_losses = losses
        self.hooks.on_train_step(
            {k: v for k, v in losses.items() if k != "seconds"}, len(batch), losses["seconds"]
        )

    async def publish_now(self, producer: Producer) -> bool:
        cand = await asyncio.to_thread(self.publisher.evaluate, self.learner, self.join)
        if not cand.accepted:
            log.warning("candidate held back: %s", cand.reason)
            self.stats.rejected += 1
            self.hooks.on_publish("candidate", False)
            return False
        mv = await self.publisher.publish(producer, self.learner, cand)
        self.stats.published.append(mv.version)
        self.hooks.on_publish(mv.version, True)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        torch.set_num_threads(self.settings.threads)
        self.restore()
        await self.bus.ensure_topics()
        inputs = [self.topics.requests, self.topics.soft_labels, self.topics.hard_labels]
        async with (
            self.bus.producer() as producer,
            self.bus.consumer(inputs, group_id=None, assign=self.offsets) as consumer,
        ):
            # The registry is the truth of what serves (a crash may have hit between a
            # publish and its checkpoint).
            self.publisher.published_version = self.registry.latest()
            if self.publisher.published_version is None:
                await self.publish_now(producer)  # the first version: serve needs a model
                await self.checkpoint()
            last_publish, steps_at_publish = time.monotonic(), self.learner.steps
            while not stop.is_set():
                records = await consumer.getmany(timeout_ms=200, max_records=2000)
                await self._ingest(producer, records)
                ready = self.join.ready_count
                if ready >= self._new_per_batch() or (
                    ready >= self.settings.min_examples_to_train and not records
                ):
                    await self._step()
                    if self.learner.steps % CHECKPOINT_EVERY_STEPS == 0:
                        await self.checkpoint()
                due_steps = (
                    self.learner.steps - steps_at_publish >= self.settings.publish_every_steps
                )
                due_time = time.monotonic() - last_publish >= self.settings.publish_every_s
                if self.learner.steps > steps_at_publish and (due_steps or due_time):
                    await self.publish_now(producer)
                    await self.checkpoint()
                    last_publish, steps_at_publish = time.monotonic(), self.learner.steps
            await self.checkpoint()
