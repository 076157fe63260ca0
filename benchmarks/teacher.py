"""Teacher scorer throughput on the real scorer and the real (embedded) broker.

Produces ``--requests`` synthetic request events once, then runs the real
:class:`~stream_distill.teacher.scorer.TeacherScorer` over them once per configuration
(threads × batch size × attention × precision, each in a fresh consumer group) and times
it from the start of its first batch to its last acknowledged label. The teacher is the
bootstrapped one if cached (``.sd/teachers/synthetic``), else MiniLM-L6 with a fresh head
over the synthetic intents. Optional variants: sorting a batch by length into sub-batches
(``--sorted-chunk``), dynamic int8 Linear layers (``--int8``).

Keys: ``teacher_rps`` (best configuration), ``best``, ``runs`` (every configuration),
``teacher_fraction`` (the adaptive sampler's share on a synthetic stream, see
``_sampling_fraction``), ``requests``, ``teacher``, ``max_length``, ``machine``.

    .venv/bin/python benchmarks/teacher.py --json benchmarks/results/teacher.json
    .venv/bin/python benchmarks/teacher.py --json teacher-quick.json --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

from stream_distill.bus import codec
from stream_distill.bus.broker import EmbeddedBroker
from stream_distill.bus.kafka import KafkaBus
from stream_distill.config import KafkaSettings, TeacherSettings
from stream_distill.data.synthetic import INTENTS, labelled_examples
from stream_distill.events import RequestEvent, Turn
from stream_distill.metrics.hooks import Hooks
from stream_distill.teacher.model import TeacherModel, TeacherOutput
from stream_distill.teacher.sampling import AdaptiveSampler
from stream_distill.teacher.scorer import TeacherScorer
from stream_distill.testing import FakeClock, eventually

CACHED_TEACHER = Path(".sd/teachers/synthetic")


class SortedTeacher(TeacherModel):
    """Sorts a batch by text length and scores it in sub-batches of ``chunk`` (less padding)."""

    chunk = 32

    def predict(
        self, dialogues: Sequence[Sequence[Turn]], *, attention: bool = True
    ) -> TeacherOutput:
        order = sorted(range(len(dialogues)), key=lambda i: sum(len(t.text) for t in dialogues[i]))
        logits = np.zeros((len(dialogues), len(self.labels)), dtype=np.float32)
        weights: list[list[float]] = [[] for _ in dialogues]
        for start in range(0, len(order), self.chunk):
            idx = order[start : start + self.chunk]
            out = super().predict([dialogues[i] for i in idx], attention=attention)
            logits[idx] = out.logits
            for j, i in enumerate(idx):
                if attention:
                    weights[i] = out.attention[j]
        return TeacherOutput(logits=logits, attention=weights if attention else [])


def load_teacher(path: Path | None, max_length: int) -> tuple[TeacherModel, str]:
    if path is None and CACHED_TEACHER.joinpath("teacher.json").is_file():
        path = CACHED_TEACHER
    if path is not None:
        t = TeacherModel.load(path)
        if max_length != t.max_length:
            t.encoder.max_length = t.max_length = max_length
        return t, f"{path} ({t.version}, {len(t.labels)} labels)"
    from tokenizers import Tokenizer

    from stream_distill.models.factory import default_tokenizer_json, load_classifier
    from stream_distill.models.text import TextEncoder

    model = load_classifier("minilm", INTENTS)
    encoder = TextEncoder(Tokenizer.from_str(default_tokenizer_json()), max_length)
    return TeacherModel(model, encoder), f"minilm, fresh head ({len(INTENTS)} labels)"


def variant(teacher: TeacherModel, kind: str) -> TeacherModel:
    if kind == "plain":
        return teacher
    model = teacher.model
    if kind == "int8":
        from torch.ao.quantization import quantize_dynamic

        model = quantize_dynamic(teacher.model, {torch.nn.Linear}, dtype=torch.qint8)  # type: ignore[no-untyped-call]
    cls = SortedTeacher if kind == "sorted" else TeacherModel
    return cls(model, teacher.encoder, version=f"{teacher.version}-{kind}")


class Timing(Hooks):
    def __init__(self) -> None:
        self.first_start: float | None = None
        self.model_s = 0.0
        self.batches = 0

    def on_teacher_batch(self, size: int, seconds: float) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter() - seconds
        self.model_s += seconds
        self.batches += 1


@dataclass
class Config:
    threads: int
    batch_size: int
    attention: bool
    precision: str = "float32"
    kind: str = "plain"


async def produce(bus: KafkaBus, n: int) -> None:
    examples = labelled_examples(n, seed=21)
    async with bus.producer() as p:
        sends = []
        for i, ex in enumerate(examples):
            event = RequestEvent(
                request_id=f"r{i}",
                conversation_id=f"c{i % 97}",
                turns=ex.turns,
                served_intent=ex.intent,
                entropy=0.5,
                margin=0.3,
                model_version="bench",
                latency_ms=3.0,
            )
            sends.append(
                p.send(bus.topics.requests, codec.encode(event), key=event.conversation_id.encode())
            )
        await asyncio.gather(*sends)


async def run_one(bus: KafkaBus, teacher: TeacherModel, cfg: Config, n: int) -> dict[str, Any]:
    settings = TeacherSettings(
        threads=cfg.threads,
        batch_size=cfg.batch_size,
        batch_wait_ms=20,
        emit_attention=cfg.attention,
        precision=cfg.precision,
        max_in_flight=max(256, 4 * cfg.batch_size),
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
    )
    timing = Timing()
    scorer = TeacherScorer(bus, variant(teacher, cfg.kind), settings, timing)
    stop = asyncio.Event()
    task = asyncio.create_task(scorer.run(stop))
    try:
        await eventually(lambda: scorer.scored >= n or task.done(), timeout_s=600, every_s=0.005)
        done = time.perf_counter()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    span = done - (timing.first_start or done)
    return {
        **cfg.__dict__,
        "scored": scorer.scored,
        "rps": round(scorer.scored / span, 1) if span > 0 else 0.0,
        "model_share": round(timing.model_s / span, 3) if span > 0 else 0.0,
        "seconds": round(span, 2),
    }


def agreement(teacher: TeacherModel, dialogues: list[tuple[Turn, ...]]) -> dict[str, float]:
    """How far the int8 teacher's logits are from fp32 ones."""
    ref = teacher.predict(dialogues, attention=False).logits
    q = variant(teacher, "int8").predict(dialogues, attention=False).logits
    return {
        "int8_argmax_agreement": round(float((ref.argmax(1) == q.argmax(1)).mean()), 4),
        "int8_max_abs_logit_diff": round(float(np.abs(ref - q).max()), 4),
    }


