"""The teacher on a live stream: adaptive sampling, and new intents arriving mid-stream.

Both runs drive the whole service as real processes (``benchmarks/distillation.py``'s
``run_strategy``: embedded broker, ``serve``, teacher scorer, trainer, the train split
streamed once over HTTP with feedback on a fraction of the answers, every published
student evaluated on the test split).

1. **Sampling.** The same stream twice with the ``online`` strategy: ``teacher.sampling=all``
   (every request scored) and ``adaptive`` (default ``sample_*`` settings).
   ``teacher_fraction`` = soft labels / requests of the adaptive run;
   ``accuracy_ratio_vs_full_sampling`` = its final student accuracy / the full run's.
   ``runs.adaptive.sampling_reasons`` are the scorer's decisions (its /metrics);
   ``--sampler sample_entropy_above=2.0`` (repeatable) tries other ``sample_*`` settings.
2. **Drift.** The teacher is bootstrapped without the drift intents (fixed per data set,
   listed in the JSON). They join the stream after ``--drift-start`` of the other traffic and
   are mixed into the rest; ``--new-hard-fraction`` of their answers get feedback (others
   ``--hard-fraction``). The ``teacher-updater`` role runs beside the scorer.
   ``new_intent_recall_after_300`` = recall on the drift intents' test turns of the student
   serve answered with when the ``--recall-after``-th drift request was sent (also at the
   end: ``new_intent_recall_final``); ``teacher_updates`` = TeacherPublished records on the
   teacher-models topic other than the seed. ``--drift-rate`` paces this run alone; the
   updater's ``new_intent_min_examples`` (2), ``new_intent_join_examples`` (1) and
   ``update_steps`` (60) come from the flags of those names: short updates that start at
   the second label of an unknown intent and take along every other one seen, refreshed
   as their labels double (``--quick``: 10 requests/s, 40 steps, 60 s settle, for a
   two-core host).

Teachers are cached under ``--data-dir``/teachers: run 1 shares ``distillation.py``'s
(``bench-<data>``, same split, limits and settings), the drift teacher is
``bench-<data>-drift`` (the same as run 1's when no train turn has a drift intent).

    .venv/bin/python benchmarks/teacher_stream.py --data ../shared/data/clinc150 \\
        --json benchmarks/results/teacher_stream.json
    .venv/bin/python benchmarks/teacher_stream.py --data synthetic --quick \\
        --json benchmarks/results/teacher_stream_synthetic.json

``--merge-into benchmarks/results/teacher.json`` also copies the headline keys into
``benchmarks/teacher.py``'s JSON (its simulated ``teacher_fraction`` is kept as
``teacher_fraction_simulated``).
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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import distillation as dist  # benchmarks/ is on sys.path when run as a script
import httpx

from stream_distill.bus import codec
from stream_distill.bus.broker import free_port
from stream_distill.bus.kafka import KafkaBus
from stream_distill.data.synthetic import (
    PROMO_INTENTS,
    LabeledTurn,
    labelled_examples,
)
from stream_distill.demo.evaluate import student_accuracy
from stream_distill.demo.traffic import Chatbot, TrafficStats
from stream_distill.events import TeacherPublished
from stream_distill.registry.store import Registry

# Five CLINC150 intents from different domains, held out of the drift run's teacher.
CLINC_DRIFT = ("book_flight", "credit_score", "recipe", "smart_home", "timezone")
SYNTHETIC_DRIFT = PROMO_INTENTS


# -- data -----------------------------------------------------------------------------------
def drift_intents(args: argparse.Namespace, train: Sequence[LabeledTurn]) -> tuple[str, ...]:
    if args.drift_intents:
        return tuple(s.strip() for s in args.drift_intents.split(",") if s.strip())
    if args.data == "synthetic":
        return SYNTHETIC_DRIFT
    known = {ex.intent for ex in train}
    if set(CLINC_DRIFT) <= known:
        return CLINC_DRIFT
    return tuple(sorted(known - {"oos"})[:: max(1, len(known) // 5)][:5])


def drift_data(
    args: argparse.Namespace,
    train: Sequence[LabeledTurn],
    test: Sequence[LabeledTurn],
    drift: tuple[str, ...],
) -> tuple[list[LabeledTurn], list[LabeledTurn], list[LabeledTurn], list[LabeledTurn]]:
    """(bootstrap set, stream, whole test, drift intents' test)."""
    base = [ex for ex in train if ex.intent not in drift]
    if args.data == "synthetic":
        new = labelled_examples(args.drift_turns, seed=2, intents=drift)
        new_test = labelled_examples(len(test) // 2, seed=998, intents=drift)
        test = [*test, *new_test]
    else:
        new = [ex for ex in train if ex.intent in drift]
        new_test = [ex for ex in test if ex.intent in drift]
    if not new or not new_test:
        raise SystemExit(f"no train or test turns of the drift intents {drift}")
    cut = int(len(base) * args.drift_start)
    rest: list[LabeledTurn] = []
    rng = random.Random(args.seed + 3)
    i = j = 0
    while i < len(base) - cut or j < len(new):  # mixed, each list keeps its order
        left_base, left_new = len(base) - cut - i, len(new) - j
        if rng.random() < left_new / (left_base + left_new):
            rest.append(new[j])
            j += 1
        else:
            rest.append(base[cut + i])
            i += 1
    return base, [*base[:cut], *rest], list(test), new_test


def drift_teacher(base: Sequence[LabeledTurn], train_equal: bool, args: argparse.Namespace) -> Path:
    from stream_distill.teacher.bootstrap import bootstrap_teacher

    name = "synthetic" if args.data == "synthetic" else Path(args.data).name
    target = Path(args.data_dir) / "teachers" / f"bench-{name}{'' if train_equal else '-drift'}"
    started = time.perf_counter()
    model = bootstrap_teacher(
        [(ex.turns, ex.intent) for ex in base],
        target,
        max_length=args.max_length,
        epochs=args.teacher_epochs,
        lr=args.teacher_lr,
    )
    print(f"drift teacher {model.version}: {len(model.labels)} labels, "
          f"ready in {time.perf_counter() - started:.0f} s -> {target}")  # fmt: skip
    return target


# -- run 2's traffic and figures ------------------------------------------------------------
class DriftChatbot(Chatbot):
    """Feedback at ``new_fraction`` on the drift intents; snapshots recall at ``recall_after``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        registry: Registry,
        stream: Sequence[LabeledTurn],
        drift: tuple[str, ...],
        drift_test: Sequence[LabeledTurn],
        args: argparse.Namespace,
    ) -> None:
        super().__init__(
            base_url,
            rate=args.drift_rate,
            feedback_fraction=1.0,  # decided per intent in _feedback
            feedback_token=token,
            turns=self._count(stream),
        )
        self.registry, self.drift, self.drift_test = registry, set(drift), drift_test
        self.hard_fraction, self.new_fraction = args.hard_fraction, args.new_hard_fraction
        self.recall_after, self.eval_every_s = args.recall_after, args.eval_every_s
        self.feedback_rng = random.Random(args.seed + 4)
        self.drift_sent = 0
        self.new_feedback = 0
        self.reached = asyncio.Event()
        self.points: list[dict[str, Any]] = []  # per newly served version
        self.at_mark: dict[str, Any] | None = None
        self._recall: dict[str, float] = {}

    def _count(self, stream: Sequence[LabeledTurn]) -> Iterator[LabeledTurn]:
        for ex in stream:
            if ex.intent in self.drift:
                self.drift_sent += 1
                if self.drift_sent == self.recall_after:
                    self.reached.set()
            yield ex

    async def _feedback(self, client: httpx.AsyncClient, request_id: str, intent: str) -> None:
        new = intent in self.drift
        if self.feedback_rng.random() >= (self.new_fraction if new else self.hard_fraction):
            return
        self.new_feedback += new
        await super()._feedback(client, request_id, intent)

    async def recall(self, version: str) -> float:
        if version not in self._recall:
            self._recall[version] = round(
                await asyncio.to_thread(student_accuracy, self.registry, version, self.drift_test),
                4,
            )
        return self._recall[version]

    async def _served(self) -> dict[str, Any] | None:
        if not self.stats.versions:
            return None
        v = self.stats.versions[-1]  # the newest version serve has answered with
        return {"drift_requests": self.drift_sent, "version": v, "recall": await self.recall(v)}

    async def _watch(self, done: asyncio.Event) -> None:
        next_point = 0.0
        while not done.is_set():
            if self.reached.is_set() and self.at_mark is None:
                self.at_mark = await self._served()
            if time.monotonic() >= next_point:
                point = await self._served()
                if point and (not self.points or self.points[-1]["version"] != point["version"]):
                    self.points.append(point)
                next_point = time.monotonic() + self.eval_every_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.25)

    async def run(self, seconds: float, stop: asyncio.Event | None = None) -> TrafficStats:
        done = asyncio.Event()
        watcher = asyncio.create_task(self._watch(done))
        try:
            return await super().run(seconds, stop)
        finally:
            done.set()
            await watcher


async def teacher_versions(bus: KafkaBus) -> list[dict[str, Any]]:
    """Every TeacherPublished on the teacher-models topic, in order."""
    out: list[dict[str, Any]] = []
    idle = 0
    async with bus.consumer(
        [bus.topics.teacher_models], group_id=None, offset_reset="earliest"
    ) as c:
        while idle < 3:
            got = await c.getmany(timeout_ms=300, max_records=1000)
            idle = 0 if got else idle + 1
            for rec in got:
                e = codec.decode(TeacherPublished, rec.value)
                out.append({"version": e.version, "reason": e.reason, "labels": len(e.labels)})
    return out


async def sampling_reasons(port: int) -> dict[str, int]:
    """The scorer's adaptive sampling decisions by reason, from its /metrics."""
    try:
        async with httpx.AsyncClient(timeout=3.0) as c:
            text = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return {}
    pattern = r'^sd_teacher_sampling_decisions_total\{reason="([a-z_]+)"\} ([0-9.e+]+)$'
    return {m.group(1): int(float(m.group(2))) for m in re.finditer(pattern, text, re.M)}


def teacher_metrics() -> tuple[dict[str, str], dist.Probe]:
    """Env giving the scorer a /metrics port, and a probe reading its sampling decisions."""
    port = free_port()

    async def probe(bus: KafkaBus, registry: Registry) -> dict[str, Any]:
        return {"sampling_reasons": await sampling_reasons(port)}

    return {"SD_TEACHER__METRICS_PORT": str(port)}, probe


# -- the runs -------------------------------------------------------------------------------
def sampler_env(args: argparse.Namespace, mode: str) -> dict[str, str]:
    """``teacher.sampling`` and, for adaptive runs, the ``--sampler`` overrides."""
    env = {"SD_TEACHER__SAMPLING": mode}
    if mode == "adaptive":
        for item in args.sampler:
            key, _, value = item.partition("=")
            if not key.startswith("sample_") or not value:
                raise SystemExit(f"--sampler takes sample_<setting>=<value>, got {item!r}")
            env[f"SD_TEACHER__{key.upper()}"] = value
    return env


async def sampling_run(
    teacher_dir: Path, train: list[LabeledTurn], test: list[LabeledTurn], args: argparse.Namespace
) -> dict[str, Any]:
    runs = {}
    for mode in ("all", "adaptive"):
        env, probe = teacher_metrics()
        runs[mode] = await dist.run_strategy(
            "online", teacher_dir, train, test, args,
            name=f"sampling-{mode}", env={**env, **sampler_env(args, mode)}, probe=probe,
        )  # fmt: skip
    full, adaptive = runs["all"], runs["adaptive"]
    ratio = None
    if full["final_accuracy"] and adaptive["final_accuracy"] is not None:
        ratio = round(adaptive["final_accuracy"] / full["final_accuracy"], 4)
    return {
        "teacher_fraction": round(adaptive["teacher_queries"] / max(1, adaptive["requests"]), 4),
        "full_sampling_fraction": round(full["teacher_queries"] / max(1, full["requests"]), 4),
        "accuracy_ratio_vs_full_sampling": ratio,
        "runs": runs,
    }


async def drift_run(
    train: list[LabeledTurn], test: list[LabeledTurn], args: argparse.Namespace
) -> dict[str, Any]:
    drift = drift_intents(args, train)
    base, stream, whole_test, drift_test = drift_data(args, train, test, drift)
    teacher_dir = drift_teacher(base, len(base) == len(train), args)
    bots: list[DriftChatbot] = []

    def chatbot(url: str, token: str, registry: Registry) -> Chatbot:
        bots.append(DriftChatbot(url, token, registry, stream, drift, drift_test, args))
        return bots[-1]

    async def probe(bus: KafkaBus, registry: Registry) -> dict[str, Any]:
        bot = bots[-1]
        published = await teacher_versions(bus)
        final = registry.list_versions()[-1] if registry.list_versions() else None
        labels = registry.read_manifest(final)["labels"] if final else []
        return {
            "new_intent_recall_final": await bot.recall(final) if final else None,
            "at_mark": bot.at_mark,
            "recall_curve": bot.points,
            "drift_requests": bot.drift_sent,
            "new_intent_feedback": bot.new_feedback,
            "teacher_published": published,
            "student_has_new_intents": sorted(set(drift) & set(labels)),
        }

    env = {
        **sampler_env(args, args.drift_sampling),
        "SD_TEACHER__NEW_INTENT_MIN_EXAMPLES": str(args.new_intent_min_examples),
        "SD_TEACHER__UPDATE_STEPS": str(args.update_steps),
        "SD_TEACHER__NEW_INTENT_JOIN_EXAMPLES": str(args.new_intent_join_examples),
        "SD_SERVE__FEEDBACK_INTENT_ADMINS": json.dumps(["bench"]),
    }
    updater = ("teacher-updater", "--teacher-dir", str(teacher_dir))
    r = await dist.run_strategy(
        "online", teacher_dir, stream, whole_test,
        argparse.Namespace(**{**vars(args), "settle_s": args.drift_settle_s}),
        name="drift", env=env, roles=[updater], chatbot=chatbot, probe=probe,
    )  # fmt: skip
    mark = r.get("at_mark") or {}
    return {
        "drift_intents": list(drift),
        "new_intent_recall_after_300": mark.get("recall"),
        "new_intent_recall_final": r.get("new_intent_recall_final"),
        "teacher_updates": sum(1 for p in r.get("teacher_published", []) if p["reason"] != "seed"),
        "drift_test_turns": len(drift_test),
        "stream_turns": len(stream),
        "run": r,
    }


def _merge(path: Path, result: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    if "teacher_fraction" in data and "teacher_fraction_simulated" not in data:
        data["teacher_fraction_simulated"] = data["teacher_fraction"]
    for key in (
        "teacher_fraction",
        "accuracy_ratio_vs_full_sampling",
        "new_intent_recall_after_300",
        "teacher_updates",
        "drift_intents",
    ):
        if key in result:
            data[key] = result[key]
    data["teacher_stream"] = {"data": result["data"], "source": "benchmarks/teacher_stream.py"}
    path.write_text(json.dumps(data, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder with train/test .csv|.jsonl, or synthetic")
    p.add_argument("--json", type=Path, required=True, help="write the results here")
    p.add_argument("--merge-into", type=Path, help="also copy the headline keys into this JSON")
    p.add_argument("--runs", default="sampling,drift", help="sampling, drift or both")
    p.add_argument("--quick", action="store_true", help="small splits for a smoke run")
    p.add_argument("--train-limit", type=int)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--hard-fraction", type=float, default=0.1)
    p.add_argument("--new-hard-fraction", type=float, default=0.1, help="feedback on drift turns")
    p.add_argument("--drift-intents", help="comma-separated (default: fixed per data set)")
    p.add_argument("--drift-start", type=float, default=0.3, help="share of other traffic first")
    p.add_argument("--drift-turns", type=int, default=600, help="synthetic: drift turns streamed")
    p.add_argument("--recall-after", type=int, default=300, help="drift requests before recall")
    p.add_argument("--drift-sampling", choices=["all", "adaptive"], default="adaptive")
    p.add_argument(
        "--sampler",
        action="append",
        default=[],
        metavar="sample_X=V",
        help="a teacher.sample_* setting for the adaptive runs (repeatable)",
    )
    p.add_argument("--new-intent-min-examples", type=int, default=2)
    p.add_argument("--new-intent-join-examples", type=int, default=1)
    p.add_argument("--update-steps", type=int, default=60)
    p.add_argument("--drift-rate", type=float, help="requests/s of the drift run (default --rate)")
    p.add_argument("--drift-settle-s", type=float, help="the drift run's --settle-s")
    for flag, default in (  # as in distillation.py (same defaults: the same cached teacher)
        ("--rate", 60.0), ("--lr", 1e-3), ("--alpha", 0.9), ("--temperature", 4.0),
        ("--publish-every-s", 20.0), ("--eval-every-s", 15.0), ("--settle-s", 45.0),
        ("--max-length", 32), ("--teacher-epochs", 4), ("--settle-max-s", 240.0),
        ("--replay-size", 20000), ("--curve-limit", 1000),
    ):  # fmt: skip
        p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--idle-replay-factor", type=float, help="trainer.idle_replay_factor")
    p.add_argument("--teacher-lr", type=float, help="default 1e-4 (3e-4 on synthetic data)")
    p.add_argument("--data-dir", type=Path, default=Path(".sd"))
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.quick:  # as distillation.py --quick, so the cached teacher is shared
        args.train_limit = args.train_limit or 1500
        args.test_limit = args.test_limit or 500
        args.settle_s = min(args.settle_s, 25.0)
        args.teacher_epochs = min(args.teacher_epochs, 2)
        args.drift_turns = min(args.drift_turns, 450)
        # On a small host the teacher update needs time: a slower, shorter one, a longer settle.
        args.drift_rate = args.drift_rate or 10.0
        args.update_steps = min(args.update_steps, 40)
        args.drift_settle_s = args.drift_settle_s or 60.0
    args.drift_rate = args.drift_rate or args.rate
    args.drift_settle_s = args.drift_settle_s or args.settle_s
    if args.teacher_lr is None:
        args.teacher_lr = 3e-4 if args.data == "synthetic" else 1e-4
    runs = {r.strip() for r in args.runs.split(",") if r.strip()}
    if not runs or runs - {"sampling", "drift"}:
        raise SystemExit("--runs takes sampling, drift or both")
    started = time.monotonic()
    train = dist._split(args.data, "train", args.train_limit, args.seed)
    test = dist._split(args.data, "test", args.test_limit, args.seed + 1)
    result: dict[str, Any] = {
        "data": "synthetic" if args.data == "synthetic" else Path(args.data).name,
        "train_turns": len(train),
        "test_turns": len(test),
    }
    if "sampling" in runs:
        teacher_dir = dist._teacher(train, args)
        result |= asyncio.run(sampling_run(teacher_dir, train, test, args))
    if "drift" in runs:
        result["drift"] = asyncio.run(drift_run(train, test, args))
        for key in ("drift_intents", "new_intent_recall_after_300", "teacher_updates"):
            result[key] = result["drift"][key]
    result["settings"] = {
        k: v if isinstance(v, int | float | str | list | None) else str(v)
        for k, v in vars(args).items()
        if k not in ("json", "merge_into")  # where the results went is not a setting
    }
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result["wall_s"] = round(time.monotonic() - started, 1)
    summary = {k: v for k, v in result.items() if k not in ("runs", "drift", "settings")}
    print(json.dumps(summary, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.merge_into:
        with contextlib.suppress(json.JSONDecodeError):
            _merge(args.merge_into, result)
    return result


if __name__ == "__main__":
    main()
