"""The student and its optimizer: ``learn_many`` / ``predict_many``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stream_distill.config import TrainerSettings
from stream_distill.events import Turn
from stream_distill.models.text import Batch, TextEncoder
from stream_distill.trainer.join import Example
from stream_distill.trainer.losses import IGNORE, combined, hard_ce, kd_kl


def to_torch(batch: Batch) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.as_feed().items()}


class Learner:
    """Wraps a torch sequence classifier whose output order is ``labels``."""

    def __init__(
        self,
        model: Any,
        encoder: TextEncoder,
        labels: Sequence[str],
        settings: TrainerSettings,
    ) -> None:
        self.model = model
        self.encoder = encoder
        self.labels = tuple(labels)
        self.settings = settings
        self._index = {name: i for i, name in enumerate(self.labels)}
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head = [p for n, p in trainable if n.startswith("classifier.")]
        body = [p for n, p in trainable if not n.startswith("classifier.")]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": body, "lr": settings.lr},
                {"params": head, "lr": settings.lr * settings.head_lr_multiplier},
            ]
        )
        self.steps = 0
        self.examples_seen = 0

    def _teacher_rows(self, examples: Sequence[Example]) -> tuple[list[int], torch.Tensor]:
        """Rows with a usable soft label and its logits in the student's label order."""
        rows: list[int] = []
        logits: list[list[float]] = []
        for i, ex in enumerate(examples):
            if ex.soft is None:
                continue
            if ex.soft.labels == self.labels:
                logits.append(list(ex.soft.logits))
            else:
                by_name = dict(zip(ex.soft.labels, ex.soft.logits, strict=True))
                if not all(name in by_name for name in self.labels):
                    continue  # the teacher does not cover our label space: no KD for this row
                logits.append([by_name[name] for name in self.labels])
            rows.append(i)
        return rows, torch.tensor(logits, dtype=torch.float32).reshape(len(rows), len(self.labels))

    def learn_many(self, examples: Sequence[Example]) -> dict[str, float]:
        """One optimizer step on ``examples``; returns the loss components."""
        t0 = time.perf_counter()
        self.model.train()
        feed = to_torch(self.encoder.encode([ex.turns for ex in examples]))
        logits = self.model(**feed).logits
        rows, t_logits = self._teacher_rows(examples)
        kd = kd_kl(logits[rows], t_logits, self.settings.temperature)
        targets = torch.tensor(
            [self._index.get(ex.hard, IGNORE) if ex.hard else IGNORE for ex in examples]
        )
        ce = hard_ce(logits, targets)
        has_kd, has_ce = bool(rows), bool((targets != IGNORE).any())
        # With only one kind of label in the batch, that kind carries the whole weight.
        alpha = self.settings.alpha if (has_kd and has_ce) else (1.0 if has_kd else 0.0)
        loss = combined(kd, ce, alpha)
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], 1.0
            )
            self.optimizer.step()
        self.steps += 1
        self.examples_seen += len(examples)
        return {
            "total": float(loss.detach()),
            "kd": float(kd.detach()),
            "ce": float(ce.detach()),
            "seconds": time.perf_counter() - t0,
        }

    @torch.inference_mode()
    def predict_many(
        self, dialogues: Sequence[Sequence[Turn]], batch_size: int = 64
    ) -> npt.NDArray[np.float32]:
        self.model.eval()
        out: list[npt.NDArray[np.float32]] = []
        for i in range(0, len(dialogues), batch_size):
            feed = to_torch(self.encoder.encode(dialogues[i : i + batch_size]))
            probs = torch.softmax(self.model(**feed).logits, dim=-1)
            out.append(probs.numpy().astype(np.float32))
        if not out:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(out)

    def accuracy(self, dialogues: Sequence[Sequence[Turn]], intents: Sequence[str]) -> float:
        if not dialogues:
            return float("nan")
        pred = self.predict_many(dialogues).argmax(axis=1)
        hits = sum(self.labels[int(p)] == y for p, y in zip(pred, intents, strict=True))
        return hits / len(intents)
