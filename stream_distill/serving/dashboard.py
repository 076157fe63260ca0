"""``GET /dashboard`` (one offline HTML page) and ``GET /v1/stats`` (the JSON it polls).

Stats come from Prometheus registries, never from the request path: serve's own
registry, plus the ``/metrics`` of other roles listed in
``ServeSettings.dashboard_sources`` (the trainer's loss and lag, the teacher's
scoring rate), fetched server-side with a short timeout so the page needs no
cross-origin access. Each poll takes at most one sample of the cumulative
counters; rates and latency percentiles are differences between samples, so
history starts when the dashboard is first polled and its first point covers
everything since serve started.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import httpx
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from stream_distill.errors import RegistryError
from stream_distill.serving.service import ServingCore

# Sample names as prometheus_client renders the families defined in metrics/prometheus.py.
REQUESTS = "sd_requests_total"
LATENCY_BUCKET = "sd_request_latency_seconds_bucket"
DEADLINE_MISSES = "sd_deadline_misses_total"
EVENTS_DROPPED = "sd_events_dropped_total"
TRAINER_LOSS = "sd_trainer_loss"
CONSUMER_LAG = "sd_consumer_lag"
TEACHER_SCORED = "sd_teacher_scored_total"
# Optional per-version gauges a source may expose; shown when present.
ONLINE_ACCURACY = "sd_online_accuracy"
ONLINE_AGREEMENT = "sd_teacher_agreement"

HISTORY = 600
"""Samples kept: ten minutes at the page's one-second poll."""
MIN_SAMPLE_GAP_S = 0.5
"""Polls closer than this reuse the last sample (several open tabs cost one sample)."""
MAX_SOURCE_BYTES = 2 * 1024 * 1024
LATENCY_OUTCOMES = frozenset({"ok", "deadline"})
"""Answered requests; invalid bodies and shed requests would flatter the percentiles."""

Key = tuple[str, tuple[tuple[str, str], ...]]


def _flatten(families: Iterable[Any]) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for family in families:
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _by_label(values: Mapping[Key, float], name: str, label: str) -> dict[str, float]:
    return {dict(labels).get(label, ""): v for (n, labels), v in values.items() if n == name}


def _total(values: Mapping[Key, float], name: str) -> float:
    return sum(v for (n, _), v in values.items() if n == name)


