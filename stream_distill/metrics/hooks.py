"""What stages report, as hooks with no-op defaults.

Stages call ``hooks.on_*``; only :mod:`.prometheus` knows metric names. Tests
pass a recording subclass to assert on what a stage reported.
"""

from __future__ import annotations

from collections.abc import Mapping


class Hooks:
    """No-op defaults: a stage works with no metrics at all."""

    # serve
    def on_request(self, outcome: str, latency_ms: float, model_version: str | None) -> None:
        """A classify request ended (outcome: ok, invalid, deadline, shed, error)."""

    def on_batch(self, size: int) -> None:
        """The model ran one batch of this many requests."""

    def on_swap(self, version: str, duration_s: float, ok: bool, reason: str = "") -> None:
        """A candidate model was verified and swapped in (ok) or rejected."""

    def on_model_serving(self, version: str) -> None:
        """This version now answers requests."""

    def on_event_dropped(self, reason: str) -> None:
        """A request event could not be handed to the bus."""

    def on_rollback(self, from_version: str, to_version: str, reason: str) -> None:
        """Serving went back from ``from_version`` to a kept ``to_version``."""

    def on_online_accuracy(self, version: str, accuracy: float, labels: int) -> None:
        """Rolling accuracy of ``version``'s answers against hard labels (``labels`` so far)."""

    def on_rollout(self, version: str, mode: str, action: str) -> None:
        """A canary/shadow rollout of ``version`` changed (started, promoted, aborted, ...)."""

    def on_rollout_answer(self, version: str, mirrored: bool, agreed: bool | None) -> None:
        """During a rollout ``version`` answered a request (or a copy, ``mirrored``);
        ``agreed``: whether it matched the other model, None where only one ran."""

    def on_rollout_accuracy(self, version: str, accuracy: float, labels: int) -> None:
        """Rolling accuracy of ``version`` on the rollout's labelled requests."""

    def on_mirror_dropped(self, reason: str) -> None:
        """A request copy for the other model of a rollout was not run (queue full, error)."""

    def on_cascade(self, outcome: str, teacher_ms: float | None) -> None:
        """An unsure or opted-in request met the cascade (outcome: confident, answered,
        skipped_budget, teacher_error, timeout); ``teacher_ms``: the teacher call, if made."""

    # feedback
    def on_feedback(self, result: str) -> None:
        """A feedback post ended (accepted, duplicate, unauthorized, invalid, ...)."""

    # consumers
    def on_dead_letter(self, topic: str, reason: str) -> None:
        """A record was parked on the dead-letter topic."""

    # teacher
    def on_teacher_batch(self, size: int, seconds: float) -> None:
        """The teacher scored a batch."""

    def on_teacher_sampling(self, reason: str, count: int) -> None:
        """Adaptive sampling decided ``count`` requests for ``reason`` (see teacher.sampling)."""

    def on_teacher_sampling_rate(self, rate: float) -> None:
        """Share of recent requests the adaptive sampler sent to the teacher."""

    def on_teacher_in_flight(self, count: int) -> None:
        """Requests the scorer has fetched but not yet finished (bounded by max_in_flight)."""

    def on_teacher_update(self, reason: str, accepted: bool, seconds: float) -> None:
        """The updater tuned a teacher candidate (trigger ``reason``) and published it or not."""

    def on_teacher_swap(self, version: str, ok: bool, reason: str = "") -> None:
        """A scorer verified and took a teacher version (ok), or rejected it."""

    def on_teacher_relabel(self, scored: int, published: int) -> None:
        """After an update that added intents: recent requests scored, soft labels sent."""

    # trainer
    def on_train_step(self, losses: Mapping[str, float], examples: int, seconds: float) -> None:
        """One optimizer step with its loss components."""

    def on_idle_replay(self, examples: int) -> None:
        """A replay-only step (no fresh batch was ready) learned ``examples`` replayed ones."""

    def on_publish(self, version: str, accepted: bool) -> None:
        """A candidate was published (accepted) or held back by the gate."""

    def on_consumer_lag(self, role: str, lag: int) -> None:
        """Records behind the end of the log."""

    def on_teacher_weights(self, weights: Mapping[str, float]) -> None:
        """multi_teacher: the fusion weight of each teacher (static or adaptive)."""

    def on_offline_record(self, examples: int) -> None:
        """offline: examples recorded for the coming training round."""
