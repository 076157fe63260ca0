"""Does the dialogue context help? The same student trained on each user turn with and without it.

Data: Schema-Guided Dialogue in the JSONL layout of ``--data`` (``train.jsonl``/``test.jsonl``, one
dialogue per line: ``turns`` of ``{speaker, text, intent}``; a user turn's ``intent`` is the active
intent, ``NONE`` before/after one, several joined with ``|``). Every user turn with a single intent
becomes an example; turns whose intent joins several services' intents are left out, and test turns
whose intent never occurs in train are counted but not scored.

Model: the production student (MiniLM-L6 embeddings + layers 0 and 5 + a new head), fine-tuned on
hard labels with the same recipe as ``bootstrap-teacher``, once with the dialogue context as the
second sequence (what serve does with ``turns``) and once with the last user turn alone.

    .venv/bin/python benchmarks/multiturn.py --data ../shared/data/sgd \
        --json benchmarks/results/multiturn.json

Writes ``context_accuracy``, ``last_turn_accuracy``, their difference, per-variant training time,
and the example counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from stream_distill.events import Turn

Example = tuple[tuple[Turn, ...], str]
_ROLES = {"user": "user", "system": "agent"}


def load_sgd(path: Path) -> list[Example]:
    """One example per single-intent user turn, with every turn before it as context."""
    out: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            dialogue = json.loads(line)
            history: list[Turn] = []
            for raw in dialogue["turns"]:
                text = str(raw.get("text") or "").strip()
                role = _ROLES.get(str(raw.get("speaker")), "agent")
                if not text:
                    continue
                turn = Turn(role=role, text=text)  # type: ignore[arg-type]
                intent = raw.get("intent")
                if role == "user" and intent and "|" not in intent:
                    out.append(((*history, turn), str(intent)))
                history.append(turn)
    return out


def last_turn(examples: Sequence[Example]) -> list[Example]:
    return [((turns[-1],), label) for turns, label in examples]


def _sample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    return random.Random(seed).sample(examples, limit)


def _accuracy(model: Any, examples: Sequence[Example]) -> float:
    hits = 0
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        predicted = model.predict_labels([turns for turns, _ in chunk])
        hits += sum(p == label for p, (_, label) in zip(predicted, chunk, strict=True))
    return hits / max(1, len(examples))


def _variant(
    name: str, train: list[Example], test: list[Example], args: argparse.Namespace, work: Path
) -> dict[str, float]:
    import torch

    from stream_distill.models.factory import load_classifier, make_student
    from stream_distill.teacher.bootstrap import bootstrap_teacher

    def student(labels: Sequence[str]) -> Any:
        return make_student(load_classifier("minilm", labels), (0, 5))

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = bootstrap_teacher(
        train,
        work / name,
        max_length=args.max_length,
        epochs=args.epochs,
        batch_size=32,
        lr=args.lr,
        seed=args.seed,
        model_factory=student,
    )
    trained = time.perf_counter() - started
    accuracy = _accuracy(model, test)
    print(f"{name}: accuracy {accuracy:.4f} ({len(test)} test turns), trained in {trained:.0f} s")
    return {"accuracy": round(accuracy, 4), "train_seconds": round(trained, 1)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train/test.jsonl")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--train-limit", type=int, default=12000, help="train turns sampled")
    parser.add_argument("--test-limit", type=int, default=4000, help="test turns sampled")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=64, help="tokens, both variants")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_all = load_sgd(args.data / "train.jsonl")
    test_all = load_sgd(args.data / "test.jsonl")
    known = {label for _, label in train_all}
    test_known = [ex for ex in test_all if ex[1] in known]
    train = _sample(train_all, args.train_limit, args.seed)
    test = _sample(test_known, args.test_limit, args.seed)
    needs_context = sum(1 for turns, _ in test if len(turns) > 1)

    with tempfile.TemporaryDirectory(prefix="sd-multiturn-") as tmp:
        work = Path(tmp)
        context = _variant("context", train, test, args, work)
        last = _variant("last_turn", last_turn(train), last_turn(test), args, work)

    result: dict[str, Any] = {
        "context_accuracy": context["accuracy"],
        "last_turn_accuracy": last["accuracy"],
        "context_gain": round(context["accuracy"] - last["accuracy"], 4),
        "train_seconds": {"context": context["train_seconds"], "last_turn": last["train_seconds"]},
        "train_turns": len(train),
        "test_turns": len(test),
        "test_turns_with_context": needs_context,
        "test_turns_unknown_intent_skipped": len(test_all) - len(test_known),
        "labels": len(known),
        "settings": {
            "epochs": args.epochs,
            "lr": args.lr,
            "max_length": args.max_length,
            "threads": args.threads,
            "student": "MiniLM-L6 embeddings + layers (0, 5)",
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