def _sampling_fraction(n: int = 20000, seed: int = 0) -> dict[str, Any]:
    """The adaptive sampler (default settings) on a synthetic student, 200 req/s traffic.

    Profile: 80 % confident answers (entropy 0.05-0.6, margin 0.4-0.95, right 95 % of the
    time), 20 % unsure ones (entropy 1-2.5, margin 0-0.2, right 60 %); the teacher is right
    97 % of the time. Returns the scored share without a budget cap and with 20 req/s.
    """
    rng = random.Random(seed)
    intents = INTENTS
    stream: list[tuple[RequestEvent, str]] = []
    turns = (Turn(role="user", text="x"),)
    for i in range(n):
        truth = rng.choice(intents)
        unsure = rng.random() < 0.2
        right = rng.random() < (0.6 if unsure else 0.95)
        served = truth if right else rng.choice([x for x in intents if x != truth])
        teacher = truth if rng.random() < 0.97 else rng.choice(intents)
        entropy = rng.uniform(1.0, 2.5) if unsure else rng.uniform(0.05, 0.6)
        margin = rng.uniform(0.0, 0.2) if unsure else rng.uniform(0.4, 0.95)
        event = RequestEvent(
            request_id=f"s{i}",
            conversation_id="c",
            turns=turns,
            served_intent=served,
            entropy=entropy,
            margin=margin,
            model_version="sim",
            latency_ms=1.0,
        )
        stream.append((event, teacher))
    out: dict[str, Any] = {}
    for name, budget in (("teacher_fraction", None), ("teacher_fraction_budget_20rps", 20.0)):
        clock = FakeClock()
        sampler = AdaptiveSampler(
            TeacherSettings(sampling="adaptive", sample_budget_rps=budget),
            clock=clock,
            rng=random.Random(seed + 1),
        )
        scored = 0
        for start in range(0, n, 16):  # batches of 16 at 200 req/s
            chunk = stream[start : start + 16]
            for (event, teacher), d in zip(
                chunk, sampler.choose([e for e, _ in chunk]), strict=True
            ):
                if d.score:
                    scored += 1
                    sampler.observe(event, teacher)
            clock.advance(16 / 200)
        out[name] = round(scored / n, 4)
        out[f"{name}_reasons"] = dict(sampler.decisions)
    return out


