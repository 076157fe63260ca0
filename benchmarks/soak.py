"""Soak: serve as its own process under steady open-loop load, with a hot swap every 30 s.

The embedded broker runs, ``stream-distill serve`` runs as a separate process (real
HTTP, request events on the broker) over a registry holding a MiniLM-derived student
(2 layers, ONNX; ``--student bow`` takes a tiny bag-of-words model instead), and
``benchmarks/loadgen.py`` offers ``--rps`` requests per second in its own process,
counting each latency from the request's scheduled send time. Every ``--swap-every-s``
a new version is published to the registry and announced with ``ModelPublished``, so
serve hot-swaps under load.

Warm-up first: traffic plus enough swaps to fill serve's ``keep_versions`` cache (the
kept sessions are meant to stay), then serve's RSS is sampled (``rss_start_mb``), every
5 s during the run, and at the end (``rss_end_mb``). Target: ``failed == 0`` and
``rss_end_mb <= 1.1 * rss_start_mb``. Writes JSON with ``requests``, ``failed``,
``rss_start_mb``, ``rss_end_mb``, ``swaps``, ``p50_ms``, ``p99_ms`` and more.

serve also keeps two bounded per-request windows: answered request ids for feedback
(``feedback_known_requests``, default 100,000) and answers awaiting hard labels for online
accuracy (``online_remember``, default 50,000). At 200 req/s they take 250-500 s to fill, so
with the defaults a 10-minute soak mostly measures them filling (measured: +71 MB, flat once
full). By default the soak sizes both to the warm-up's requests (``--windows``; 0 keeps
serve's defaults), so they are full when ``rss_start_mb`` is taken and any growth after it is
a leak, not a window filling.

    .venv/bin/python benchmarks/soak.py --json benchmarks/results/soak.json --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from stream_distill.bus.broker import EmbeddedBroker, free_port
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import KafkaSettings
from stream_distill.registry.store import Registry
from stream_distill.testing import announce_model

HERE = Path(__file__).resolve().parent
PREFIX = "soak."
KEEP_VERSIONS = 3  # serve's default ``keep_versions``
RSS_EVERY_S = 5.0
DROPPED = re.compile(r'^sd_events_dropped_total\{reason="([^"]+)"\} (\S+)$', re.M)
OUTCOMES = re.compile(r'^sd_requests_total\{outcome="([^"]+)"\} (\S+)$', re.M)


def build_student(kind: str, max_length: int) -> tuple[bytes, tuple[str, ...], str]:
    """ONNX bytes, labels and tokenizer JSON of the student every version carries."""
    from stream_distill.data.synthetic import INTENTS
    from stream_distill.models.factory import default_tokenizer_json

    labels = tuple(INTENTS)
    if kind == "bow":
        from stream_distill.testing import make_bow_onnx

        return make_bow_onnx(labels), labels, default_tokenizer_json()
    import torch

    from stream_distill.models.export import export_onnx
    from stream_distill.models.factory import load_classifier, make_student

    torch.set_num_threads(1)
    student = make_student(load_classifier("minilm", labels), (0, 5))
    return export_onnx(student, max_length), labels, default_tokenizer_json()


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def write_bodies(path: Path, n: int = 500) -> None:
    from stream_distill.data.synthetic import labelled_examples

    lines = []
    for i, ex in enumerate(labelled_examples(n, seed=7)):
        turns = [t.model_dump(mode="json") for t in ex.turns]
        lines.append(json.dumps({"conversation_id": f"soak-{i}", "turns": turns}))
    path.write_text("\n".join(lines) + "\n")


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path, broker: EmbeddedBroker) -> None:
        self.args, self.tmp, self.broker = args, tmp, broker
        self.registry = Registry(tmp / "registry")
        self.bus = KafkaBus(KafkaSettings(topic_prefix=PREFIX), broker.bootstrap)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bodies = tmp / "bodies.jsonl"
        self.swap_s: list[float] = []
        self.rss: list[tuple[float, float]] = []
        self.proc: subprocess.Popen[bytes] | None = None

    # -- serve process -------------------------------------------------------------------
    def start_serve(self) -> None:
        env = {**os.environ, "SD_KAFKA__TOPIC_PREFIX": PREFIX}
        if self.args.windows:
            env["SD_SERVE__FEEDBACK_KNOWN_REQUESTS"] = str(self.args.windows)
            env["SD_SERVE__ONLINE_REMEMBER"] = str(self.args.windows)
        cmd = [sys.executable, "-m", "stream_distill.cli", "serve", "-q",
               "--bootstrap-servers", self.broker.bootstrap,
               "--registry", str(self.registry.root), "--port", str(self.port)]  # fmt: skip
        with open(self.tmp / "serve.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop_serve(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def serve_log(self) -> str:
        return (self.tmp / "serve.log").read_text(errors="replace")[-3000:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            assert self.proc is not None and self.proc.poll() is None, self.serve_log()
            try:
                if (await client.get("/v2/health/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError("serve not ready:\n" + self.serve_log())

    # -- swaps ---------------------------------------------------------------------------
    async def swap(self, client: httpx.AsyncClient, producer: Any, model: Any) -> None:
        """Publish and announce a new version; wait until serve answers with it."""
        onnx, labels, tok = model
        t0 = time.monotonic()
        mv = await asyncio.to_thread(
            self.registry.publish,
            onnx,
            labels,
            tok,
            parent=self.registry.latest(),
            max_length=self.args.max_length,
        )
        await announce_model(producer, self.bus.topics, mv)
        await asyncio.to_thread(self.registry.prune, KEEP_VERSIONS + 2)
        wanted = f'sd_model_info{{version="{mv.version}"}} 1.0'
        while wanted not in (await client.get("/metrics")).text:
            if time.monotonic() - t0 > max(30.0, self.args.swap_every_s):
                raise TimeoutError(f"{mv.version} not serving:\n" + self.serve_log())
            await asyncio.sleep(0.1)
        self.swap_s.append(round(time.monotonic() - t0, 3))

    # -- load ----------------------------------------------------------------------------
    async def load(self, seconds: float, samples: Path) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "loadgen.py"), "--url", self.url,
            "--bodies", str(self.bodies), "--rate", str(self.args.rps),
            "--duration", str(seconds), "--samples", str(samples),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip

    async def run(self, model: Any) -> dict[str, Any]:
        await self.bus.ensure_topics()
        write_bodies(self.bodies)
        self.start_serve()
        async with self.bus.producer() as producer, httpx.AsyncClient(base_url=self.url) as client:
            await self.wait_ready(client)
            # Warm-up: traffic, and swaps until the kept-versions cache is full.
            warm = await self.load(self.args.warmup_s, self.tmp / "warmup.npy")
            for _ in range(KEEP_VERSIONS - 1):
                await self.swap(client, producer, model)
            await warm.communicate()
            self.swap_s.clear()
            rss_start = rss_mb(self.pid)
            self.rss.append((0.0, rss_start))

            seconds = self.args.minutes * 60
            gen = await self.load(seconds, self.tmp / "samples.npy")
            t0 = time.monotonic()
            next_swap, next_rss = t0 + self.args.swap_every_s, t0 + RSS_EVERY_S
            done = asyncio.create_task(gen.communicate())
            while not done.done():
                now = time.monotonic()
                if now >= next_swap and now - t0 < seconds:
                    next_swap += self.args.swap_every_s
                    await self.swap(client, producer, model)
                if now >= next_rss:
                    next_rss += RSS_EVERY_S
                    self.rss.append((round(now - t0, 1), rss_mb(self.pid)))
                await asyncio.wait({done}, timeout=0.1)
            out, _ = done.result()
            rss_end = rss_mb(self.pid)
            self.rss.append((round(time.monotonic() - t0, 1), rss_end))
            metrics = (await client.get("/metrics")).text
        summary = json.loads(out.decode().strip().splitlines()[-1])
        samples = np.load(self.tmp / "samples.npy")
        return self.report(summary, samples, metrics, rss_start, rss_end, len(model[0]))

    def report(
        self,
        summary: dict[str, Any],
        samples: np.ndarray,
        metrics: str,
        rss_start: float,
        rss_end: float,
        model_bytes: int,
    ) -> dict[str, Any]:
        dropped = {m.group(1): float(m.group(2)) for m in DROPPED.finditer(metrics)}
        return {
            "requests": summary["sent"],
            "failed": summary["failed"],
            "rss_start_mb": rss_start,
            "rss_end_mb": rss_end,
            "rss_max_mb": max(r for _, r in self.rss),
            "rss_ratio": round(rss_end / rss_start, 3),
            "swaps": len(self.swap_s),
            "swap_to_serving_s_max": max(self.swap_s, default=None),
            "p50_ms": summary["p50_ms"],
            "p99_ms": summary["p99_ms"],
            "max_ms": summary["max_ms"],
            "p99_ms_by_minute": p99_by_minute(samples),
            "offered_rps": summary["offered_rps"],
            "statuses": summary["statuses"],
            "events_dropped": dropped,
            "serve_outcomes": {m.group(1): float(m.group(2)) for m in OUTCOMES.finditer(metrics)},
            "target_met": summary["failed"] == 0 and rss_end <= 1.1 * rss_start,
            "minutes": self.args.minutes,
            "rps": self.args.rps,
            "swap_every_s": self.args.swap_every_s,
            "warmup_s": self.args.warmup_s,
            "serve_windows": self.args.windows or "defaults",
            "student": self.args.student,
            "model_mb": round(model_bytes / 2**20, 1),
            "rss_samples": self.rss,
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
        }


def p99_by_minute(samples: np.ndarray) -> list[float | None]:
    """p99 of the answered requests scheduled in each minute of the run."""
    if not len(samples):
        return []
    minute = ((samples[:, 0] - samples[0, 0]) // 60).astype(int)
    out: list[float | None] = []
    for m in range(int(minute.max()) + 1):
        sel = samples[(minute == m) & (samples[:, 2] == 200), 1]
        out.append(round(float(np.percentile(sel, 99)), 3) if len(sel) else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rps", type=float, default=200.0)
    ap.add_argument("--swap-every-s", type=float, default=30.0)
    ap.add_argument("--student", choices=("minilm", "bow"), default="minilm")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--warmup-s", type=float, default=20.0, help="traffic before rss_start")
    ap.add_argument(
        "--windows", type=int, help="serve's per-request windows (default: warm-up requests)"
    )
    args = ap.parse_args()
    if args.windows is None:  # full by the end of the warm-up (see the module docstring)
        args.windows = int(args.rps * args.warmup_s * 0.9)
    print(f"building the {args.student} student ...", flush=True)
    model = build_student(args.student, args.max_length)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        soak = Soak(args, Path(tmp), broker)
        soak.registry.publish(*model, max_length=args.max_length)
        print(f"soaking for {args.minutes} min at {args.rps} rps ...", flush=True)
        try:
            result = asyncio.run(soak.run(model))
        finally:
            soak.stop_serve()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))


if __name__ == "__main__":
    main()
