"""Composition root: builds each role from the settings tree and runs it.

Heavy imports happen inside the role that needs them, so ``serve`` never loads
torch and ``broker`` loads nothing but the standard library and aiokafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import Settings
from stream_distill.metrics.hooks import Hooks

log = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


def with_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """A copy with dotted keys replaced (``{"kafka.bootstrap_servers": "h:9092"}``); None skips."""
    data = settings.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return Settings.model_validate(data)


def make_bus(settings: Settings) -> KafkaBus:
    return KafkaBus(settings.kafka, settings.kafka.bootstrap_servers or DEFAULT_BOOTSTRAP)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM/SIGINT, so a role finishes its current work and exits."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


@contextlib.contextmanager
def broker_if_needed(settings: Settings) -> Iterator[Settings]:
    """Start the embedded broker unless the settings name a real Kafka."""
    if settings.kafka.bootstrap_servers:
        yield settings
        return
    from stream_distill.bus.broker import EmbeddedBroker

    b = settings.broker
    with EmbeddedBroker(b.host, b.port, b.startup_timeout_s) as broker:
        yield with_overrides(settings, {"kafka.bootstrap_servers": broker.bootstrap})


# -- serve -----------------------------------------------------------------------------------
async def run_serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``): then stop taking requests and drain."""
    from stream_distill.heap import freeze_startup
    from stream_distill.registry import open_registry
    from stream_distill.serving.runner import run_serve as serve

    bus = make_bus(settings)
    await bus.ensure_topics()
    stop = stop or stop_on_signals()
    async with serve(open_registry(settings.registry), settings.serve, bus) as running:
        freeze_startup()
        log.info("serve listening on %s", running.url)
        await stop.wait()
        # Drain: load balancers see "not ready" at once while requests in flight (and
        # those already routed here) are still answered; then HTTP stops gracefully and
        # queued request events are flushed to the bus on the way out.
        running.core.begin_drain()
        log.info("draining for %.1fs", settings.serve.drain_grace_s)
        await asyncio.sleep(settings.serve.drain_grace_s)


# -- feedback --------------------------------------------------------------------------------
async def run_feedback(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Consume the feedback-raw topic alone (``serve.feedback_group_id``) until SIGTERM/SIGINT.

    Without serve there is no record of answered request ids, so that check is
    skipped; intents are checked against the labels of the registry's latest version.
    """
    import time

    from stream_distill.feedback.collector import FeedbackCollector
    from stream_distill.feedback.raw import RawFeedbackConsumer
    from stream_distill.registry import open_registry

    registry = open_registry(settings.registry)
    cached: tuple[float, tuple[str, ...] | None] = (-1e9, None)

    def labels() -> tuple[str, ...] | None:
        nonlocal cached
        if time.monotonic() - cached[0] > 30.0:  # the registry may be remote: ask rarely
            latest = registry.latest()
            found = tuple(registry.read_manifest(latest)["labels"]) if latest else None
            cached = (time.monotonic(), found)
        return cached[1]

    bus = make_bus(settings)
    await bus.ensure_topics()
    stop = stop or stop_on_signals()
    async with bus.producer() as producer:
        collector = FeedbackCollector(producer, bus.topics, settings.serve, labels=labels)
        consumer = RawFeedbackConsumer(bus, collector, group_id=settings.serve.feedback_group_id)
        log.info("feedback consuming %s", bus.topics.feedback_raw)
        await consumer.run(stop)


def role_hooks(metrics_port: int | None) -> Hooks:
    """Prometheus hooks exported on ``metrics_port`` (no-op hooks when it is None)."""
    if metrics_port is None:
        return Hooks()
    from prometheus_client import CollectorRegistry, start_http_server

    from stream_distill.metrics.prometheus import PrometheusHooks

    registry = CollectorRegistry()
    start_http_server(metrics_port, registry=registry)
    log.info("metrics on :%d/metrics", metrics_port)
    return PrometheusHooks(registry)


# -- teacher ---------------------------------------------------------------------------------
async def run_teacher(settings: Settings, teacher_dir: Path) -> None:
    from stream_distill.models.factory import set_threads
    from stream_distill.teacher.model import TeacherModel
    from stream_distill.teacher.scorer import TeacherScorer
    from stream_distill.teacher.store import TeacherStore
    from stream_distill.teacher.swap import TeacherSwapper

    set_threads(settings.teacher.threads)
    model = await asyncio.to_thread(
        TeacherModel.load, teacher_dir, teacher_id=settings.teacher.teacher_id
    )
    bus = make_bus(settings)
    await bus.ensure_topics()
    stop = stop_on_signals()
    hooks = role_hooks(settings.teacher.metrics_port)
    scorer = TeacherScorer(bus, model, settings.teacher, hooks)
    # Follows the teacher updater: newer verified versions are swapped in between batches.
    swapper = TeacherSwapper(
        TeacherStore(teacher_store_dir(settings)),
        model,
        scorer.offer,
        bus=bus,
        hooks=hooks,
        poll_interval_s=settings.teacher.store_poll_s,
    )
    async with swapper:
        await scorer.run(stop)


def teacher_store_dir(settings: Settings) -> Path:
    """The versioned teacher store the updater writes and every scorer follows."""
    return settings.teacher.store_dir or settings.data_dir / "teacher-store"


async def run_teacher_updater(settings: Settings, teacher_dir: Path | None) -> None:
    """Tune the teacher on hard labels; ``teacher_dir`` seeds an empty store."""
    from stream_distill.models.factory import set_threads
    from stream_distill.teacher.model import TeacherModel
    from stream_distill.teacher.store import TeacherStore
    from stream_distill.teacher.updater import TeacherUpdater

    set_threads(settings.teacher.threads)
    base = None
    if teacher_dir is not None:
        base = await asyncio.to_thread(
            TeacherModel.load, teacher_dir, teacher_id=settings.teacher.teacher_id
        )
    bus = make_bus(settings)
    await bus.ensure_topics()
    updater = TeacherUpdater(
        bus,
        TeacherStore(teacher_store_dir(settings)),
        settings.teacher,
        base=base,
        hooks=role_hooks(settings.teacher.metrics_port),
    )
    await updater.run(stop_on_signals())


# -- trainer ---------------------------------------------------------------------------------
async def run_trainer(settings: Settings, teacher_dir: Path) -> None:
    from stream_distill.models.factory import set_threads
    from stream_distill.registry import open_registry
    from stream_distill.teacher.model import TeacherModel
    from stream_distill.trainer.build import learner_from_teacher
    from stream_distill.trainer.loop import Trainer, round_on_signal

    set_threads(settings.trainer.threads)
    teacher = await asyncio.to_thread(TeacherModel.load, teacher_dir)
    learner = learner_from_teacher(teacher, settings.model, settings.trainer)
    bus = make_bus(settings)
    trainer = Trainer(
        bus,
        open_registry(settings.registry),
        learner,
        settings.trainer,
        teacher.encoder.to_str(),
        role_hooks(settings.trainer.metrics_port),
    )
    del teacher  # the trainer needs only the student from here on
    round_on_signal(trainer)  # SIGUSR1: train an offline round now
    await trainer.run(stop_on_signals())
