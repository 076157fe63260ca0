"""One teacher update that adds new intents from a few labels each, with and without imprinting.

The drift teacher of ``teacher_stream.py`` (bootstrapped without the five drift intents,
cached under ``--data-dir``/teachers) is tuned once, as the teacher updater tunes it
(``stream_distill.teacher.finetune``, the default update settings except ``--steps``), on
``k`` labelled turns of each drift intent plus ``--replay`` older labelled turns of the
other intents. For each ``k`` and for imprinting on and off it writes:

- ``new_intent_recall``: recall on the drift intents' test turns;
- ``old_accuracy``: accuracy on ``--old-test`` test turns of the other intents (the
  teacher before the update: ``old_accuracy_before``);
- ``old_to_new``: how many of those the tuned teacher answers with a drift intent.

    .venv/bin/python benchmarks/teacher_fewshot.py --data ../shared/data/clinc150 \\
        --json benchmarks/results/teacher_fewshot.json

Synthetic data works too (``--data synthetic``), with a teacher bootstrapped here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import distillation as dist  # benchmarks/ is on sys.path when run as a script
import teacher_stream as ts
import torch

from stream_distill.config import Settings
from stream_distill.data.synthetic import LabeledTurn
from stream_distill.teacher.finetune import finetune
from stream_distill.teacher.labelled import Labelled
from stream_distill.teacher.model import TeacherModel


def _labelled(rows: list[LabeledTurn], start: int) -> list[Labelled]:
    now = datetime.now(UTC)
    return [Labelled(f"r{start + i}", ex.turns, ex.intent, now) for i, ex in enumerate(rows)]


def _accuracy(teacher: TeacherModel, rows: list[LabeledTurn]) -> tuple[float, list[str]]:
    preds = teacher.predict_labels([ex.turns for ex in rows])
    hits = sum(p == ex.intent for p, ex in zip(preds, rows, strict=True))
    return round(hits / max(1, len(rows)), 4), preds


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    stream_args = ts._parser().parse_args(["--data", args.data, "--json", "unused.json"])
    stream_args.data_dir = args.data_dir
    if stream_args.teacher_lr is None:  # as teacher_stream.py: the same cached teacher
        stream_args.teacher_lr = 3e-4 if args.data == "synthetic" else 1e-4
    train = dist._split(args.data, "train", None, stream_args.seed)
    test = dist._split(args.data, "test", None, stream_args.seed + 1)
    drift = ts.drift_intents(stream_args, train)
    base, _, _, drift_test = ts.drift_data(stream_args, train, test, drift)
    teacher = TeacherModel.load(ts.drift_teacher(base, len(base) == len(train), stream_args))
    rng = random.Random(args.seed)
    old_test = rng.sample([ex for ex in test if ex.intent not in drift], args.old_test)
    replay = _labelled(rng.sample(base, args.replay), 1_000_000)
    before, _ = _accuracy(teacher, old_test)
    settings = Settings().teacher.model_copy(update={"update_steps": args.steps})
    rows = []
    for k in args.k:
        fresh: list[Labelled] = []
        for intent in drift:
            fresh += _labelled([ex for ex in train if ex.intent == intent][:k], 1000 * k)
        for imprint in (False, True):
            t0 = time.perf_counter()
            tuned = finetune(
                teacher,
                fresh,
                replay,
                settings.model_copy(update={"imprint_new_intents": imprint}),
                new_labels=list(drift),
                seed=args.seed,
            )
            took = time.perf_counter() - t0
            recall, _ = _accuracy(tuned, drift_test)
            old, preds = _accuracy(tuned, old_test)
            row = {
                "k": k,
                "imprint": imprint,
                "new_intent_recall": recall,
                "old_accuracy": old,
                "old_to_new": sum(p in drift for p in preds),
                "tune_s": round(took, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {
        "data": args.data,
        "drift_intents": list(drift),
        "drift_test_turns": len(drift_test),
        "old_test_turns": len(old_test),
        "replay_examples": len(replay),
        "update_steps": args.steps,
        "old_accuracy_before": before,
        "updates": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder with train/test .csv|.jsonl, or synthetic")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="labels per new intent")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of the update")
    p.add_argument("--replay", type=int, default=600, help="older labelled turns replayed")
    p.add_argument("--old-test", type=int, default=600, help="test turns of the old intents")
    p.add_argument("--data-dir", default=".sd", help="where teachers are cached")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
