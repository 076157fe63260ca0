"""One exception tree.

::

    StreamDistillError
    ├── ConfigError            settings that cannot work together
    ├── BrokerError            the embedded broker would not start or answer
    ├── PoisonRecord           a record that cannot be decoded or fails validation (→ dead letters)
    ├── RegistryError          the model store is unusable
    │   └── IntegrityError     a file's sha256 differs from its manifest
    ├── ModelRejected          a candidate model failed verification and was not loaded
    ├── NotReady               serve has no model loaded yet (HTTP 503)
    ├── DeadlineExceeded       a classify request cannot meet its deadline (HTTP 503)
    ├── Overloaded             serve's request queue is full (HTTP 429)
    └── FeedbackUnavailable    the broker did not acknowledge a label (HTTP 503)
"""

from __future__ import annotations


class StreamDistillError(Exception):
    """Base of every error raised on purpose by stream_distill."""


class ConfigError(StreamDistillError):
    """Settings that cannot work together."""


class BrokerError(StreamDistillError):
    """The embedded broker would not start or answer."""


class PoisonRecord(StreamDistillError):
    """A record that cannot be decoded or fails validation."""


class RegistryError(StreamDistillError):
    """The model store is unusable."""


class IntegrityError(RegistryError):
    """A file's sha256 differs from the one its manifest records."""


class ModelRejected(StreamDistillError):
    """A candidate model failed verification and was not loaded."""


class NotReady(StreamDistillError):
    """No model is loaded yet: the caller should retry shortly."""


class DeadlineExceeded(StreamDistillError):
    """The request cannot be answered within its budget; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(StreamDistillError):
    """Too many requests wait already; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FeedbackUnavailable(StreamDistillError):
    """The broker did not acknowledge the label; the client should retry later."""
