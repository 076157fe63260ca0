"""Serve under open-loop HTTP load: latency, capacity, teacher capacity, hot swaps, memory.

One run, three processes: this one builds the real student (MiniLM-L6, layers 0 and 5,
ONNX fp32; a second student from layers 1 and 4 to swap with) into a registry, starts
the serve role (``serve_worker.py``) and drives it with ``loadgen.py`` on loopback.
Writes JSON with:

- ``raw_ort_p50_ms``: onnxruntime ``run`` at batch 1 inside the serve process
  (``predict_p50_ms`` adds tokenisation, from cached turn ids after the first of its
  passes over the same dialogues, and softmax);
- ``http_p50_ms``, ``http_p99_ms``: ``POST /v1/classify`` at 200 req/s, open loop,
  latency from each request's scheduled send time;
- ``max_rps_p99_20ms``: the highest step rate held with p99 <= 20 ms and no failed
  request; ``teacher_max_rps_p99_20ms``: the same for the torch teacher (MiniLM-L6)
  served through the same app as ``stream-distill teacher-serve`` serves it
  (``serve_worker.py --teacher``) in ``teacher_precision`` (``--teacher-precision``,
  default auto, the scorer's default: bfloat16 for batches of 8 or more where the CPU has
  AMX or AVX512-BF16, float32 for smaller ones), and ``student_teacher_ratio``; when the
  teacher holds not even the lowest step, ``student_teacher_ratio_above`` (the student's
  rate over that step's: the ratio is larger);
- ``swap_count``, ``swap_failed_requests``, ``p99_steady_ms``, ``p99_during_swaps_ms``:
  50 hot swaps back to back under 200 req/s;
- ``rss_growth_mb_200_swaps``: serve's RSS after 200 more swaps minus before them.

    .venv/bin/python benchmarks/serving.py --json benchmarks/results/serving.json
    .venv/bin/python benchmarks/serving.py --quick --json serving-quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
P99_LIMIT_MS = 20.0
STUDENT_RATES = (200, 400, 600, 800, 1000, 1200, 1400, 1600, 2000, 2400, 3200)
TEACHER_RATES = (2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 600, 800)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_registry(root: Path, max_length: int, int8: bool) -> None:
    import torch

    from stream_distill.data.synthetic import INTENTS
    from stream_distill.models.export import export_onnx, quantize_int8
    from stream_distill.models.factory import default_tokenizer_json, load_classifier, make_student
    from stream_distill.registry.store import Registry

    torch.set_num_threads(1)
    teacher = load_classifier("minilm", INTENTS)
    registry = Registry(root)
    for layers in ((1, 4), (0, 5)):  # the second is the model served first (the latest)
        onnx = export_onnx(make_student(teacher, layers), max_length)
        if int8:
            onnx = quantize_int8(onnx)  # as the trainer publishes int8 students
        registry.publish(onnx, INTENTS, default_tokenizer_json(), max_length=max_length)


BODIES = 40_000
"""Request bodies, sent in order across the whole run (see :class:`Load`)."""
RAW_DIALOGUES = 500
"""The first bodies' dialogues are the ones ``raw_ort`` runs (serve_worker.py)."""


def write_bodies(path: Path) -> None:
    from stream_distill.data.synthetic import labelled_examples

    lines = []
    for i, ex in enumerate(labelled_examples(BODIES, seed=3)):
        turns = [{"role": t.role, "text": t.text} for t in ex.turns]
        lines.append(json.dumps({"conversation_id": f"c{i}", "turns": turns}))
    path.write_text("\n".join(lines) + "\n")


