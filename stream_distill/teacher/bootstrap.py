"""Fine-tune a teacher on labelled dialogues once, and reuse it while nothing changed.

The demo has no teacher of its own, so it makes one from synthetic examples. The
result is cached in ``out_dir`` under a fingerprint of the data and the settings:
the second call with the same inputs loads instead of training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel

from stream_distill.events import Turn
from stream_distill.models.factory import load_classifier, tokenizer_json
from stream_distill.models.precision import autocast, native_bfloat16
from stream_distill.models.text import Batch, TextEncoder
from stream_distill.teacher.model import TeacherModel, read_meta

log = logging.getLogger(__name__)

Example = tuple[Sequence[Turn], str]
ModelFactory = Callable[[Sequence[str]], PreTrainedModel]

HOLDOUT_FRACTION = 0.1
WARMUP_FRACTION = 0.1
# Batches are drawn from length-sorted pools of this many batches: little padding, still shuffled.
_POOL_BATCHES = 8


def fingerprint(examples: Sequence[Example], settings: dict[str, object]) -> str:
    """sha256 of the examples (in order) and the training settings."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for turns, label in examples:
        row = [label, *[(t.role, t.text) for t in turns]]
        h.update(json.dumps(row).encode())
        h.update(b"\n")
    return h.hexdigest()


def _split(n: int, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_hold = max(1, round(n * HOLDOUT_FRACTION)) if n >= 10 else 0
    return order[n_hold:], order[:n_hold]


def _batches(
    lengths: npt.NDArray[np.int64], idx: list[int], size: int, rng: random.Random
) -> list[list[int]]:
    order = idx[:]
    rng.shuffle(order)
    pool = size * _POOL_BATCHES
    out: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: int(lengths[i]))
        out.extend(chunk[j : j + size] for j in range(0, len(chunk), size))
    rng.shuffle(out)
    return out


def _autocast() -> AbstractContextManager[object]:
    # Weights, gradients and optimizer state stay fp32; only the forward matmuls drop to bf16.
    return autocast(native_bfloat16())


def _take(batch: Batch, rows: list[int]) -> dict[str, torch.Tensor]:
    # Trim to the longest row actually taken: dynamic padding per minibatch.
    width = int(batch.attention_mask[rows].sum(axis=1).max())
    return {k: torch.from_numpy(v[rows, :width].copy()) for k, v in batch.as_feed().items()}


def _train(
    model: PreTrainedModel,
    batch: Batch,
    targets: torch.Tensor,
    train_idx: list[int],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    rng = random.Random(seed)
    lengths = batch.attention_mask.sum(axis=1)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    total = max(1, steps_per_epoch * epochs)
    warmup = max(1, int(total * WARMUP_FRACTION))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    model.train()
    step = 0
    for _ in range(epochs):
        for rows in _batches(lengths, train_idx, batch_size, rng):
            with _autocast():
                out = model(**_take(batch, rows), labels=targets[rows])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if progress is not None:
                progress(step, total)
    model.train(False)


def _freeze_embeddings(model: PreTrainedModel) -> None:
    # Pretrained word embeddings are a third of MiniLM's weights: updating them costs time per
    # step and buys little on a few thousand examples. (Models from a factory start random and
    # must learn theirs.)
    embeddings = getattr(model.base_model, "embeddings", None)
    if isinstance(embeddings, torch.nn.Module):
        embeddings.requires_grad_(False)


def bootstrap_teacher(
    examples: Sequence[Example],
    out_dir: Path,
    *,
    base: str = "minilm",
    max_length: int = 32,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 3e-4,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    model_factory: ModelFactory | None = None,
) -> TeacherModel:
    """Fine-tune ``base`` on ``examples`` (90/10 split) and save it to ``out_dir``.

    Labels are the sorted set of example labels. Held-out accuracy is recorded in the
    teacher's metrics. If ``out_dir`` already holds a teacher made from the same
    examples and settings, it is loaded and returned without training.

    The defaults are tuned for MiniLM-L6 on ~2000 short synthetic dialogues on one CPU
    thread (~35 s where bf16 matmuls run on AMX, ~60 s in fp32): 32 tokens keep the current
    turn and the latest context turn, and a high learning rate with warmup and linear decay
    converges within two epochs.
    """
    if not examples:
        raise ValueError("no examples to train a teacher on")
    out_dir = Path(out_dir)
    labels = sorted({label for _, label in examples})
    settings: dict[str, object] = {
        "base": base,
        "factory": getattr(model_factory, "__qualname__", None),
        "max_length": max_length,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }
    key = fingerprint(examples, settings)
    cached = read_meta(out_dir)
    if cached is not None and dict(cached.get("meta", {})).get("fingerprint") == key:
        log.info("teacher in %s matches the data; loading it", out_dir)
        return TeacherModel.load(out_dir)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_factory(labels) if model_factory else load_classifier(base, labels)
            encoder = TextEncoder(Tokenizer.from_str(tokenizer_json(base)), max_length)
            if model_factory is None:
                _freeze_embeddings(model)
            encoded = encoder.encode([turns for turns, _ in examples])
            index = {label: i for i, label in enumerate(labels)}
            targets = torch.tensor([index[label] for _, label in examples], dtype=torch.long)
            train_idx, hold_idx = _split(len(examples), seed)
            _train(
                model,
                encoded,
                targets,
                train_idx,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                progress=progress,
            )
            model.requires_grad_(True)
        teacher = TeacherModel(model, encoder, meta={"fingerprint": key, "base": base})
        metrics = {
            "train_examples": float(len(train_idx)),
            "holdout_examples": float(len(hold_idx)),
            "train_seconds": round(time.perf_counter() - started, 2),
        }
        if hold_idx:
            predicted = teacher.predict([examples[i][0] for i in hold_idx], attention=False)
            hits = predicted.logits.argmax(axis=1) == targets[hold_idx].numpy()
            metrics["holdout_accuracy"] = float(hits.mean())
        teacher.metrics.update(metrics)
        teacher.save(out_dir)
        log.info(
            "teacher %s trained in %.1fs: %s", teacher.version, metrics["train_seconds"], metrics
        )
        return teacher
    finally:
        torch.set_num_threads(threads)
