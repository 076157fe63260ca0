"""``stream-distill demo``: broker, teacher bootstrap, every role, synthetic traffic, a report."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from stream_distill.app import with_overrides
from stream_distill.bus.broker import EmbeddedBroker, free_port
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import Settings
from stream_distill.data.synthetic import labelled_examples
from stream_distill.demo.evaluate import count_records, student_accuracy, teacher_accuracy
from stream_distill.demo.procs import RoleProcesses
from stream_distill.demo.traffic import Chatbot, TrafficStats
from stream_distill.demo.view import live_view, summary_table
from stream_distill.registry import ModelStore, open_registry


@dataclass(frozen=True)
class DemoPlan:
    seconds: float
    rate: float
    feedback_fraction: float = 0.5
    holdout_turns: int = 600
    publish_every_s: float = 15.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoPlan:
        seconds = args.seconds or (70.0 if args.quick else 240.0)
        return cls(seconds=seconds, rate=args.rate or 20.0)


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    console = Console(quiet=bool(args.quiet), soft_wrap=True)
    plan = DemoPlan.from_args(args)
    return asyncio.run(_demo(settings, plan, console, args.report))


def _bootstrap(settings: Settings, console: Console) -> Path:
    from stream_distill.teacher.cli import TEACHER_MAX_LENGTH, synthetic_examples, teacher

    target = settings.data_dir / "teachers" / "synthetic"
    console.print(f"[bold]1/4[/] teacher: MiniLM-L6 fine-tuned on synthetic dialogues -> {target}")
    model = teacher(
        synthetic_examples(),
        target,
        base=settings.model.teacher,
        max_length=TEACHER_MAX_LENGTH,
        quiet=console.quiet,
    )
    console.print(
        f"      teacher {model.version}: {len(model.labels)} intents, "
        f"held-out accuracy {model.metrics.get('holdout_accuracy', float('nan')):.3f}"
    )
    return target


async def _demo(
    settings: Settings, plan: DemoPlan, console: Console, report_path: Path | None
) -> int:
    t_start = time.monotonic()
    teacher_dir = await asyncio.to_thread(_bootstrap, settings, console)
    run_dir = settings.data_dir / "demo" / time.strftime("run-%Y%m%d-%H%M%S")
    token = secrets.token_urlsafe(16)
    port = free_port()
    with EmbeddedBroker(settings.broker.host, 0, settings.broker.startup_timeout_s) as broker:
        settings = with_overrides(
            settings,
            {"kafka.bootstrap_servers": broker.bootstrap, "registry.root": run_dir / "registry"},
        )
        console.print(f"[bold]2/4[/] embedded broker on {broker.bootstrap} (pid {broker.pid})")
        env = {
            "SD_SERVE__FEEDBACK_TOKENS": json.dumps({"demo-chatbot": token}),
            "SD_TRAINER__PUBLISH_EVERY_S": str(plan.publish_every_s),
            "SD_TRAINER__PUBLISH_EVERY_STEPS": "1000",
            "SD_TRAINER__HOLDOUT_FRACTION": "0.1",
        }
        procs = RoleProcesses(run_dir, broker.bootstrap, Path(settings.registry.root), env)
        procs.start("trainer", "--teacher-dir", str(teacher_dir))
        procs.start("teacher", "--teacher-dir", str(teacher_dir))
        procs.start("serve", "--host", "127.0.0.1", "--port", str(port))
        try:
            return await _drive(
                settings, plan, console, report_path, procs, port, token, teacher_dir, t_start
            )
        finally:
            procs.stop_all()


async def wait_ready(base: str, procs: RoleProcesses, timeout_s: float = 120.0) -> None:
    """Until serve at ``base`` is ready; raises if a role died or ``timeout_s`` passed."""
    end = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as c:
        while time.monotonic() < end:
            procs.check_alive()
            try:
                if (await c.get("/v2/health/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("serve did not become ready: see the role logs")


async def _drive(
    settings: Settings,
    plan: DemoPlan,
    console: Console,
    report_path: Path | None,
    procs: RoleProcesses,
    port: int,
    token: str,
    teacher_dir: Path,
    t_start: float,
) -> int:
    base = f"http://127.0.0.1:{port}"
    registry = open_registry(settings.registry)
    await wait_ready(base, procs)
    holdout = labelled_examples(plan.holdout_turns, seed=999)  # never sent to serve
    first = registry.list_versions()[0]
    acc_first = await asyncio.to_thread(student_accuracy, registry, first, holdout)
    console.print(
        f"[bold]3/4[/] roles up (logs in {procs.log_dir}); first student {first}: "
        f"held-out accuracy {acc_first:.3f}"
    )
    console.print(
        f"[bold]4/4[/] streaming {plan.rate:g} req/s for {plan.seconds:g}s, "
        f"feedback on {plan.feedback_fraction:.0%} of turns"
    )
    bot = Chatbot(
        base, rate=plan.rate, feedback_fraction=plan.feedback_fraction, feedback_token=token
    )
    traffic = asyncio.create_task(bot.run(plan.seconds))
    await live_view(console, traffic, bot.stats, registry, procs, plan.seconds)
    stats = await traffic
    await asyncio.sleep(1.0)  # let the last feedback and soft labels land
    last = registry.list_versions()[-1]
    acc_last = await asyncio.to_thread(student_accuracy, registry, last, holdout)
    acc_teacher = await asyncio.to_thread(teacher_accuracy, teacher_dir, holdout)
    bus = KafkaBus(settings.kafka, settings.kafka.bootstrap_servers or "")
    report = _report(
        stats,
        registry,
        teacher_scored=await count_records(bus, bus.topics.soft_labels),
        hard_labels=await count_records(bus, bus.topics.hard_labels),
        served=await _served_versions(base),
        acc=(acc_first, acc_last, acc_teacher),
        versions=(first, last),
        wall_s=time.monotonic() - t_start,
    )
    console.print(summary_table(report))
    if report_path:
        await asyncio.to_thread(_write_json, report_path, report)
        console.print(f"report written to {report_path}")
    return 0 if report["failed_requests"] == 0 else 1


async def _served_versions(base: str) -> list[str]:
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as c:
        body = (await c.get("/v1/models")).json()
    return [str(v["version"]) for v in body.get("loaded", [])]


def _report(
    stats: TrafficStats,
    registry: ModelStore,
    *,
    teacher_scored: int,
    hard_labels: int,
    served: list[str],
    acc: tuple[float, float, float],
    versions: tuple[str, str],
    wall_s: float,
) -> dict[str, Any]:
    published = registry.list_versions()
    return {
        "requests": stats.requests,
        "failed_requests": stats.failed,
        "retried_requests": stats.retried,
        "errors": dict(stats.errors),
        "teacher_scored": teacher_scored,
        "hard_labels": hard_labels,
        "feedback_sent": stats.feedback_sent,
        "models_published": len(published),
        "models_swapped": max(0, len(served) - 1),
        "versions_seen_by_clients": stats.versions,
        "student_version_first": versions[0],
        "student_version_last": versions[1],
        "student_accuracy_first": round(acc[0], 4),
        "student_accuracy_last": round(acc[1], 4),
        "teacher_accuracy": round(acc[2], 4),
        "online_accuracy_first_200": round(stats.window_accuracy(first=True), 4),
        "online_accuracy_last_200": round(stats.window_accuracy(first=False), 4),
        "latency_p50_ms": round(stats.percentile(50), 3),
        "latency_p99_ms": round(stats.percentile(99), 3),
        "server_latency_p50_ms": round(stats.percentile(50, server=True), 3),
        "server_latency_p99_ms": round(stats.percentile(99, server=True), 3),
        "wall_seconds": round(wall_s, 1),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
