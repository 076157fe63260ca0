"""The whole loop on a real broker process: serve (real HTTP, real ONNX) → Kafka → teacher →
trainer → registry → hot swap in serve, with tiny models built in code."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import SecretStr

from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.codec import decode
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import (
    KafkaSettings,
    ModelSettings,
    ServeSettings,
    TeacherSettings,
    TrainerSettings,
)
from stream_distill.data.synthetic import labelled_examples
from stream_distill.demo.evaluate import count_records, student_accuracy
from stream_distill.demo.traffic import Chatbot
from stream_distill.events import ModelPublished
from stream_distill.registry.store import Registry
from stream_distill.serving.runner import run_serve
from stream_distill.teacher.model import TeacherModel
from stream_distill.teacher.scorer import TeacherScorer
from stream_distill.trainer.build import learner_from_teacher
from stream_distill.trainer.loop import Trainer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


async def _until(cond: object, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if cond():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.2)
    return False


async def test_whole_loop_on_real_broker(
    broker: EmbeddedBroker, prefix: str, tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    kafka = KafkaSettings(topic_prefix=prefix)
    bus = KafkaBus(kafka, broker.bootstrap)
    await bus.ensure_topics()
    registry = Registry(tmp_path / "registry")
    trainer_settings = TrainerSettings(
        checkpoint_dir=tmp_path / "ckpt",
        batch_size=16,
        lr=5e-4,
        publish_every_s=5.0,
        publish_every_steps=10**6,
        min_examples_to_train=8,
        holdout_fraction=0.1,
    )
    teacher = TeacherModel.load(tiny_teacher_dir)
    learner = learner_from_teacher(
        teacher,
        ModelSettings(max_length=32, student_layers=(0, 1), student_fresh_head=True),
        trainer_settings,
    )
    trainer = Trainer(bus, registry, learner, trainer_settings, teacher.encoder.to_str())
    scorer = TeacherScorer(
        bus, teacher, TeacherSettings(batch_size=16, batch_wait_ms=20, group_id=f"{prefix}t")
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(trainer.run(stop)), asyncio.create_task(scorer.run(stop))]
    serve_settings = ServeSettings(port=0, feedback_tokens={"bot": SecretStr("s3cret")})
    holdout = labelled_examples(300, seed=4242)
    try:
        async with run_serve(registry, serve_settings, bus, poll_interval_s=1.0) as serve:
            assert await _until(lambda: serve.core.ready, 60), "no first model"
            first = serve.core.version
            assert first == "v1"
            acc_first = student_accuracy(registry, first, holdout)

            bot = Chatbot(serve.url, rate=40, feedback_fraction=0.5, feedback_token="s3cret")
            stats = await bot.run(seconds=45)
            # the trainer keeps learning from what arrived; wait for two more swaps
            assert await _until(lambda: len(serve.core.verified) >= 3, 60), trainer.stats
            assert await _until(lambda: serve.core.version == registry.latest(), 20)
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]

            assert stats.requests >= 1500 and stats.failed == 0, stats.errors
            assert stats.feedback_sent > 500 and stats.feedback_failed == 0
            # every version serve loaded was verified against the registry's sha256
            published = {}
            async with bus.consumer([bus.topics.models]) as c:
                for rec in await c.getmany(timeout_ms=2000):
                    ev = decode(ModelPublished, rec.value)
                    published[ev.version] = ev.sha256
            assert len(published) >= 3
            for loaded in serve.core.verified:
                assert loaded.sha256 == registry.load(loaded.version).sha256
                assert loaded.sha256 == published[loaded.version]
            last = serve.core.version
            assert last is not None and last != first
            acc_last = student_accuracy(registry, last, holdout)
            assert acc_last > acc_first + 0.2, (acc_first, acc_last)
            assert await count_records(bus, bus.topics.soft_labels) >= stats.requests * 0.9
            assert trainer.join.stats.hard_labels == stats.feedback_sent
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
