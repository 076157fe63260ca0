"""The serve process of ``benchmarks/serving.py``: the real serve role, steered over stdin.

Runs :func:`stream_distill.serving.runner.run_serve` (FastAPI app, batcher, request
events encoded and handed to a producer that drops them) on a loopback port, then
answers one JSON command per stdin line with one JSON line on stdout:

- ``{"cmd": "raw_ort", "n": 2000}``: onnxruntime ``run`` alone at batch 1 and the
  whole ``predict`` (tokenise + run + softmax), in this process, p50/p99 ms;
- ``{"cmd": "swap", "n": 50}``: ``n`` hot swaps back to back, alternating between two
  registry versions (each a full load: read, sha256, session, verify, swap), with the
  model-loading thread's CPU per swap (``load_cpu_ms_per_swap``);
- ``{"cmd": "rss"}``: resident set size in MB;
- ``{"cmd": "cpu"}``: CPU seconds so far by thread name (``MainThread``: the event loop);
- ``{"cmd": "profile"}``: cProfile the event loop's thread from now on;
  ``{"cmd": "profile", "path": "loop.prof"}``: stop and write the stats there;
- ``{"cmd": "quit"}``.

``--teacher`` serves the torch teacher instead, as ``stream-distill teacher-serve`` does
(:func:`stream_distill.teacher.serve.run_teacher_serve`: the same app and batcher, the
teacher in the student's place, batches of ``teacher.batch_size``, ``teacher.threads``
torch threads, ``--teacher-precision``: ``teacher.precision``); only ``rss`` and ``quit``
apply then.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from stream_distill.bus.memory import MemoryBus, MemoryProducer
from stream_distill.config import ServeSettings, Settings
from stream_distill.data.synthetic import labelled_examples
from stream_distill.heap import freeze_startup
from stream_distill.registry.store import Registry
from stream_distill.serving.http import run
from stream_distill.serving.runner import run_serve
from stream_distill.serving.session import StudentSession


class DropProducer(MemoryProducer):
    """Request events are built and encoded as in production, then dropped (no broker)."""

    async def send(self, topic: str, value: bytes, **kw: Any) -> tuple[int, int]:
        return 0, 0


class DropBus(MemoryBus):
    def producer(self) -> DropProducer:
        return DropProducer(self.log)


def load_teacher_model(settings: Settings) -> Any:
    """MiniLM-L6 over the synthetic intents, as ``teacher-serve`` would load a teacher."""
    from tokenizers import Tokenizer

    from stream_distill.data.synthetic import INTENTS
    from stream_distill.models.factory import default_tokenizer_json, load_classifier, set_threads
    from stream_distill.models.text import TextEncoder
    from stream_distill.teacher.model import TeacherModel

    set_threads(settings.teacher.threads)
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), settings.model.max_length)
    return TeacherModel(load_classifier("minilm", INTENTS), encoder)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds by Python thread name (``MainThread`` runs the event loop), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        out[thread.name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _pcts(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(xs, 50)), 3),
        "p99_ms": round(float(np.percentile(xs, 99)), 3),
    }


def raw_ort(session: StudentSession, n: int) -> dict[str, Any]:
    dialogues = [ex.turns for ex in labelled_examples(500, seed=3)]
    feeds = [session.encoder.encode([d]).as_feed() for d in dialogues]
    ort_session = session._session
    names = [i.name for i in ort_session.get_inputs()]
    out = [o.name for o in ort_session.get_outputs()][:1]
    run_ms, predict_ms = [], []
    for i in range(n):
        feed = feeds[i % len(feeds)]
        t0 = time.perf_counter()
        ort_session.run(out, {k: feed[k] for k in names})
        run_ms.append((time.perf_counter() - t0) * 1e3)
    for i in range(n):
        t0 = time.perf_counter()
        session.predict([dialogues[i % len(dialogues)]])
        predict_ms.append((time.perf_counter() - t0) * 1e3)
    return {"run": _pcts(run_ms), "predict": _pcts(predict_ms)}


async def swaps(core: Any, versions: list[str], n: int) -> dict[str, Any]:
    ok = failed = 0
    took = []
    cpu0 = _thread_cpu_s()
    t_start = time.monotonic()
    for _ in range(n):
        target = versions[0] if core.version == versions[1] else versions[1]
        t0 = time.perf_counter()
        if await core.load_version(target):
            ok += 1
        else:
            failed += 1
        took.append((time.perf_counter() - t0) * 1e3)
    t_end = time.monotonic()
    cpu1 = _thread_cpu_s()
    gc.collect()  # after t_end: a stall of the benchmark's own, not of the swaps
    # CPU of the model-loading thread per swap (read, sha256, session, verify)
    loader = [name for name in cpu1 if name.startswith("sd-load")]
    load_cpu_s = sum(cpu1[k] - cpu0.get(k, 0.0) for k in loader)
    return {
        "swaps": ok,
        "failed": failed,
        "t_start": t_start,
        "t_end": t_end,
        "swap_ms": _pcts(took),
        "load_cpu_ms_per_swap": round(load_cpu_s / max(n, 1) * 1e3, 1),
    }


_profiler: cProfile.Profile | None = None


def profile(path: str | None) -> dict[str, Any]:
    """Profile the event loop's thread from now on, or (``path`` given) stop and write stats."""
    global _profiler
    if path is None:
        _profiler = cProfile.Profile()
        _profiler.enable()
        return {"profiling": True}
    if _profiler is None:
        return {"error": "not profiling"}
    _profiler.disable()
    _profiler.dump_stats(path)
    _profiler = None
    return {"profiling": False, "path": path}


