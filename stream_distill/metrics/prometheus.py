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
        self.rollouts = Counter(
            "sd_rollouts", "Canary/shadow rollout changes.", ["mode", "action"], registry=r
        )
        self.rollout_answers = Counter(
            "sd_rollout_answers", "Answers during a rollout, per version, returned or mirrored.",
            ["version", "path"], registry=r,
        )  # fmt: skip
        self.rollout_comparisons = Counter(
            "sd_rollout_comparisons", "Requests both rollout models ran, by (dis)agreement.",
            ["version", "result"], registry=r,
        )  # fmt: skip
        self.rollout_accuracy = Gauge(
            "sd_rollout_accuracy", "Rolling accuracy on the rollout's labelled requests (0..1).",
            ["version"], registry=r,
        )  # fmt: skip
        self.rollout_labels = Gauge(
            "sd_rollout_labels", "Hard labels matched to rollout answers, per version.",
            ["version"], registry=r,
        )  # fmt: skip
        self.mirror_dropped = Counter(
            "sd_mirror_dropped", "Request copies not run by the other rollout model.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.cascade = Counter(
            "sd_cascade", "Cascaded requests by outcome (answered: by the teacher).", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.cascade_teacher_seconds = Histogram(
            "sd_cascade_teacher_seconds", "Teacher calls of the cascade, by how they ended.",
            ["outcome"], buckets=LATENCY_BUCKETS, registry=r,
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
        self.teacher_sampling = Counter(
            "sd_teacher_sampling_decisions",
            "Adaptive sampling decisions by reason.",
            ["reason"],
            registry=r,
        )
        self.teacher_sampling_rate = Gauge(
            "sd_teacher_sampling_rate", "Share of recent requests sent to the teacher.", registry=r
        )
        self.teacher_in_flight = Gauge(
            "sd_teacher_in_flight", "Requests fetched by the scorer, not yet done.", registry=r
        )
        self.teacher_updates = Counter(
            "sd_teacher_updates",
            "Teacher updates by trigger and validation result.",
            ["trigger", "result"],
            registry=r,
        )
        self.teacher_update_seconds = Histogram(
            "sd_teacher_update_seconds",
            "Tune + validate time of a teacher update.",
            buckets=(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
            registry=r,
        )
        self.teacher_swaps = Counter(
            "sd_teacher_swaps", "Teacher versions taken or rejected by scorers.", ["result"],
            registry=r,
        )  # fmt: skip
        self.teacher_relabelled = Counter(
            "sd_teacher_relabelled",
            "Recent requests scored again after an update added intents, and soft labels sent.",
            ["result"],
            registry=r,
        )
        self.teacher_info = Gauge(
            "sd_teacher_info", "1 for the teacher version now scoring.", ["version"], registry=r
        )
        # trainer
        self.trainer_steps = Counter("sd_trainer_steps", "Optimizer steps.", registry=r)
        self.trainer_loss = Gauge(
            "sd_trainer_loss", "Loss of the last step by component.", ["component"], registry=r
        )
        self.trainer_examples = Counter(
            "sd_trainer_examples", "Training examples consumed.", registry=r
        )
        self.trainer_idle_replayed = Counter(
            "sd_trainer_idle_replayed_examples",
            "Examples learned in replay-only steps (while no fresh batch was ready).",
            registry=r,
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
        self.teacher_weight = Gauge(
            "sd_trainer_teacher_weight", "Fusion weight per teacher.", ["teacher"], registry=r
        )
        self.offline_recorded = Gauge(
            "sd_trainer_offline_recorded", "Examples recorded for the next round.", registry=r
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

    def on_rollout(self, version: str, mode: str, action: str) -> None:
        self.rollouts.labels(mode, reason_label(action)).inc()

    def on_rollout_answer(self, version: str, mirrored: bool, agreed: bool | None) -> None:
        self.rollout_answers.labels(version, "mirrored" if mirrored else "returned").inc()
        if agreed is not None:
            self.rollout_comparisons.labels(version, "agree" if agreed else "disagree").inc()

    def on_rollout_accuracy(self, version: str, accuracy: float, labels: int) -> None:
        self.rollout_accuracy.labels(version).set(accuracy)
        self.rollout_labels.labels(version).set(labels)

    def on_mirror_dropped(self, reason: str) -> None:
        self.mirror_dropped.labels(reason_label(reason)).inc()

    def on_cascade(self, outcome: str, teacher_ms: float | None) -> None:
        self.cascade.labels(outcome).inc()
        if teacher_ms is not None:
            self.cascade_teacher_seconds.labels(outcome).observe(teacher_ms / 1e3)

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

    def on_teacher_sampling(self, reason: str, count: int) -> None:
        self.teacher_sampling.labels(reason).inc(count)

    def on_teacher_sampling_rate(self, rate: float) -> None:
        self.teacher_sampling_rate.set(rate)

    def on_teacher_in_flight(self, count: int) -> None:
        self.teacher_in_flight.set(count)

    def on_teacher_update(self, reason: str, accepted: bool, seconds: float) -> None:
        result = "published" if accepted else "rejected"
        self.teacher_updates.labels(reason_label(reason, 1), result).inc()
        self.teacher_update_seconds.observe(seconds)

    def on_teacher_relabel(self, scored: int, published: int) -> None:
        self.teacher_relabelled.labels("scored").inc(scored)
        self.teacher_relabelled.labels("published").inc(published)

    def on_teacher_swap(self, version: str, ok: bool, reason: str = "") -> None:
        self.teacher_swaps.labels("ok" if ok else reason_label(reason)).inc()
        if ok:
            self.teacher_info.clear()
            self.teacher_info.labels(version).set(1)

    # trainer
    def on_train_step(self, losses: Mapping[str, float], examples: int, seconds: float) -> None:
        self.trainer_steps.inc()
        self.trainer_examples.inc(examples)
        self.trainer_step_seconds.observe(seconds)
        for component, value in losses.items():
            self.trainer_loss.labels(component).set(value)

    def on_idle_replay(self, examples: int) -> None:
        self.trainer_idle_replayed.inc(examples)

    def on_publish(self, version: str, accepted: bool) -> None:
        self.publishes.labels("accepted" if accepted else "held").inc()

    def on_consumer_lag(self, role: str, lag: int) -> None:
        self.consumer_lag.labels(role).set(lag)

    def on_teacher_weights(self, weights: Mapping[str, float]) -> None:
        for teacher, weight in weights.items():
            self.teacher_weight.labels(teacher).set(weight)

    def on_offline_record(self, examples: int) -> None:
        self.offline_recorded.set(examples)
