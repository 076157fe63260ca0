"""`stream-distill demo --quick` as a new user runs it, checked against its report contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REQUIRED = {
    "requests", "failed_requests", "teacher_scored", "hard_labels", "models_published",
    "models_swapped", "student_accuracy_first", "student_accuracy_last", "teacher_accuracy",
    "latency_p50_ms", "latency_p99_ms",
}  # fmt: skip


def test_quick_demo_meets_its_targets(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "stream_distill.cli", "demo", "--quick",
           "--report", str(report), "--data-dir", str(tmp_path / "sd")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(report.read_text())
    assert set(r) >= REQUIRED
    assert r["requests"] > 1000 and r["failed_requests"] == 0
    assert r["models_swapped"] >= 2 and r["models_published"] >= 3
    assert r["teacher_scored"] >= 0.95 * r["requests"]
    assert r["hard_labels"] > 0.4 * r["requests"]
    assert r["student_accuracy_last"] >= r["student_accuracy_first"] + 0.2
    assert r["student_accuracy_last"] >= 0.8 * r["teacher_accuracy"]
    assert r["wall_seconds"] <= 180
    assert "demo summary" in done.stdout