async def commands(core: Any, versions: list[str]) -> None:
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        reply: dict[str, Any]
        if cmd["cmd"] == "raw_ort":
            reply = await asyncio.to_thread(raw_ort, core.session, cmd.get("n", 2000))
        elif cmd["cmd"] == "swap":
            reply = await swaps(core, versions[-2:], cmd["n"])
        elif cmd["cmd"] == "cpu":
            reply = _thread_cpu_s()
        elif cmd["cmd"] == "profile":
            reply = profile(cmd.get("path"))
        elif cmd["cmd"] == "rss":
            gc.collect()
            reply = {"rss_mb": round(_rss_mb(), 1)}
        elif cmd["cmd"] == "quit":
            return
        else:
            reply = {"error": f"unknown command {cmd['cmd']}"}
        print(json.dumps(reply), flush=True)


async def main_async(args: argparse.Namespace) -> None:
    settings = Settings()
    serve_settings = ServeSettings(**json.loads(args.settings))
    if args.teacher:
        from stream_distill.teacher.serve import run_teacher_serve

        model = await asyncio.to_thread(load_teacher_model, settings)
        serve_settings = serve_settings.model_copy(
            update={"batch_max_size": settings.teacher.batch_size}
        )
        precision = args.teacher_precision
        async with run_teacher_serve(
            model, serve_settings, host="127.0.0.1", port=0, precision=precision
        ) as t:
            from stream_distill.models.precision import use_bfloat16

            freeze_startup()  # as the teacher-serve role does once it is up
            hello = {
                "url": t.url,
                "version": t.core.version,
                "precision": precision,
                "bfloat16": use_bfloat16(precision),  # what "auto" came to
            }
            print(json.dumps(hello), flush=True)
            await commands(t.core, [])
        return
    registry = Registry(args.registry)
    async with run_serve(
        registry, serve_settings, DropBus(), host="127.0.0.1", port=0, poll_interval_s=3600
    ) as serve:
        core = serve.core
        if not await core.wait_ready(60):
            raise SystemExit("no model loaded")
        freeze_startup()  # as the serve role does once it is up
        print(json.dumps({"url": serve.url, "version": core.version}), flush=True)
        await commands(core, registry.list_versions())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--teacher", action="store_true", help="serve the torch teacher")
    ap.add_argument(
        "--teacher-precision",
        choices=("auto", "float32", "bfloat16"),
        default=Settings().teacher.precision,
        help="teacher.precision with --teacher (default: the setting's)",
    )
    ap.add_argument("--settings", default="{}", help="ServeSettings fields, JSON")
    args = ap.parse_args()
    run(main_async(args))  # the event loop `stream-distill serve` runs on (uvloop)


if __name__ == "__main__":
    main()
