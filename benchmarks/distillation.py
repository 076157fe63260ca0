"""How close does the streamed student get to its teacher? One run per trainer strategy.

For each strategy the whole service runs as in production: the embedded broker, `serve`,
the teacher scorer (strategies that use one) and the trainer, each its own process. The
train split is streamed ONCE through serve's HTTP API as chatbot traffic; a configurable
fraction of the answers gets the true intent back as user feedback (hard labels). While the
stream flows, every model the trainer publishes is evaluated on the test split, giving a
learning curve; the final figure is the last published model after the stream ended and the
trainer had ``--settle-s`` seconds to catch up.

The teacher is MiniLM-L6 fine-tuned on the train split (``bootstrap-teacher``'s recipe;
cached by a fingerprint of data and settings under ``--data-dir``).

    .venv/bin/python benchmarks/distillation.py --data ../shared/data/clinc150 \
        --json benchmarks/results/distillation.json
    .venv/bin/python benchmarks/distillation.py --data synthetic --quick \
        --json benchmarks/results/distillation_synthetic.json

JSON: ``teacher_accuracy``, ``strategies.<name>.{final_accuracy, curve, teacher_queries,
hard_labels, wall_s, examples_per_s}``, ``student_over_teacher`` (online), ``examples_per_s``
(online trainer: examples per second of optimizer-step time, one thread). A PNG of the curves is
written next to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import secrets
import time
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from stream_distill.bus.broker import EmbeddedBroker, free_port
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import KafkaSettings, TrainerSettings
from stream_distill.data.synthetic import LabeledTurn, labelled_examples
from stream_distill.demo.evaluate import count_records, student_accuracy, teacher_accuracy
from stream_distill.demo.procs import RoleProcesses
from stream_distill.demo.run import wait_ready
from stream_distill.demo.traffic import Chatbot
from stream_distill.registry.store import Registry

TEACHERLESS = {"hard_only", "self"}


# -- data -----------------------------------------------------------------------------------
def _split(data: str, which: str, limit: int | None, seed: int) -> list[LabeledTurn]:
    if data == "synthetic":
        n = limit or (3000 if which == "train" else 800)
        return labelled_examples(n, seed=1 if which == "train" else 999)
    from stream_distill.data.loaders import load_labelled

    folder = Path(data)
    path = next(
        (
            folder / f"{which}{ext}"
            for ext in (".csv", ".jsonl")
            if (folder / f"{which}{ext}").exists()
        ),
        None,
    )
    if path is None:
        raise SystemExit(f"{folder}: needs {which}.csv or {which}.jsonl")
    rows = load_labelled(path)
    random.Random(seed).shuffle(rows)  # a stream mixes intents; the files are grouped by label
    if limit:
        rows = rows[:limit]
    return [
        LabeledTurn(f"{which}-{i}", tuple(turns), label, label, context_dependent=len(turns) > 1)
        for i, (turns, label) in enumerate(rows)
    ]


def _teacher(train: Sequence[LabeledTurn], args: argparse.Namespace) -> Path:
    from stream_distill.teacher.bootstrap import bootstrap_teacher

    name = "synthetic" if args.data == "synthetic" else Path(args.data).name
    target = args.data_dir / "teachers" / f"bench-{name}"
    started = time.perf_counter()
    model = bootstrap_teacher(
        [(ex.turns, ex.intent) for ex in train],
        target,
        max_length=args.max_length,
        epochs=args.teacher_epochs,
        lr=args.teacher_lr,
    )
    print(
        f"teacher {model.version}: {len(model.labels)} labels, "
        f"ready in {time.perf_counter() - started:.0f} s -> {target}"
    )
    return target


# -- one strategy ---------------------------------------------------------------------------
async def _trainer_metrics(port: int) -> dict[str, float] | None:
    """The trainer's own counters (its /metrics), or None while it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=3.0) as c:
            text = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return None
    names = ("sd_trainer_step_seconds_sum", "sd_trainer_examples_total", "sd_trainer_steps_total")
    found = {n: re.search(rf"^{n} ([0-9.e+-]+)$", text, re.M) for n in names}
    return {n: float(m.group(1)) if m else 0.0 for n, m in found.items()}


async def _trainer_examples_per_s(port: int) -> float | None:
    """Examples per second of optimizer-step time, from the trainer's own metrics."""
    got = await _trainer_metrics(port)
    if not got or got["sd_trainer_step_seconds_sum"] <= 0:
        return None
    return got["sd_trainer_examples_total"] / got["sd_trainer_step_seconds_sum"]


async def _settle(port: int, args: argparse.Namespace) -> float:
    """After the stream: at least ``--settle-s``, then until the trainer has taken no step
    for ``--publish-every-s`` + 10 s (its last publish is out), at most ``--settle-max-s``."""
    started = time.monotonic()
    await asyncio.sleep(args.settle_s)
    quiet_for = args.publish_every_s + 10.0
    last, since = -1.0, time.monotonic()
    while time.monotonic() - started < args.settle_max_s:
        got = await _trainer_metrics(port)
        steps = got["sd_trainer_steps_total"] if got else -1.0
        if steps != last:
            last, since = steps, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            break
        await asyncio.sleep(2.0)
    return time.monotonic() - started


