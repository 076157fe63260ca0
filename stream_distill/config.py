"""One settings tree, read once by the composition root (``app.py``/``cli.py``).

Environment variables use the prefix ``SD_`` and ``__`` between sections, e.g.
``SD_KAFKA__BOOTSTRAP_SERVERS=kafka:9092`` or ``SD_SERVE__PORT=8080``. No other
module reads ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from stream_distill.config_base import Section
from stream_distill.config_learning import TrainerSettings
from stream_distill.config_teacher import TeacherSettings

__all__ = [
    "BrokerSettings",
    "KafkaSettings",
    "ModelSettings",
    "RegistrySettings",
    "ServeSettings",
    "Settings",
    "TeacherSettings",
    "TrainerSettings",
]


class KafkaSettings(Section):
    """How to reach the broker."""

    bootstrap_servers: str | None = Field(
        default=None, description="host:port list of a real Kafka; None starts the embedded broker."
    )
    topic_prefix: str = Field(default="sd.", description="Prefix of every topic name.")
    partitions: int = Field(default=4, ge=1, description="Partitions of topics created if missing.")
    replication_factor: int = Field(default=1, ge=1, description="Replication of created topics.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How clients reach the brokers."
    )
    sasl_mechanism: str | None = Field(default=None, description="e.g. PLAIN, SCRAM-SHA-256.")
    sasl_username: str | None = Field(default=None, description="SASL user (SASL_* protocols).")
    sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (SASL_* protocols)."
    )
    ssl_cafile: Path | None = Field(
        default=None, description="CA bundle for SSL/SASL_SSL (default: the system's)."
    )
    request_timeout_ms: int = Field(
        default=40000, ge=1000, description="Client request timeout (a group join waits this long)."
    )
    max_poll_interval_ms: int = Field(
        default=300000,
        ge=1000,
        description="A group member that does not poll for this long is dropped (rebalance).",
    )
    session_timeout_ms: int = Field(
        default=10000,
        ge=1000,
        description="A member silent this long (e.g. killed) is dropped; its partitions move.",
    )
    heartbeat_interval_ms: int = Field(
        default=3000, ge=100, description="How often a group member heart-beats (< session)."
    )
    commit_timeout_ms: int = Field(
        default=10000,
        ge=100,
        description="A commit stalled this long is skipped (the records come again).",
    )


class BrokerSettings(Section):
    """The embedded Kafka-compatible broker (Tansu) for local use."""

    host: str = Field(
        default="127.0.0.1", description="Loopback address the embedded broker listens on."
    )
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")
    startup_timeout_s: float = Field(
        default=20.0, gt=0, description="How long to wait for the broker to answer metadata."
    )


class ModelSettings(Section):
    """Text formatting and model shapes shared by teacher, student and serve."""

    max_length: int = Field(default=48, ge=8, le=512, description="Student token budget per turn.")
    teacher: str = Field(
        default="minilm",
        description="HF name or path of the teacher; 'minilm' = bundled MiniLM-L6.",
    )
    student_layers: tuple[int, ...] = Field(
        default=(0, 5), description="Teacher layers copied into the student (DistilBERT-style)."
    )
    student_fresh_head: bool = Field(
        default=False, description="Start the student's classifier from noise, not the teacher's."
    )


class ServeSettings(Section):
    """The HTTP serving role."""

    host: str = Field(default="127.0.0.1", description="HTTP listen address.")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    deadline_ms: float = Field(default=200.0, gt=0, description="Default latency budget.")
    intra_op_threads: int = Field(default=1, ge=1, description="onnxruntime intra-op threads.")
    intra_op_spinning: bool = Field(
        default=False,
        description="Let idle onnxruntime threads spin (lower latency, a busy core each).",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", description="onnxruntime graph optimisation level."
    )
    batch_max_size: int = Field(default=8, ge=1, description="Requests batched together at most.")
    batch_workers: int = Field(
        default=2,
        ge=1,
        description=(
            "Threads that run batches side by side (each with intra_op_threads onnxruntime "
            "threads); about one per core the model may use."
        ),
    )
    batch_max_wait_us: int = Field(
        default=0,
        ge=0,
        description="How long a batch waits for company; 0 batches only what already queued.",
    )
    queue_max: int = Field(
        default=256, ge=1, description="Requests waiting for the model; beyond it, 429."
    )
    deadline_policy: Literal["reject", "late_ok"] = Field(
        default="reject",
        description="A request that cannot meet its deadline: 503 at once, or a late answer.",
    )
    redact_emails: bool = Field(default=True, description="Mask e-mail addresses in events.")
    redact_phones: bool = Field(default=True, description="Mask phone numbers in events.")
    redact_cards: bool = Field(default=True, description="Mask card-like digit runs in events.")
    redact_order_ids: tuple[str, ...] = Field(
        default=(),
        description=r"Regexes of order ids masked as [order] in events, e.g. '#?[A-Z]\d{5}'.",
    )
    redact_patterns: dict[str, str] = Field(
        default_factory=dict,
        description="Further masks: name -> regex; a match becomes [name] in events.",
    )
    top_k: int = Field(default=3, ge=1, description="Ranked intents returned per answer.")
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    max_text_chars: int = Field(
        default=2000, ge=1, description="Longest turn accepted (422 beyond; empty text is 422)."
    )
    max_turns: int = Field(default=20, ge=1, description="Most turns per request (422 beyond).")
    event_queue_size: int = Field(default=10000, ge=1, description="Bounded buffer toward Kafka.")
    feedback_tokens: dict[str, SecretStr] = Field(
        default_factory=dict, description="principal -> bearer token allowed to post feedback."
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token of /v1/admin/*; unset disables those routes."
    )
    keep_versions: int = Field(
        default=3, ge=1, description="Verified models kept in memory, so a rollback is instant."
    )
    online_remember: int = Field(
        default=50000, ge=1, description="Answers remembered to match against hard labels."
    )
    online_window: int = Field(
        default=200, ge=1, description="Hard labels per version in its rolling online accuracy."
    )
    auto_rollback: bool = Field(
        default=True, description="Roll back a version whose online accuracy falls clearly."
    )
    # Two versions are scored on different slices of traffic: with 200 labels each, a
    # 0.08 gap is about 2.5 standard errors of the difference, not noise.
    rollback_min_labels: int = Field(
        default=200, ge=1, description="Labels both versions need before an automatic rollback."
    )
    rollback_margin: float = Field(
        default=0.08,
        ge=0,
        le=1,
        description="Online accuracy drop below the predecessor's that triggers a rollback.",
    )
    rollout_mode: Literal["direct", "canary", "shadow"] = Field(
        default="direct",
        description=(
            "How a new version goes live: direct (swap at once), canary (a share of requests"
            " goes to it) or shadow (it answers copies of requests, never returned)."
        ),
    )
    canary_fraction: float = Field(
        default=0.1, gt=0, le=1, description="canary: share of requests the candidate answers."
    )
    shadow_fraction: float = Field(
        default=1.0, gt=0, le=1, description="shadow: share of requests copied to the candidate."
    )
    shadow_queue_size: int = Field(
        default=1000, ge=1, description="Copied requests waiting for a model run; beyond, dropped."
    )
    rollout_auto: bool = Field(
        default=True,
        description=(
            "Promote a candidate within rollback_margin of the live accuracy once both have"
            " rollout_min_labels hard labels; abort it when further below."
        ),
    )
    rollout_min_labels: int = Field(
        default=200, ge=1, description="Labels candidate and live need before an automatic verdict."
    )
    feedback_unknown_request: Literal["accept", "reject"] = Field(
        default="reject",
        description=(
            "Feedback on a request id this replica did not answer within the join window:"
            " reject (404), or accept (several replicas behind one load balancer)."
        ),
    )
    feedback_join_window_s: float = Field(
        default=3600.0, gt=0, description="How long answered request ids are remembered."
    )
    feedback_known_requests: int = Field(
        default=100_000, ge=1, description="Answered request ids remembered at most."
    )
    feedback_intent_admins: tuple[str, ...] = Field(
        default=(),
        description="Principals whose feedback may name an intent the model does not know.",
    )
    feedback_rate_per_s: float = Field(
        default=50.0, gt=0, description="Feedback posts per second per principal (refill)."
    )
    feedback_burst: int = Field(
        default=100, ge=1, description="Feedback posts a principal may send at once."
    )
    feedback_consume_raw: bool = Field(
        default=False,
        description="Also consume the feedback-raw topic inside serve.",
    )
    feedback_group_id: str = Field(
        default="sd-feedback", description="Consumer group of the feedback-raw topic."
    )
    drain_grace_s: float = Field(
        default=2.0,
        ge=0,
        description="On SIGTERM: report not ready, keep answering this long, then finish and exit.",
    )
    dashboard_sources: list[str] = Field(
        default_factory=list,
        description="Other roles' /metrics URLs (trainer, teacher) that /v1/stats folds in.",
    )
    dashboard_source_timeout_s: float = Field(
        default=1.0, gt=0, le=10, description="Per-source fetch timeout of /v1/stats."
    )
    cascade_enabled: bool = Field(
        default=False,
        description="Let unsure answers be replaced by the teacher's (cascade_url) within budget.",
    )
    cascade_default: bool = Field(
        default=False,
        description="Cascade requests that do not say; a request's 'cascade' field decides.",
    )
    cascade_url: str | None = Field(
        default=None, description="Base URL of a teacher-serve, e.g. http://teacher:8001."
    )
    cascade_threshold: float = Field(
        default=0.5, ge=0, le=1, description="Student confidence below which the teacher is asked."
    )
    cascade_min_budget_ms: float = Field(
        default=20.0,
        gt=0,
        description=(
            "Least budget left for a teacher call; the teacher's latency estimate (an EWMA of"
            " its calls) raises it."
        ),
    )

    @model_validator(mode="after")
    def _cascade_has_url(self) -> ServeSettings:
        if self.cascade_enabled and not self.cascade_url:
            raise ValueError("cascade_enabled needs cascade_url")
        return self


class RegistrySettings(Section):
    """The versioned model store."""

    root: str = Field(
        default=".sd/registry",
        description="A directory (local or a shared volume), or s3://bucket/prefix.",
    )
    keep: int = Field(default=10, ge=1, description="Versions kept in the store.")
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph...); None: AWS."
    )
    s3_region: str | None = Field(default=None, description="None: boto3's default chain.")
    s3_access_key_id: str | None = Field(
        default=None, description="None: boto3's chain (AWS_* env, profile, IAM role)."
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret key (default: the standard AWS chain)."
    )

    @field_validator("root", mode="before")
    @classmethod
    def _path_to_str(cls, value: object) -> object:
        # A str, not a Path: Path folds the "//" of s3:// URIs. Overrides still pass Paths.
        return os.fspath(value) if isinstance(value, os.PathLike) else value


class Settings(BaseSettings):
    """The whole tree."""

    model_config = SettingsConfigDict(
        env_prefix="SD_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    data_dir: Path = Field(default=Path(".sd"), description="Where caches and state live.")