class Serve:
    """The serve process: one JSON command per line in, one JSON line out."""

    def __init__(
        self,
        registry: Path,
        *,
        teacher: bool,
        settings: dict[str, Any],
        teacher_precision: str = "float32",
    ) -> None:
        cmd = [sys.executable, str(HERE / "serve_worker.py"), "--registry", str(registry)]
        cmd += ["--settings", json.dumps(settings)]
        cmd += ["--teacher", "--teacher-precision", teacher_precision] if teacher else []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()
        self.url: str = self.hello["url"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"serve process ended (rc {self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def send(self, cmd: str, **kw: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: str, **kw: Any) -> dict[str, Any]:
        self.send(cmd, **kw)
        return self._read()

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class Load:
    """One ``loadgen.py`` process (bounded by ``duration_s``; ``stop()`` ends it early).

    Each load starts at the body after the last one any load before it could send (the
    first :data:`RAW_DIALOGUES` belong to ``raw_ort``): the serve role keeps the token ids
    of turns it has seen, and a dialogue sent again would find even its current turn
    there, which live traffic seldom does. The generator's conversations grow one turn per
    body, so the cache finds what it would in live traffic: the earlier turns.
    """

    next_body = RAW_DIALOGUES

    def __init__(self, url: str, bodies: Path, rate: float, duration_s: float, out: Path) -> None:
        self.samples_path = out
        conns = str(int(min(64, max(8, rate / 50))))
        cmd = [sys.executable, str(HERE / "loadgen.py"), "--url", url, "--bodies", str(bodies)]
        cmd += ["--rate", str(rate), "--duration", str(duration_s), "--samples", str(out)]
        cmd += ["--start", str(Load.next_body % BODIES)]
        Load.next_body += int(rate * duration_s)
        self.proc = subprocess.Popen([*cmd, "--connections", conns], stdout=subprocess.PIPE)

    def stop(self) -> None:
        self.proc.terminate()

    def result(self) -> tuple[dict[str, Any], np.ndarray]:
        out, _ = self.proc.communicate(timeout=600)
        if self.proc.returncode != 0:
            raise RuntimeError(f"loadgen failed (rc {self.proc.returncode})")
        return json.loads(out), np.load(self.samples_path)


def load(url: str, bodies: Path, rate: float, duration_s: float, tmp: Path) -> dict[str, Any]:
    summary, _ = Load(url, bodies, rate, duration_s, tmp / f"load-{rate}.npy").result()
    return summary


def passes(step: dict[str, Any]) -> bool:
    held = step["offered_rps"] >= 0.97 * step["rate"]
    return bool(step["failed"] == 0 and held and step["p99_ms"] <= P99_LIMIT_MS)


def max_rate(url: str, bodies: Path, rates: tuple[int, ...], step_s: float, tmp: Path) -> Any:
    """Step the rate up until a step fails; the last passing rate (0 if none) and the steps."""
    best, steps = 0, []
    for rate in rates:
        load(url, bodies, rate, min(1.0, step_s), tmp)  # settle the batcher at this rate
        step = load(url, bodies, rate, step_s, tmp)
        steps.append(step)
        log(f"  {rate} req/s: p50 {step['p50_ms']} p99 {step['p99_ms']} failed {step['failed']}")
        if not passes(step):
            break
        best = rate
    return best, steps


def p99(samples: np.ndarray) -> float:
    ok = samples[samples[:, 2] == 200, 1]
    return round(float(np.percentile(ok, 99)), 3) if len(ok) else float("nan")


def swap_phase(serve: Serve, bodies: Path, n: int, steady_s: float, tmp: Path) -> dict[str, Any]:
    """``n`` swaps back to back inside ``steady_s`` of plain traffic at 200 req/s either side."""
    gen = Load(serve.url, bodies, 200, 600, tmp / "swaps.npy")
    time.sleep(steady_s + 0.5)
    sw = serve.ask("swap", n=n)
    time.sleep(steady_s / 2)
    gen.stop()
    summary, samples = gen.result()
    due = samples[:, 0]
    during = (due >= sw["t_start"]) & (due <= sw["t_end"])
    warm = due >= due[0] + 0.5  # the first half second finds cold connections
    return {
        "swap_count": sw["swaps"],
        "swap_load_failures": sw["failed"],
        "swap_ms": sw["swap_ms"],
        "swap_failed_requests": int((samples[:, 2] != 200).sum()),
        "p99_steady_ms": p99(samples[warm & ~during]),
        "p99_during_swaps_ms": p99(samples[during]),
        "swap_phase_requests": summary["sent"],
    }


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    quick = args.quick
    step_s, http_s = (2.0, 4.0) if quick else (6.0, 20.0)
    n_swaps, n_rss = (6, 12) if quick else (50, 200)
    registry, bodies = tmp / "registry", tmp / "bodies.jsonl"
    log("building the students ...")
    build_registry(registry, args.max_length, args.int8)
    write_bodies(bodies)
    settings = json.loads(args.serve_settings)
    result: dict[str, Any] = {}

    serve = Serve(registry, teacher=False, settings=settings)
    try:
        raw = serve.ask("raw_ort", n=500 if quick else 3000)
        result["raw_ort_p50_ms"] = raw["run"]["p50_ms"]
        result["raw_ort_p99_ms"] = raw["run"]["p99_ms"]
        result["predict_p50_ms"] = raw["predict"]["p50_ms"]
        log(f"raw onnxruntime {raw}")
        load(serve.url, bodies, 200, 2.0, tmp)  # warm-up
        cpu0 = serve.ask("cpu")
        at200 = load(serve.url, bodies, 200, http_s, tmp)
        cpu1 = serve.ask("cpu")
        per_request = {k: (cpu1[k] - cpu0.get(k, 0.0)) / at200["sent"] * 1e6 for k in cpu1}
        # the event loop's CPU per request: parsing, routing, batching, answering, events
        result["loop_cpu_us_per_request"] = round(per_request["MainThread"], 1)
        result["batch_thread_cpu_us_per_request"] = round(
            sum(v for k, v in per_request.items() if k.startswith("sd-batch")), 1
        )
        result["http_p50_ms"], result["http_p99_ms"] = at200["p50_ms"], at200["p99_ms"]
        result["http_failed_200rps"] = at200["failed"]
        result["client_send_lag_p50_ms"] = at200["send_lag_p50_ms"]  # inside http_p50_ms
        log(f"200 req/s: {at200}")
        log("stepping the student's rate ...")
        result["max_rps_p99_20ms"], result["student_steps"] = max_rate(
            serve.url, bodies, STUDENT_RATES[: 3 if quick else None], step_s, tmp
        )
        log("hot swaps under load ...")
        result.update(swap_phase(serve, bodies, n_swaps, 3.0 if quick else 8.0, tmp))
        before = serve.ask("rss")["rss_mb"]
        log(f"{n_rss} swaps for memory (rss before {before} MB) ...")
        rss_swaps = serve.ask("swap", n=n_rss)  # no traffic: bounded caches stay put
        after = serve.ask("rss")["rss_mb"]
        result["rss_before_mb"], result["rss_after_mb"] = before, after
        result[f"rss_growth_mb_{n_rss}_swaps"] = round(after - before, 1)
        result["rss_swap_failures"] = rss_swaps["failed"]
    finally:
        serve.close()

    log("the teacher through the same app ...")
    precision = args.teacher_precision
    result["teacher_precision"] = precision
    teacher = Serve(registry, teacher=True, settings=settings, teacher_precision=precision)
    result["teacher_bfloat16"] = teacher.hello.get("bfloat16")
    try:
        load(teacher.url, bodies, 20, 2.0, tmp)  # warm-up
        result["teacher_max_rps_p99_20ms"], result["teacher_steps"] = max_rate(
            teacher.url, bodies, TEACHER_RATES[: 3 if quick else None], step_s, tmp
        )
    finally:
        teacher.close()
    t = result["teacher_max_rps_p99_20ms"]
    result["student_teacher_ratio"] = round(result["max_rps_p99_20ms"] / t, 2) if t else None
    if not t:  # not even the lowest step held: the teacher's rate is below it
        lowest = TEACHER_RATES[0]
        result["student_teacher_ratio_above"] = round(result["max_rps_p99_20ms"] / lowest, 2)
    return result


def targets(r: dict[str, Any]) -> dict[str, bool]:
    ratio = r["student_teacher_ratio"] or r.get("student_teacher_ratio_above")
    rss = next((v for k, v in r.items() if k.startswith("rss_growth_mb_")), float("inf"))
    return {
        "http_overhead_le_0.5ms": r["http_p50_ms"] - r["raw_ort_p50_ms"] <= 0.5,
        "http_p99_le_3ms": r["http_p99_ms"] <= 3.0,
        "max_rps_ge_1000": r["max_rps_p99_20ms"] >= 1000,
        "teacher_ratio_ge_8": ratio is not None and ratio >= 8,
        "no_failed_swaps": r["swap_failed_requests"] == 0 and r["swap_load_failures"] == 0,
        "swap_p99_le_2x_steady": r["p99_during_swaps_ms"] <= 2 * r["p99_steady_ms"],
        "rss_growth_le_50mb": rss <= 50,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="short smoke run (~1 minute)")
    ap.add_argument("--max-length", type=int, default=48, help="student token budget")
    ap.add_argument(
        "--int8", action="store_true", help="int8 students, quantised as the trainer publishes them"
    )
    ap.add_argument("--serve-settings", default="{}", help="ServeSettings fields, JSON")
    ap.add_argument(
        "--teacher-precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="teacher.precision of the measured teacher (auto: the scorer's default)",
    )
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sd-bench-") as tmp:
        result = run(args, Path(tmp))
    result["targets"] = targets(result)
    result["quick"] = args.quick
    result["int8"] = args.int8
    result["max_length"] = args.max_length
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores"
    result["took_s"] = round(time.monotonic() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
