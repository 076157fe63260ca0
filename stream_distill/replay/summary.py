"""What a replay found: counts, errors by kind, latency percentiles, accuracy, intent changes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_LISTED_CHANGES = 1000
"""Changes kept in the JSON summary (the counts cover them all)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """One replayed request: what the recording says and what came back."""

    line: int
    request_id: str
    conversation_id: str
    recorded: str
    label: str | None
    served: str | None = None
    model_version: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    server_latency_ms: float | None = None
    redacted: bool = False
    """The recorded dialogue holds redaction marks, so serve saw different text back then."""

    @property
    def changed(self) -> bool:
        return self.served is not None and self.served != self.recorded

    @property
    def regressed(self) -> bool:
        """Changed where the comparison is fair (the text served now is the text served then)."""
        return self.changed and not self.redacted


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    file: str
    target: str
    mode: str
    """``http`` (served by the target) or ``kafka`` (events produced, nothing served)."""
    outcomes: tuple[Outcome, ...]
    seconds: float
    labels_sent: int = 0
    label_errors: tuple[tuple[str, int], ...] = ()
    max_schedule_lag_ms: float = 0.0
    expect_same: bool = False
    interrupted: bool = False

    @property
    def served_mode(self) -> bool:
        return self.mode == "http"

    @property
    def failed(self) -> int:
        return sum(o.error is not None for o in self.outcomes)

    @property
    def ok(self) -> int:
        return len(self.outcomes) - self.failed

    @property
    def errors(self) -> dict[str, int]:
        found = Counter(o.error for o in self.outcomes if o.error is not None)
        found.update(dict(self.label_errors))
        return dict(found.most_common())

    @property
    def changes(self) -> list[Outcome]:
        return sorted((o for o in self.outcomes if o.changed), key=lambda o: o.line)

    @property
    def passed(self) -> bool:
        """No failure and no changed intent on unredacted text (what ``--expect-same`` demands)."""
        regressed = any(o.regressed for o in self.outcomes)
        return self.failed == 0 and not regressed and not self.interrupted

    def exit_code(self) -> int:
        if self.expect_same and not self.passed:
            return 1
        return 1 if self.outcomes and self.ok == 0 else 0

    def to_dict(self) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.error is None]
        labelled = [o for o in ok if o.label is not None]
        changes = self.changes
        lat = [o.latency_ms for o in ok if o.latency_ms is not None]
        server = [o.server_latency_ms for o in ok if o.server_latency_ms is not None]
        pairs = Counter(f"{o.recorded} -> {o.served}" for o in changes)
        return {
            "file": self.file,
            "target": self.target,
            "mode": self.mode,
            "requests": len(self.outcomes),
            "ok": len(ok),
            "failed": self.failed,
            "errors": self.errors,
            "labels_sent": self.labels_sent,
            "seconds": round(self.seconds, 3),
            "rate": round(len(self.outcomes) / self.seconds, 2) if self.seconds > 0 else None,
            "max_schedule_lag_ms": round(self.max_schedule_lag_ms, 2),
            "latency_p50_ms": _pct(lat, 50),
            "latency_p95_ms": _pct(lat, 95),
            "latency_p99_ms": _pct(lat, 99),
            "server_latency_p50_ms": _pct(server, 50),
            "server_latency_p99_ms": _pct(server, 99),
            "labelled": len(labelled),
            "accuracy": (
                _ratio(sum(o.served == o.label for o in labelled), len(labelled))
                if self.served_mode
                else None
            ),
            "recorded_accuracy": _ratio(
                sum(o.recorded == o.label for o in labelled), len(labelled)
            ),
            "compared": len(ok) if self.served_mode else 0,
            "changed": len(changes),
            "changed_redacted": sum(o.redacted for o in changes),
            "regressed": sum(o.regressed for o in changes),
            "changed_pairs": dict(pairs.most_common()),
            "changes": [_change(o) for o in changes[:MAX_LISTED_CHANGES]],
            "model_versions": dict(Counter(o.model_version for o in ok if o.model_version)),
            "expect_same": self.expect_same,
            "passed": self.passed,
            "interrupted": self.interrupted,
        }

    def render(self, max_changes: int = 10) -> str:
        d = self.to_dict()
        verb = "replayed" if self.served_mode else "produced"
        lines = [
            f"{verb} {d['requests']} requests from {self.file} to {self.target} "
            f"in {d['seconds']:.2f} s ({d['rate'] or 0:.1f} req/s)",
            f"  ok {d['ok']}  failed {d['failed']}" + _errors_text(d["errors"]),
            f"  latency ms  p50 {_num(d['latency_p50_ms'])}  p95 {_num(d['latency_p95_ms'])}  "
            f"p99 {_num(d['latency_p99_ms'])}"
            + (f"  (server p50 {_num(d['server_latency_p50_ms'])})" if self.served_mode else ""),
        ]
        if d["labelled"] and self.served_mode:
            lines.append(
                f"  accuracy vs recorded labels  {_num(d['accuracy'], 3)} on {d['labelled']} "
                f"labelled (recording: {_num(d['recorded_accuracy'], 3)})"
            )
        elif d["labelled"]:
            lines.append(
                f"  recorded accuracy vs recorded labels  {_num(d['recorded_accuracy'], 3)} "
                f"on {d['labelled']} labelled"
            )
        if self.labels_sent:
            lines.append(f"  labels sent {self.labels_sent}")
        if self.served_mode:
            lines.append(
                f"  served intents changed vs recording  {d['changed']} of {d['compared']}"
            )
            lines.extend(_change_line(o) for o in self.changes[:max_changes])
            if d["changed"] > max_changes:
                lines.append(f"    ... and {d['changed'] - max_changes} more")
            if d["changed_redacted"]:
                lines.append(
                    f"    ({d['changed_redacted']} recorded on text since redacted, so serve saw "
                    "other words then; not held against --expect-same: use --save for a baseline)"
                )
        if self.interrupted:
            lines.append("  interrupted before the end of the file")
        if self.expect_same:
            lines.append(_pass_text(d) if self.passed else _fail_text(d))
        return "\n".join(lines)


def _pass_text(d: dict[str, Any]) -> str:
    text = "PASS: served intents match the recording"
    redacted = d["changed_redacted"]
    return text + (f" (apart from {redacted} recorded on redacted text)" if redacted else "")


def _fail_text(d: dict[str, Any]) -> str:
    why = []
    if d["regressed"]:
        why.append(f"{d['regressed']} served intents differ from the recording")
    if d["failed"]:
        why.append(f"{d['failed']} requests failed")
    if d["interrupted"]:
        why.append("the replay was interrupted")
    return "FAIL (--expect-same): " + "; ".join(why)


def _change(o: Outcome) -> dict[str, Any]:
    return {
        "line": o.line,
        "request_id": o.request_id,
        "conversation_id": o.conversation_id,
        "recorded": o.recorded,
        "served": o.served,
        "label": o.label,
        "model_version": o.model_version,
        "redacted": o.redacted,
    }


def _change_line(o: Outcome) -> str:
    label = f"  (label: {o.label})" if o.label else ""
    mark = "  [redacted]" if o.redacted else ""
    return (
        f"    line {o.line}  conversation {o.conversation_id}  {o.recorded} -> {o.served}"
        f"{label}{mark}"
    )


def _errors_text(errors: dict[str, int]) -> str:
    return "  (" + ", ".join(f"{k}: {n}" for k, n in errors.items()) + ")" if errors else ""


def _pct(xs: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def _ratio(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
