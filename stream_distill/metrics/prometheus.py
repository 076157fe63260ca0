"""The one module that names metrics: :class:`Hooks` backed by prometheus_client.

Every metric is registered on the :class:`CollectorRegistry` given to the
constructor (a fresh one per app, so tests can build many). Free-text reasons
are reduced to their leading words so label cardinality stays bounded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream_distill.metrics.hooks import Hooks

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
)  # fmt: skip
"""Seconds, 0.5 ms to 1 s: a CPU student answers in a few ms; the deadline is ~200 ms."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWAP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TEACHER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_WORD_RE = re.compile(r"[a-z0-9_-]+")


def reason_label(reason: str, words: int = 3) -> str:
    """A bounded label value from a free-text reason: its first words before any ``:``.

    ``"integrity: v3/model.onnx differs"`` → ``integrity``; ``"not JSON: ..."`` → ``not_json``.
    """
    found = _WORD_RE.findall(reason.split(":", 1)[0].lower())[:words]
    return "_".join(found)[:60] or "unknown"


class PrometheusHooks(Hooks):
    """Hooks that update ``sd_*`` metrics on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # serve
        self.request_latency = Histogram(
            "sd_request_latency_seconds",
            "Server-side latency of classify requests.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "sd_requests", "Classify requests by outcome.", ["outcome"], registry=r
        )
        self.deadline_misses = Counter(
            "sd_deadline_misses", "Requests answered after their deadline.", registry=r
        )
        self.batch_size = Histogram(
            "sd_batch_size", "Requests per model run.", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "sd_model_info", "1 for the model version now serving.", ["version"], registry=r
        )
        self.swaps = Counter("sd_model_swaps", "Models verified and swapped in.", registry=r)
        self.swap_duration = Histogram(
            "sd_model_swap_duration_seconds",
            "Load + verify + swap time of a candidate model.",
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.swap_failures = Counter(
            "sd_model_swap_failures", "Candidate models rejected.", ["reason"], registry=r
        )
        self.events_dropped = Counter(
            "sd_events_dropped", "Request events not handed to the bus.", ["reason"], registry=r
        )
        self.rollbacks = Counter(
            "sd_rollbacks", "Returns to an earlier kept version.", ["reason"], registry=r
        )
        self.online_accuracy = Gauge(
            "sd_online_accuracy",
            "Rolling accuracy of served answers against hard labels, per version (0..1).",
            ["version"],
            registry=r,
        )
        self.online_labels = Gauge(
            "sd_online_labels", "Hard labels matched to answers, per version.", ["version"],
            registry=r,
        )  # fmt: skip
        # feedback
        self.feedback = Counter("sd_feedback", "Feedback posts by result.", ["result"], registry=r)
        # consumers
        self.dead_letters = Counter(
            "sd_dead_letters", "Records parked on the dead-letter topic.", ["topic", "reason"],
            registry=r,
        )  # fmt: skip
        # teacher
        self.teacher_scored = Counter(
            "sd_teacher_scored", "Requests scored by the teacher.", registry=r
        )
        self.teacher_batch_seconds = Histogram(
            "sd_teacher_batch_seconds",
            "Teacher time per scored batch.",
            buckets=TEACHER_BUCKETS,
            registry=r,
        )
        # trainer
        self.trainer_steps = Counter("sd_trainer_steps", "Optimizer steps.", registry=r)
        self.trainer_loss = Gauge(
            "sd_trainer_loss", "Loss of the last step by component.", ["component"], registry=r
        )
        self.trainer_examples = Counter(
            "sd_trainer_examples", "Training examples consumed.", registry=r
        )
        self.trainer_step_seconds = Histogram(
            "sd_trainer_step_seconds", "Wall time per optimizer step.", registry=r
        )
        self.publishes = Counter(
            "sd_publishes", "Candidate models by gate decision.", ["result"], registry=r
        )
        self.consumer_lag = Gauge(
            "sd_consumer_lag", "Records behind the end of the log.", ["role"], registry=r
        )

    # serve
    def on_request(self, outcome: str, latency_ms: float, model_version: str | None) -> None:
        self.requests.labels(outcome).inc()
        self.request_latency.labels(outcome).observe(latency_ms / 1000.0)
        if outcome == "deadline":
            self.deadline_misses.inc()

    def on_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def on_swap(self, version: str, duration_s: float, ok: bool, reason: str = "") -> None:
        self.swap_duration.observe(duration_s)
        if ok:
            self.swaps.inc()
        else:
            self.swap_failures.labels(reason_label(reason)).inc()

    def on_model_serving(self, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version).set(1)

    def on_event_dropped(self, reason: str) -> None:
        self.events_dropped.labels(reason_label(reason)).inc()

    def on_rollback(self, from_version: str, to_version: str, reason: str) -> None:
        self.rollbacks.labels(reason_label(reason)).inc()

    def on_online_accuracy(self, version: str, accuracy: float, labels: int) -> None:
        self.online_accuracy.labels(version).set(accuracy)
        self.online_labels.labels(version).set(labels)

    # feedback
    def on_feedback(self, result: str) -> None:
        self.feedback.labels(reason_label(result)).inc()

    # consumers
    def on_dead_letter(self, topic: str, reason: str) -> None:
        self.dead_letters.labels(topic, reason_label(reason)).inc()

    # teacher
    def on_teacher_batch(self, size: int, seconds: float) -> None:
        self.teacher_scored.inc(size)
        self.teacher_batch_seconds.observe(seconds)

    # trainer
    def on_train_step(self, losses: Mapping[str, float], examples: int, seconds: float) -> None:
        self.trainer_steps.inc()
        self.trainer_examples.inc(examples)
        self.trainer_step_seconds.observe(seconds)
        for component, value in losses.items():
            self.trainer_loss.labels(component).set(value)

    def on_publish(self, version: str, accepted: bool) -> None:
        self.publishes.labels("accepted" if accepted else "held").inc()

    def on_consumer_lag(self, role: str, lag: int) -> None:
        self.consumer_lag.labels(role).set(lag)
