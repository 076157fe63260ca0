"""Classify latency of serve with a real MiniLM-derived student (2 layers, ONNX, fp32).

Measures (a) the ONNX session alone, batch 1, and (b) ``POST /v1/classify`` over real HTTP
on loopback, sequential requests, request events on. Writes JSON with the keys
``onnx_p50_ms``, ``onnx_p99_ms``, ``http_p50_ms``, ``http_p99_ms``, ``requests``,
``failed``, ``model_mb``.

    .venv/bin/python benchmarks/serve_latency.py --json benchmarks/results/serve_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.progress import Progress

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _student_version(root: Path, max_length: int) -> Any:
    import torch

    from stream_distill.data.synthetic import INTENTS
    from stream_distill.models.export import export_onnx
    from stream_distill.models.factory import (
        default_tokenizer_json,
        load_classifier,
        make_student,
    )
    from stream_distill.registry.store import Registry

    torch.set_num_threads(1)
    teacher = load_classifier("minilm", INTENTS)
    student = make_student(teacher, (0, 5))
    onnx = export_onnx(student, max_length)
    return Registry(root).publish(onnx, INTENTS, default_tokenizer_json(), max_length=max_length)


def _pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 3)


async def _http(
    root: Path, n: int, texts: list[list[dict[str, str]]], progress: Progress
) -> tuple[list[float], int]:
    from stream_distill.bus.base import Topics
    from stream_distill.bus.memory import MemoryBus
    from stream_distill.config import ServeSettings
    from stream_distill.registry.store import Registry
    from stream_distill.serving.runner import run_serve

    bus = MemoryBus(Topics())
    lat: list[float] = []
    failed = 0
    async with (
        run_serve(Registry(root), ServeSettings(port=0), bus) as serve,
        httpx.AsyncClient(base_url=serve.url) as client,
    ):
        await serve.core.wait_ready(30)
        task = progress.add_task("HTTP classify", total=n)
        for i in range(n):
            progress.advance(task)
            body = {"conversation_id": f"c{i}", "turns": texts[i % len(texts)]}
            t0 = time.perf_counter()
            r = await client.post("/v1/classify", json=body)
            lat.append((time.perf_counter() - t0) * 1000)
            failed += r.status_code != 200
    return lat, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress, JSON only")
    args = ap.parse_args()
    progress = Progress(disable=args.quiet, transient=True)

    from stream_distill.config import ServeSettings
    from stream_distill.data.synthetic import labelled_examples
    from stream_distill.serving.session import StudentSession

    with tempfile.TemporaryDirectory() as tmp, progress:
        root = Path(tmp) / "registry"
        if not args.quiet:
            progress.console.print("building and exporting the student ...")
        mv = _student_version(root, args.max_length)
        session = StudentSession.from_version(mv, ServeSettings())
        examples = labelled_examples(500, seed=3)
        onnx_lat = []
        for ex in progress.track(examples * 4, description="ONNX session"):
            t0 = time.perf_counter()
            session.predict([ex.turns])
            onnx_lat.append((time.perf_counter() - t0) * 1000)
        turns = [[t.model_dump() for t in ex.turns] for ex in examples]
        http_lat, failed = asyncio.run(_http(root, args.requests, turns, progress))
    result = {
        "onnx_p50_ms": _pct(onnx_lat, 50),
        "onnx_p99_ms": _pct(onnx_lat, 99),
        "http_p50_ms": _pct(http_lat, 50),
        "http_p99_ms": _pct(http_lat, 99),
        "requests": args.requests,
        "failed": failed,
        "model_mb": round(len(mv.model) / 2**20, 1),
        "max_length": args.max_length,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
