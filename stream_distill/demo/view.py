"""What the demo shows while it runs and when it ends."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from stream_distill.demo.procs import RoleProcesses
from stream_distill.demo.traffic import TrafficStats
from stream_distill.registry.base import ModelStore


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def progress_line(stats: TrafficStats, registry: ModelStore, elapsed: float, total: float) -> str:
    versions = registry.list_versions()
    return (
        f"{elapsed:4.0f}/{total:.0f}s  req {stats.requests} (failed {stats.failed})  "
        f"p50 {_fmt(stats.percentile(50), 1)}ms p99 {_fmt(stats.percentile(99), 1)}ms  "
        f"online acc {_fmt(stats.window_accuracy(first=False), 3)}  "
        f"serving {stats.versions[-1] if stats.versions else '-'} of {len(versions)}"
    )


async def live_view(
    console: Console,
    traffic: asyncio.Task[Any],
    stats: TrafficStats,
    registry: ModelStore,
    procs: RoleProcesses,
    total: float,
    every_s: float = 10.0,
) -> None:
    """A live status line on a terminal; one line every ``every_s`` in a log."""
    start = time.monotonic()

    def line() -> str:
        return progress_line(stats, registry, time.monotonic() - start, total)

    if console.is_terminal and not console.quiet:
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while not traffic.done():
                procs.check_alive()
                live.update(line())
                await asyncio.sleep(0.25)
            live.update(line())
        return
    next_print = start + every_s
    while not traffic.done():
        procs.check_alive()
        if time.monotonic() >= next_print:
            console.print(line())
            next_print += every_s
        await asyncio.sleep(0.25)
    console.print(line())


def summary_table(report: dict[str, Any]) -> Table:
    t = Table(title="demo summary", show_header=True)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for key in (
        "requests",
        "failed_requests",
        "teacher_scored",
        "hard_labels",
        "models_published",
        "models_swapped",
        "student_accuracy_first",
        "student_accuracy_last",
        "teacher_accuracy",
        "online_accuracy_first_200",
        "online_accuracy_last_200",
        "latency_p50_ms",
        "latency_p99_ms",
        "server_latency_p50_ms",
        "server_latency_p99_ms",
        "wall_seconds",
    ):
        t.add_row(key, str(report.get(key)))
    return t