class _Curve:
    """Evaluates every newly published version while traffic flows (on the first
    ``limit`` test turns, so evaluating steals little CPU from the service); the final
    version is evaluated on the whole test split."""

    def __init__(
        self, registry: Registry, test: Sequence[LabeledTurn], bot: Chatbot, limit: int
    ) -> None:
        self.registry, self.test, self.bot = registry, test, bot
        self.sample = test[:limit] if limit else test
        self.points: list[tuple[int, float]] = []
        self.seen: dict[str, float] = {}

    async def latest(self, *, full: bool = False) -> tuple[str, float] | None:
        versions = self.registry.list_versions()
        if not versions:
            return None
        v = versions[-1]
        if full:
            return v, await asyncio.to_thread(student_accuracy, self.registry, v, self.test)
        if v not in self.seen:
            got = await asyncio.to_thread(student_accuracy, self.registry, v, self.sample)
            self.seen[v] = got
        return v, self.seen[v]

    async def watch(self, stop: asyncio.Event, every_s: float) -> None:
        while not stop.is_set():
            got = await self.latest()
            if got is not None:
                self.points.append((self.bot.stats.requests, round(got[1], 4)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


ChatbotFactory = Callable[[str, str, Registry], Chatbot]
Probe = Callable[[KafkaBus, Registry], Awaitable[dict[str, Any]]]


async def run_strategy(
    strategy: str,
    teacher_dir: Path,
    train: Sequence[LabeledTurn],
    test: Sequence[LabeledTurn],
    args: argparse.Namespace,
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    roles: Sequence[Sequence[str]] = (),
    chatbot: ChatbotFactory | None = None,
    probe: Probe | None = None,
) -> dict[str, Any]:
    """One run of the whole service; the keywords let other benchmarks vary it.

    ``env`` adds settings for every role, ``roles`` starts more roles (``[role, *args]``),
    ``chatbot(base_url, feedback_token, registry)`` replaces the default traffic, and
    ``probe(bus, registry)`` adds its figures to the result before the broker stops.
    """
    started = time.monotonic()
    name = name or strategy
    run_dir = args.data_dir / "bench" / f"distill-{name}-{time.strftime('%H%M%S')}"
    token, port, metrics_port = secrets.token_urlsafe(16), free_port(), free_port()
    role_env = {
        "SD_SERVE__FEEDBACK_TOKENS": json.dumps({"bench": token}),
        "SD_SERVE__FEEDBACK_RATE_PER_S": "100000",
        "SD_SERVE__FEEDBACK_BURST": "100000",
        "SD_TRAINER__STRATEGY": strategy,
        "SD_TRAINER__LR": str(args.lr),
        "SD_TRAINER__ALPHA": str(args.alpha),
        "SD_TRAINER__TEMPERATURE": str(args.temperature),
        "SD_TRAINER__PUBLISH_EVERY_S": str(args.publish_every_s),
        "SD_TRAINER__PUBLISH_EVERY_STEPS": "100000",
        "SD_TRAINER__METRICS_PORT": str(metrics_port),
        "SD_TRAINER__REPLAY_SIZE": str(args.replay_size),
        **(
            {"SD_TRAINER__IDLE_REPLAY_FACTOR": str(args.idle_replay_factor)}
            if args.idle_replay_factor is not None
            else {}
        ),
        "SD_MODEL__MAX_LENGTH": str(args.max_length),
        **(env or {}),
    }
    with EmbeddedBroker("127.0.0.1", 0) as broker:
        registry_dir = run_dir / "registry"
        procs = RoleProcesses(run_dir, broker.bootstrap, registry_dir, role_env)
        procs.start("trainer", "--teacher-dir", str(teacher_dir))
        if strategy not in TEACHERLESS:
            procs.start("teacher", "--teacher-dir", str(teacher_dir))
        for role, *role_args in roles:
            procs.start(role, *role_args)
        procs.start("serve", "--host", "127.0.0.1", "--port", str(port))
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(base, procs, timeout_s=180.0)
            registry = Registry(registry_dir)
            if chatbot is not None:
                bot = chatbot(base, token, registry)
            else:
                bot = Chatbot(
                    base,
                    rate=args.rate,
                    feedback_fraction=args.hard_fraction,
                    feedback_token=token,
                    turns=iter(train),
                )
            curve = _Curve(registry, test, bot, args.curve_limit)
            done = asyncio.Event()
            watcher = asyncio.create_task(curve.watch(done, args.eval_every_s))
            stats = await bot.run(seconds=10**9)
            settled = await _settle(metrics_port, args)  # the trainer catches up, publishes
            done.set()
            await watcher
            procs.check_alive()
            final = await curve.latest(full=True)
            eps = await _trainer_examples_per_s(metrics_port)
            bus = KafkaBus(KafkaSettings(), broker.bootstrap)
            queries = await count_records(bus, bus.topics.soft_labels)
            hard = await count_records(bus, bus.topics.hard_labels)
            extra = await probe(bus, registry) if probe is not None else {}
        finally:
            procs.stop_all()
    result = {
        "final_accuracy": round(final[1], 4) if final else None,
        "final_version": final[0] if final else None,
        "curve": [list(p) for p in curve.points],
        "requests": stats.requests,
        "failed_requests": stats.failed,
        "teacher_queries": queries,
        "hard_labels": hard,
        "examples_per_s": round(eps, 1) if eps else None,
        "settle_s": round(settled, 1),
        "wall_s": round(time.monotonic() - started, 1),
        **extra,
    }
    print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'curve'})}")
    return result