async def bench(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    teacher, described = load_teacher(args.teacher, args.max_length)
    bus = KafkaBus(KafkaSettings(topic_prefix=f"bench{uuid.uuid4().hex[:6]}."), bootstrap)
    await bus.ensure_topics([bus.topics.requests, bus.topics.soft_labels, bus.topics.dead_letters])
    await produce(bus, args.requests)
    configs = [
        Config(th, bs, att, precision)
        for th in args.threads
        for bs in args.batch_sizes
        for att in args.attention
        for precision in args.precision
    ]
    runs = []
    for cfg in configs:
        runs.append(await run_one(bus, teacher, cfg, args.requests))
        print(json.dumps(runs[-1]), flush=True)
    best = max(runs, key=lambda r: r["rps"])
    extra: dict[str, Any] = {}
    for kind, on in (("sorted", args.sorted_chunk), ("int8", args.int8)):
        if on:
            SortedTeacher.chunk = args.sorted_chunk or SortedTeacher.chunk
            size = max(best["batch_size"], 4 * SortedTeacher.chunk) if kind == "sorted" else None
            cfg = Config(
                best["threads"],
                size or best["batch_size"],
                best["attention"],
                best["precision"] if kind == "sorted" else "float32",
                kind,
            )
            runs.append(await run_one(bus, teacher, cfg, args.requests))
            print(json.dumps(runs[-1]), flush=True)
    if args.int8:
        torch.set_num_threads(1)
        extra |= agreement(teacher, [e.turns for e in labelled_examples(256, seed=22)])
    plain = [r for r in runs if r["kind"] == "plain"]
    best = max(plain, key=lambda r: r["rps"])
    return {
        "teacher_rps": best["rps"],
        "best": best,
        "runs": runs,
        **extra,
        "requests": args.requests,
        "teacher": described,
        "max_length": teacher.max_length,
    }


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=2048)
    ap.add_argument("--threads", type=_ints, default=[1, 2])
    ap.add_argument("--batch-sizes", type=_ints, default=[16, 32, 64])
    ap.add_argument(
        "--attention", choices=["on", "off", "both"], default="on", help="emit_attention"
    )
    ap.add_argument(
        "--precision",
        choices=["float32", "bfloat16", "both"],
        default="both",
        help="teacher.precision",
    )
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--teacher", type=Path, default=None, help="a saved teacher directory")
    ap.add_argument("--sorted-chunk", type=int, default=0, help="also try length-sorted chunks")
    ap.add_argument("--int8", action="store_true", help="also try dynamic int8 Linear layers")
    ap.add_argument("--quick", action="store_true", help="512 requests, batch 32/64, attention on")
    args = ap.parse_args()
    args.attention = {"on": [True], "off": [False], "both": [True, False]}[args.attention]
    args.precision = ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
    if args.quick:
        args.requests, args.batch_sizes, args.attention = 512, [32, 64], [True]
    with EmbeddedBroker() as broker:
        result = asyncio.run(bench(args, broker.bootstrap))
    result |= _sampling_fraction()
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
