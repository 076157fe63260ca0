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
    ├── FeedbackUnavailable    the broker did not acknowledge a label (HTTP 503)
    └── FeedbackRejected       feedback refused by policy, nothing written
        ├── UnknownRequest     a request id not answered within the join window (HTTP 404)
        ├── UnknownIntent      an intent the model does not know, from a non-admin (HTTP 422)
        └── RateLimited        the principal posts too fast (HTTP 429)
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


class FeedbackRejected(StreamDistillError):
    """Feedback refused by policy; nothing was written. ``status`` is the HTTP answer."""

    status = 400


class UnknownRequest(FeedbackRejected):
    """The request id was not answered here within the join window."""

    status = 404


class UnknownIntent(FeedbackRejected):
    """The intent is outside the model's labels and the principal may not add intents."""

    status = 422


class RateLimited(FeedbackRejected):
    """The principal exceeded its feedback rate; retry after ``retry_after_s``."""

    status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