# -- report ---------------------------------------------------------------------------------
def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, r in result["strategies"].items():
        if r["curve"]:
            xs, ys = zip(*r["curve"], strict=True)
            ax.plot(xs, ys, marker=".", label=name)
    ax.axhline(result["teacher_accuracy"], color="grey", linestyle="--", label="teacher")
    ax.set_xlabel("requests streamed")
    ax.set_ylabel("test accuracy of the served student")
    ax.set_title(f"Streaming distillation on {result['data']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _strategies(requested: str | None) -> list[str]:
    field = TrainerSettings.model_fields["strategy"].annotation
    known = list(typing.get_args(field))
    if not requested:
        return known
    chosen = [s.strip() for s in requested.split(",") if s.strip()]
    unknown = set(chosen) - set(known)
    if unknown:
        raise SystemExit(f"unknown strategies {sorted(unknown)}; known: {known}")
    return chosen


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder with train/test .csv|.jsonl, or synthetic")
    p.add_argument("--json", type=Path, help="write the results here (and a .png beside it)")
    p.add_argument("--strategies", help="comma-separated (default: every trainer strategy)")
    p.add_argument("--quick", action="store_true", help="small splits for a smoke run")
    p.add_argument("--train-limit", type=int)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--hard-fraction", type=float, default=0.1)
    p.add_argument("--rate", type=float, default=60.0, help="requests/s streamed")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--publish-every-s", type=float, default=20.0)
    p.add_argument("--eval-every-s", type=float, default=15.0)
    p.add_argument("--curve-limit", type=int, default=1000, help="test turns per curve point")
    p.add_argument("--replay-size", type=int, default=20000, help="trainer.replay_size")
    p.add_argument(
        "--idle-replay-factor", type=float, help="trainer.idle_replay_factor (default: its own)"
    )
    p.add_argument("--settle-s", type=float, default=45.0, help="at least this after the stream")
    p.add_argument(
        "--settle-max-s", type=float, default=240.0, help="at most this for the trainer to finish"
    )
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--teacher-lr", type=float, help="default 1e-4 (3e-4 on synthetic data)")
    p.add_argument("--teacher-only", action="store_true", help="fine-tune the teacher only")
    p.add_argument("--data-dir", type=Path, default=Path(".sd"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.train_limit = args.train_limit or 1500
        args.test_limit = args.test_limit or 500
        args.settle_s = min(args.settle_s, 25.0)
        args.teacher_epochs = min(args.teacher_epochs, 2)
    if args.teacher_lr is None:
        args.teacher_lr = 3e-4 if args.data == "synthetic" else 1e-4
    strategies = _strategies(args.strategies)

    train = _split(args.data, "train", args.train_limit, args.seed)
    test = _split(args.data, "test", args.test_limit, args.seed + 1)
    teacher_dir = _teacher(train, args)
    if args.teacher_only:
        return {"teacher_dir": str(teacher_dir)}
    acc_teacher = teacher_accuracy(teacher_dir, test)
    print(f"teacher test accuracy {acc_teacher:.4f} on {len(test)} turns")

    runs = {s: asyncio.run(run_strategy(s, teacher_dir, train, test, args)) for s in strategies}
    online = runs.get("online", {})
    result: dict[str, Any] = {
        "data": "synthetic" if args.data == "synthetic" else Path(args.data).name,
        "teacher_accuracy": round(acc_teacher, 4),
        "strategies": runs,
        "student_over_teacher": (
            round(online["final_accuracy"] / acc_teacher, 4)
            if online.get("final_accuracy") and acc_teacher
            else None
        ),
        "examples_per_s": online.get("examples_per_s"),
        "train_turns": len(train),
        "test_turns": len(test),
        "settings": {
            k: getattr(args, k)
            for k in (
                "hard_fraction",
                "rate",
                "lr",
                "alpha",
                "temperature",
                "max_length",
                "publish_every_s",
                "settle_s",
                "settle_max_s",
                "replay_size",
                "idle_replay_factor",
                "curve_limit",
                "teacher_epochs",
                "teacher_lr",
            )
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "strategies"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _plot(result, args.json.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
