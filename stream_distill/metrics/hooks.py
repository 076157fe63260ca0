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

    # feedback
    def on_feedback(self, result: str) -> None:
        """A feedback post ended (accepted, duplicate, unauthorized, invalid, ...)."""

    # consumers
    def on_dead_letter(self, topic: str, reason: str) -> None:
        """A record was parked on the dead-letter topic."""

    # teacher
    def on_teacher_batch(self, size: int, seconds: float) -> None:
        """The teacher scored a batch."""

    # trainer
    def on_train_step(self, losses: Mapping[str, float], examples: int, seconds: float) -> None:
        """One optimizer step with its loss components."""

    def on_publish(self, version: str, accepted: bool) -> None:
        """A candidate was published (accepted) or held back by the gate."""

    def on_consumer_lag(self, role: str, lag: int) -> None:
        """Records behind the end of the log."""