def _buckets(values: Mapping[Key, float]) -> dict[float, float]:
    """Cumulative latency bucket counts (upper bound in seconds) over answered outcomes."""
    out: dict[float, float] = {}
    for (n, labels), v in values.items():
        lab = dict(labels)
        if n == LATENCY_BUCKET and lab.get("outcome") in LATENCY_OUTCOMES:
            le = float(lab["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """``histogram_quantile`` over cumulative bucket counts: linear within the bucket.

    None when the histogram is empty; the largest finite bound when ``q`` falls in +Inf.
    """
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = cumulative[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


@dataclass(slots=True)
class Sample:
    t: float
    values: dict[Key, float]
    extra: dict[Key, float]
    """Values read from ``dashboard_sources`` (empty when none answered)."""


@dataclass(slots=True)
class _Source:
    url: str
    ok: bool = False
    error: str | None = None


@dataclass(slots=True)
class StatsTracker:
    """Samples registries on demand and turns consecutive samples into series."""

    core: ServingCore
    metrics: CollectorRegistry
    sources: list[str] = field(default_factory=list)
    timeout_s: float = 1.0
    window_s: float = 60.0
    clock: Callable[[], float] = time.time
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=HISTORY))
    points: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    _status: dict[str, _Source] = field(default_factory=dict)
    _rejected_at: dict[str, float] = field(default_factory=dict)
    _manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        # The baseline: the first poll's point then covers everything since serve started.
        self.samples.append(Sample(self.clock(), {}, {}))

    async def sample(self) -> None:
        async with self._lock:
            now = self.clock()
            if len(self.samples) > 1 and now - self.samples[-1].t < MIN_SAMPLE_GAP_S:
                return
            extra = await self._fetch_sources()
            sample = Sample(self.clock(), _flatten(self.metrics.collect()), extra)
            # Each point is computed once, so a poll costs the same with a full history.
            self.points.append(_point(self.samples[-1], sample))
            self.samples.append(sample)
            for version in self.core.rejected:
                self._rejected_at.setdefault(version, now)

    async def _fetch_sources(self) -> dict[Key, float]:
        if not self.sources:
            return {}
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            parts = await asyncio.gather(*(self._fetch(client, url) for url in self.sources))
        merged: dict[Key, float] = {}
        for part in parts:
            merged.update(part)
        return merged

    async def _fetch(self, client: httpx.AsyncClient, url: str) -> dict[Key, float]:
        status = self._status.setdefault(url, _Source(url))
        try:
            r = await client.get(url)
            r.raise_for_status()
            if len(r.content) > MAX_SOURCE_BYTES:
                raise ValueError(f"more than {MAX_SOURCE_BYTES} bytes")
            values = _flatten(text_string_to_metric_families(r.text))
        except (httpx.HTTPError, ValueError) as exc:
            status.ok, status.error = False, f"{type(exc).__name__}: {exc}"[:200]
            return {}
        status.ok, status.error = True, None
        return values

    async def stats(self) -> dict[str, Any]:
        await self.sample()
        points = list(self.samples)
        series = _series(self.points)
        latest = points[-1]
        start = next((s for s in points if s.t >= latest.t - self.window_s), points[0])
        if start is latest and len(points) > 1:
            start = points[-2]
        return {
            "now": latest.t,
            "window_s": round(latest.t - start.t, 3),
            "serving": self.core.version,
            "ready": self.core.ready,
            "current": _window(start, latest),
            "series": series,
            "timeline": self._timeline(),
            "versions": await asyncio.to_thread(self._versions, latest),
            "sources": [
                {"url": s.url, "ok": s.ok, "error": s.error} for s in self._status.values()
            ],
        }

    def _timeline(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        seen: set[str] = set()
        newest = 0
        for v in self.core.verified:
            number = _version_number(v.version)
            if not events:
                kind = "load"
            elif v.version in seen or number < newest:
                kind = "rollback"
            else:
                kind = "swap"
            seen.add(v.version)
            newest = max(newest, number)
            events.append(
                {
                    "t": v.loaded_at.timestamp(),
                    "kind": kind,
                    "version": v.version,
                    "detail": f"verified in {v.load_s * 1e3:.0f} ms",
                }
            )
        for version, reason in self.core.rejected.items():
            t = self._rejected_at.get(version, self.clock())
            events.append({"t": t, "kind": "rejected", "version": version, "detail": reason})
        return sorted(events, key=lambda e: float(e["t"]))

    def _versions(self, latest: Sample) -> list[dict[str, Any]]:
        online = _by_label(latest.extra, ONLINE_ACCURACY, "version")
        agreement = _by_label(latest.extra, ONLINE_AGREEMENT, "version")
        rows: list[dict[str, Any]] = []
        for version in dict.fromkeys(v.version for v in self.core.verified):
            held = self._manifest(version).get("metrics") or {}
            rows.append(
                {
                    "version": version,
                    "serving": version == self.core.version,
                    "online_accuracy": online.get(version),
                    "teacher_agreement": agreement.get(version, held.get("teacher_agreement")),
                    "holdout_accuracy": held.get("holdout_accuracy"),
                }
            )
        return rows

    def _manifest(self, version: str) -> dict[str, Any]:
        if version not in self._manifests:
            try:
                self._manifests[version] = self.core.registry.read_manifest(version)
            except RegistryError:
                return {}  # pruned or unreachable; asked again next poll
        return self._manifests[version]


def _version_number(version: str) -> int:
    digits = version.lstrip("v")
    return int(digits) if digits.isdigit() else 0


def _window(a: Sample, b: Sample) -> dict[str, Any]:
    """Counter differences between two samples, as the headline numbers."""
    dt = max(b.t - a.t, 1e-9)
    before = _by_label(a.values, REQUESTS, "outcome")
    after = _by_label(b.values, REQUESTS, "outcome")
    outcomes = {k: after[k] - before.get(k, 0.0) for k in sorted(after)}
    answered = sum(v for k, v in outcomes.items() if k in LATENCY_OUTCOMES)
    cum_a, cum_b = _buckets(a.values), _buckets(b.values)
    delta = {le: c - cum_a.get(le, 0.0) for le, c in cum_b.items()}
    return {
        "requests": sum(outcomes.values()),
        "rps": _round(answered / dt),
        "p50_ms": _ms(quantile(0.5, delta)),
        "p99_ms": _ms(quantile(0.99, delta)),
        "outcomes": outcomes,
        "deadline_misses": _total(b.values, DEADLINE_MISSES) - _total(a.values, DEADLINE_MISSES),
        "events_dropped": _total(b.values, EVENTS_DROPPED) - _total(a.values, EVENTS_DROPPED),
        "requests_total": _total(b.values, REQUESTS),
    }


def _point(a: Sample, b: Sample) -> dict[str, Any]:
    """The chart point of the interval between two consecutive samples."""
    w = _window(a, b)
    return {
        "t": round(b.t, 3),
        "rps": w["rps"],
        "p50_ms": w["p50_ms"],
        "p99_ms": w["p99_ms"],
        "deadline_misses": w["deadline_misses"],
        "teacher_sampling": _teacher_rate(a, b, w["rps"]),
        "trainer_loss": {
            k: _round(v) for k, v in _by_label(b.extra, TRAINER_LOSS, "component").items()
        },
        "lag": {k: _round(v) for k, v in _by_label(b.extra, CONSUMER_LAG, "role").items()},
    }


def _series(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Columns of the points; None where a point has nothing to show."""
    out: dict[str, Any] = {
        name: [p[name] for p in points]
        for name in ("t", "rps", "p50_ms", "p99_ms", "deadline_misses", "teacher_sampling")
    }
    for name in ("trainer_loss", "lag"):
        keys = dict.fromkeys(k for p in points for k in p[name])
        out[name] = {k: [p[name].get(k) for p in points] for k in keys}
    return out


def _teacher_rate(a: Sample, b: Sample, rps: float | None) -> float | None:
    """Share of answered requests the teacher scored over the interval (needs a source)."""
    if not any(n == TEACHER_SCORED for n, _ in b.extra) or not rps:
        return None
    scored = _total(b.extra, TEACHER_SCORED) - _total(a.extra, TEACHER_SCORED)
    if scored < 0:
        return None  # the teacher restarted
    return _round(min(1.0, scored / max(b.t - a.t, 1e-9) / rps))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _page() -> str:
    return (resources.files(__package__) / "static" / "dashboard.html").read_text("utf-8")


def dashboard_router(core: ServingCore, metrics: CollectorRegistry) -> APIRouter:
    """``/dashboard`` and ``/v1/stats`` over ``metrics`` (serve's Prometheus registry)."""
    settings = core.settings
    tracker = StatsTracker(
        core,
        metrics,
        list(settings.dashboard_sources),
        timeout_s=settings.dashboard_source_timeout_s,
    )
    router = APIRouter()
    page = _page()

    @router.get("/dashboard")
    async def dashboard() -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @router.get("/v1/stats")
    async def stats() -> Response:
        return JSONResponse(await tracker.stats(), headers={"Cache-Control": "no-store"})

    return router
