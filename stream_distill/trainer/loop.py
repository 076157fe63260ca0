"""The continual trainer role: consume, join, learn, checkpoint, publish.

One writer. It assigns itself every partition of the three input topics and
seeks to the offsets stored in its own checkpoint (no consumer group), so a
restart resumes exactly where the last checkpoint left off. The ``offline``
strategy records joined examples instead of learning from them and trains in
rounds (see :mod:`stream_distill.trainer.offline`); an operator asks for a round at
once with SIGUSR1 to the trainer process (:func:`round_on_signal`).

The student's label space grows from a hard label naming a new intent, or from a
teacher label list trusted as :mod:`stream_distill.trainer.labels` describes; the
grown list is checkpointed and published with the next version.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from stream_distill.bus.base import Bus, Consumer, Producer, Record, TopicPartition, dead_letter
from stream_distill.bus.codec import decode
from stream_distill.config import TrainerSettings
from stream_distill.errors import PoisonRecord
from stream_distill.events import HardLabel, RequestEvent, SoftLabel
from stream_distill.metrics.hooks import Hooks
from stream_distill.models.imprint import imprint
from stream_distill.registry.base import ModelStore
from stream_distill.threads import low_priority_executor
from stream_distill.trainer.checkpoint import (
    CheckpointStore,
    Snapshot,
    decode_offsets,
    encode_offsets,
    learner_tensors,
    load_learner_tensors,
)
from stream_distill.trainer.join import Example, JoinState
from stream_distill.trainer.labels import LabelGrowth
from stream_distill.trainer.learner import Learner
from stream_distill.trainer.offline import OfflineStore, round_batches
from stream_distill.trainer.publish import Publisher
from stream_distill.trainer.rehearsal import NewClassRehearsal
from stream_distill.trainer.replay import make_replay

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0
IMPRINT_EXAMPLES = 16
"""Newest examples per added label whose features start its classifier row."""
SOFT_STRATEGIES = ("online", "offline", "multi_teacher")  # the ones that join soft labels


@dataclass
class TrainerStats:
    steps: int = 0
    published: list[str] = field(default_factory=list)
    rejected: int = 0
    dead_letters: int = 0
    rounds: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        bus: Bus,
        registry: ModelStore,
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
            window=settings.join_window,
            holdout_fraction=settings.holdout_fraction,
            min_teachers=settings.teachers_expected if settings.strategy == "multi_teacher" else 1,
        )
        self.replay = make_replay(settings.replay_balance, settings.replay_size)
        self.store = CheckpointStore(settings.checkpoint_dir)
        self.offline = OfflineStore(
            settings.checkpoint_dir / "offline", settings.offline_max_examples
        )
        self.publisher = Publisher(registry, bus.topics, tokenizer_json, settings)
        self.growth = LabelGrowth(settings.label_growth_min_soft)
        self.rehearsal = NewClassRehearsal(
            settings.new_class_replay_share, settings.new_class_replay_steps
        )
        self._grown_at_step = -(10**12)  # the step the student last added an intent at
        self._round_requested = False
        self._round_open = False  # weights mid-round must not be checkpointed
        self.offsets: dict[TopicPartition, int] = {}
        self._ckpt_at = (time.monotonic(), 0)  # when, and at which step, the last one was
        self.fresh_taken = 0  # fresh examples learned (what buys idle replay steps)
        self._idle_pool: ThreadPoolExecutor | None = None
        self.idle_replayed = 0  # examples learned in replay-only steps
        self._last_soft = time.monotonic()
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
            self.offline.load_json(None)  # records made before any checkpoint are re-read
            return False
        st = snap.state
        labels = tuple(st["labels"])
        if labels[: len(self.learner.labels)] != self.learner.labels:
            raise RuntimeError("checkpoint label list does not extend the student's")
        self.learner.add_labels(labels[len(self.learner.labels) :])  # grown before the crash
        load_learner_tensors(self.learner, snap)
        self.learner.steps = st["steps"]
        self.learner.examples_seen = st["examples_seen"]
        self.join.load_json(st["join"])
        self.replay.load_json(st["replay"])
        self.learner.teachers.load_json(st.get("teachers", {}))
        self.offline.load_json(st.get("offline"))
        self.growth.load_json(st.get("label_growth"))
        self.offsets = decode_offsets(st["offsets"])
        self.publisher.published_version = st.get("published_version")
        self.fresh_taken, self.idle_replayed = st.get("idle_replay", (0, 0))
        log.info("restored checkpoint at step %d", self.learner.steps)
        return True

    async def checkpoint(self) -> None:
        """Snapshot in the loop (consistent), write in a worker thread."""
        if self._round_open:
            return
        snap = self._snapshot()
        await asyncio.to_thread(self.offline.sync)
        await asyncio.to_thread(self.store.save, snap)
        self._ckpt_at = (time.monotonic(), self.learner.steps)

    def _checkpoint_due(self) -> bool:
        at, steps = self._ckpt_at
        new_steps = self.learner.steps - steps
        late = time.monotonic() - at >= self.settings.checkpoint_every_s
        return new_steps >= self.settings.checkpoint_every_steps or (new_steps > 0 and late)

    def _snapshot(self) -> Snapshot:
        model_state, optim_state = learner_tensors(self.learner)
        return Snapshot(
            model_state=model_state,
            optim_state=optim_state,
            state={
                "labels": list(self.learner.labels),
                "steps": self.learner.steps,
                "examples_seen": self.learner.examples_seen,
                "join": self.join.to_json(),
                "replay": self.replay.to_json(),
                "teachers": self.learner.teachers.to_json(),
                "offline": self.offline.to_json(),
                "label_growth": self.growth.to_json(),
                "offsets": encode_offsets(self.offsets),
                "published_version": self.publisher.published_version,
                "idle_replay": [self.fresh_taken, self.idle_replayed],
            },
        )

    # -- the loop ---------------------------------------------------------------------------
    async def _ingest(self, producer: Producer, records: list[Record]) -> None:
        for rec in records:
            kind, add = self._decoders[rec.topic]
            try:
                event = decode(kind, rec.value)  # validated even when the strategy ignores it
                if rec.topic == self.topics.soft_labels:
                    self._last_soft = time.monotonic()
                    if self.settings.strategy not in SOFT_STRATEGIES:
                        event = None
                grow: tuple[list[str] | tuple[str, ...], str] | None = None
                if isinstance(event, HardLabel) and event.intent not in self.learner.labels:
                    # A new intent (a promotion started): grow the student's label space.
                    grow = [event.intent], "hard label"
                elif isinstance(event, SoftLabel):
                    new = self.growth.new_labels(event, self.learner.labels)
                    if new:
                        grow = new, f"teacher label set {event.label_set_version}"
                if event is not None:
                    add(event)
                if grow is not None:  # after the join holds the event: it may be an example
                    self._grow(*grow)
            except PoisonRecord as exc:
                await dead_letter(producer, self.topics.dead_letters, rec, str(exc))
                self.hooks.on_dead_letter(rec.topic, "poison")
                self.stats.dead_letters += 1
            self.offsets[rec.tp] = rec.offset + 1

    def _publish_interval_s(self) -> float:
        """``publish_every_s``, or shorter right after the student added an intent."""
        s = self.settings
        if self.learner.steps - self._grown_at_step < s.new_class_publish_steps:
            return min(s.publish_every_s, s.new_class_publish_every_s)
        return s.publish_every_s

    def _grow(self, new: list[str] | tuple[str, ...], source: str) -> None:
        old = len(self.learner.labels)
        if self.learner.add_labels(new):
            self._grown_at_step = self.learner.steps
            self.rehearsal.added(new, self.learner.steps)
            if self.settings.imprint_new_labels:
                examples = self.join.examples_of(set(new), IMPRINT_EXAMPLES)
                by_label = {k: [ex.turns for ex in v] for k, v in examples.items()}
                imprint(self.learner.model, self.learner.encoder, by_label, old)
            log.info(
                "new labels %s from %s: student now has %d labels",
                list(new),
                source,
                len(self.learner.labels),
            )

    def _new_per_batch(self) -> int:
        """How many fresh examples a batch takes; the rest comes from the reservoir."""
        if not len(self.replay):
            return self.settings.batch_size
        replayed = int(self.settings.batch_size * self.settings.replay_ratio)
        return max(1, self.settings.batch_size - replayed)

    async def _report_lag(self, consumer: Consumer) -> None:
        """Records in the log not yet consumed (what the trainer is behind by)."""
        try:
            ends = await consumer.end_offsets(sorted(consumer.assignment()))
        except Exception as exc:  # lag is informative only; never stop learning for it
            log.debug("lag unavailable: %s", exc)
            return
        lag = sum(max(0, end - self.offsets.get(tp, 0)) for tp, end in ends.items())
        self.hooks.on_consumer_lag("trainer", lag)

    async def _step(self) -> None:
        new = self.join.take_ready(self._new_per_batch())
        starved = time.monotonic() - self._last_soft > self.settings.self_fallback_s
        steps = self.learner.steps
        self.rehearsal.observe(new, steps)
        n_old, taken = self.settings.batch_size - len(new), {ex.request_id for ex in new}
        boost = self.rehearsal.draw(n_old, steps, exclude=taken)
        old = self.replay.sample(
            n_old - len(boost), exclude=taken | {ex.request_id for ex in boost}
        )
        for ex in new:
            self.replay.add(ex)
        self.fresh_taken += len(new)
        if self.settings.strategy == "multi_teacher":
            self._observe_teachers(new)
        await self._learn(new + boost + old, starved)

    def _idle_replay_allowed(self) -> bool:
        """A replay-only step fits the budget: ``idle_replay_factor`` per fresh example."""
        n = self.settings.batch_size
        if len(self.replay) < n:
            return False
        return self.idle_replayed + n <= self.settings.idle_replay_factor * self.fresh_taken

    async def _idle_step(self) -> None:
        """No fresh batch is ready: learn from the reservoir alone (more passes over what
        the stream brought, the way offline training makes epochs)."""
        n = self.settings.batch_size
        boost = self.rehearsal.draw(n, self.learner.steps)
        batch = boost + self.replay.sample(n - len(boost), {ex.request_id for ex in boost})
        self.idle_replayed += len(batch)
        starved = time.monotonic() - self._last_soft > self.settings.self_fallback_s
        await self._learn(batch, starved, self._idle_executor())
        self.hooks.on_idle_replay(len(batch))

    def _idle_executor(self) -> ThreadPoolExecutor | None:
        """A thread of its own, at ``idle_replay_nice``: replay-only steps use CPU that the
        other roles on the host (scorer, teacher updater, serve) leave over."""
        nice = self.settings.idle_replay_nice
        if nice <= 0:
            return None
        if self._idle_pool is None:
            self._idle_pool = low_priority_executor("sd-idle-replay", nice)
        return self._idle_pool

    def _observe_teachers(self, new: list[Example]) -> None:
        """Score each teacher on the fresh hard labels (once per example: a hard label
        is taken for training once)."""
        panel = self.learner.teachers
        scored = False
        for ex in new:
            if ex.hard is not None and ex.teacher_labels:
                panel.observe(ex.teacher_labels, ex.hard)
                scored = True
        if scored:
            ids = sorted(panel.seen)
            self.hooks.on_teacher_weights(dict(zip(ids, panel.weights(ids), strict=True)))

    async def _learn(
        self,
        batch: list[Example],
        self_targets: bool = False,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        step = functools.partial(self.learner.learn_many, batch, self_targets=self_targets)
        losses = await asyncio.get_running_loop().run_in_executor(executor, step)
        self.stats.steps += 1
        self.stats.last_losses = losses
        self.hooks.on_train_step(
            {k: v for k, v in losses.items() if k != "seconds"}, len(batch), losses["seconds"]
        )

    # -- offline rounds ---------------------------------------------------------------------
    def request_round(self) -> None:
        """Train a round on what is recorded so far, at the loop's next turn (offline).

        With nothing recorded yet the round waits for the first example. Other
        strategies learn continuously and ignore the request.
        """
        if self.settings.strategy != "offline":
            log.warning(
                "round requested, but the %s strategy has no rounds", self.settings.strategy
            )
            return
        log.info("offline round requested (%d examples recorded)", self.offline.count)
        self._round_requested = True

    def _round_due(self) -> bool:
        due = self.offline.count >= self.settings.offline_train_after or self._round_requested
        return due and self.offline.count > 0

    async def _record(self, producer: Producer, stop: asyncio.Event) -> None:
        """Record what the join has ready; checkpoint now and then; train when due."""
        before = self.offline.count
        if self.offline.append(self.join.take_ready(self.join.ready_count)):
            self.hooks.on_offline_record(self.offline.count)
        every = self.settings.checkpoint_every_steps * self.settings.batch_size
        if self._round_due():
            await self._offline_round(producer, stop)
        elif self.offline.count // every > before // every:
            await self.checkpoint()

    async def _offline_round(self, producer: Producer, stop: asyncio.Event) -> None:
        """Epochs over the recorded set, then gate + publish and the next round.

        A stop mid-round abandons it uncheckpointed: the restart redoes it from the
        weights and records of the last checkpoint.
        """
        s = self.settings
        examples = self.offline.examples()
        log.info("offline round %d: %d examples", self.offline.round, len(examples))
        self._round_open = True
        for batch in round_batches(examples, s.offline_epochs, s.batch_size, self.offline.round):
            if stop.is_set():
                return
            await self._learn(batch)
        self._round_open = self._round_requested = False
        self.stats.rounds += 1
        self.offline.rotate()
        self.hooks.on_offline_record(0)
        await self.publish_now(producer)
        await self.checkpoint()
        await asyncio.to_thread(self.offline.prune)

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
            next_lag = 0.0
            while not stop.is_set():
                if time.monotonic() >= next_lag:
                    await self._report_lag(consumer)
                    next_lag = time.monotonic() + LAG_EVERY_S
                # With a backlog to learn, only glance at the log: a 200 ms wait per step
                # would cap a quiet stream's training at five steps a second.
                backlog = self.join.ready_count >= self._new_per_batch()
                busy = backlog or self._idle_replay_allowed()
                records = await consumer.getmany(timeout_ms=0 if busy else 200, max_records=2000)
                await self._ingest(producer, records)
                if self.settings.strategy == "offline":
                    await self._record(producer, stop)
                    continue
                ready = self.join.ready_count
                if ready >= self._new_per_batch() or (
                    ready >= self.settings.min_examples_to_train and not records
                ):
                    await self._step()
                elif self._idle_replay_allowed():
                    await self._idle_step()
                if self._checkpoint_due():
                    await self.checkpoint()
                due_steps = (
                    self.learner.steps - steps_at_publish >= self.settings.publish_every_steps
                )
                due_time = time.monotonic() - last_publish >= self._publish_interval_s()
                if self.learner.steps > steps_at_publish and (due_steps or due_time):
                    await self.publish_now(producer)
                    await self.checkpoint()
                    last_publish, steps_at_publish = time.monotonic(), self.learner.steps
            await self.checkpoint()
        if self._idle_pool is not None:
            self._idle_pool.shutdown(wait=False)
            self._idle_pool = None


ROUND_SIGNAL = signal.SIGUSR1


def round_on_signal(trainer: Trainer, loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """SIGUSR1 to this process calls ``trainer.request_round()`` (the operator's trigger:
    ``kill -USR1 <trainer pid>``); False where the loop cannot handle signals."""
    loop = loop or asyncio.get_running_loop()
    try:
        loop.add_signal_handler(ROUND_SIGNAL, trainer.request_round)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    log.info("SIGUSR1 requests an offline round")
    return True
