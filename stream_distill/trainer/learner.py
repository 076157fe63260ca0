"""The student and its optimizer: ``learn_many`` / ``predict_many``."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stream_distill.config import TrainerSettings
from stream_distill.events import Turn
from stream_distill.models.factory import extend_head
from stream_distill.models.precision import autocast, use_bfloat16
from stream_distill.models.text import Batch, TextEncoder
from stream_distill.trainer.join import Example
from stream_distill.trainer.losses import IGNORE, attention_alignment, combined, hard_ce, kd_kl
from stream_distill.trainer.schedule import temperature_at
from stream_distill.trainer.teachers import MASKED, TeacherPanel, aligned, softened

TEACHER_STRATEGIES = ("online", "offline")  # KD from the latest soft label of each example


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
        self.optimizer = self._new_optimizer()
        self.steps = 0
        self.examples_seen = 0
        self.bf16 = use_bfloat16(settings.precision)
        # The EMA of the weights: the "self" strategy's teacher (and online's fallback), and
        # with publish_ema the candidate; made on first use.
        self.ema: Any = None
        if settings.publish_ema:
            self._ema_model()  # averaging starts with the first step
        self.teachers = TeacherPanel(
            settings.teacher_weighting,
            settings.teacher_weights,
            settings.teacher_accuracy_decay,
            settings.teacher_weight_temperature,
        )

    @property
    def temperature(self) -> float:
        """The distillation temperature at the current step (see trainer.schedule)."""
        s = self.settings
        start, end = s.temperature, s.temperature_final
        return temperature_at(self.steps, s.temperature_schedule, start, end, s.temperature_steps)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        head = [p for n, p in trainable if n.startswith("classifier.")]
        body = [p for n, p in trainable if not n.startswith("classifier.")]
        lr = self.settings.lr
        return torch.optim.AdamW(
            [
                {"params": body, "lr": lr},
                {"params": head, "lr": lr * self.settings.head_lr_multiplier},
            ]
        )

    def add_labels(self, new: Sequence[str]) -> bool:
        """Grow the head to cover ``new`` labels; old rows (and predictions) stay as they were.

        The body keeps its optimizer moments; the grown head starts fresh ones. The EMA
        teacher is dropped (its head has the old width) and rebuilt on next use.
        """
        added = [x for x in dict.fromkeys(new) if x not in self._index]
        if not added:
            return False
        old_state = {p: st for p, st in self.optimizer.state.items()}
        extend_head(self.model, [*self.labels, *added])
        self.labels = (*self.labels, *added)
        self._index = {name: i for i, name in enumerate(self.labels)}
        self.optimizer = self._new_optimizer()
        for p in self.model.parameters():
            if p in old_state:
                self.optimizer.state[p] = old_state[p]
        self.ema = None
        return True

    def _ema_model(self) -> Any:
        if self.ema is None:
            self.ema = copy.deepcopy(self.model).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        return self.ema

    def candidate_model(self) -> Any:
        """What a publish exports: the EMA of the weights with ``publish_ema``, else the
        weights themselves."""
        return self._ema_model() if self.settings.publish_ema else self.model

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # Warm-up: early on the average follows the weights closely, so it does not hold
        # the untrained start for hundreds of steps (the num_updates rule of TF's EMA).
        d = min(self.settings.ema_decay, (1 + self.steps) / (10 + self.steps))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.mul_(d).add_(p.detach(), alpha=1.0 - d)

    def _targets(
        self, examples: Sequence[Example], feed: dict[str, torch.Tensor], self_targets: bool
    ) -> tuple[list[int], torch.Tensor]:
        """KD rows and their target logits, by strategy."""
        strategy = self.settings.strategy
        if strategy == "hard_only":
            return [], torch.zeros((0, len(self.labels)))
        rows: list[int] = []
        t_logits = torch.zeros((0, len(self.labels)))
        if strategy in TEACHER_STRATEGIES:
            rows, t_logits = self._teacher_rows(examples)
        elif strategy == "multi_teacher":
            rows, t_logits = self._fused_rows(examples)
        if strategy == "self" or (self_targets and len(rows) < len(examples)):
            missing = [i for i in range(len(examples)) if i not in set(rows)]
            with torch.no_grad():
                ema_logits = self._ema_model()(**feed).logits
            rows = rows + missing
            t_logits = torch.cat([t_logits, ema_logits[missing]])
        return rows, t_logits

    def _teacher_rows(self, examples: Sequence[Example]) -> tuple[list[int], torch.Tensor]:
        """Rows with a usable soft label and its logits in the student's label order.

        Labels the teacher does not know get ``MASKED`` logits (the KD term then compares
        the two distributions over the labels the teacher knows); a soft label sharing
        fewer than two labels with the student teaches nothing and is skipped.
        """
        rows: list[int] = []
        logits: list[list[float]] = []
        for i, ex in enumerate(examples):
            if ex.soft is None:
                continue
            if ex.soft.labels == self.labels:
                logits.append(list(ex.soft.logits))
            else:
                by_name = dict(zip(ex.soft.labels, ex.soft.logits, strict=True))
                if sum(name in by_name for name in self.labels) < 2:
                    continue
                logits.append([by_name.get(name, MASKED) for name in self.labels])
            rows.append(i)
        return rows, torch.tensor(logits, dtype=torch.float32).reshape(len(rows), len(self.labels))

    def _fused_rows(self, examples: Sequence[Example]) -> tuple[list[int], torch.Tensor]:
        """Rows with a fused multi-teacher target (see trainer.teachers), in label order."""
        rows: list[int] = []
        logits: list[list[float]] = []
        for i, ex in enumerate(examples):
            target = self.teachers.target(ex.teacher_labels, self.labels, self.temperature)
            if target is not None:
                rows.append(i)
                logits.append(target)
        return rows, torch.tensor(logits, dtype=torch.float32).reshape(len(rows), len(self.labels))

    def _novel(self, ex: Example) -> bool:
        """A hard label that is in the student's labels but in no teacher label list."""
        if ex.hard is None or ex.hard not in self._index:
            return False
        known = ex.teacher_labels
        return bool(known) and all(ex.hard not in soft.labels for soft in known)

    def _overruled(self, ex: Example) -> bool:
        """A hard label that every teacher knows but ranks below another intent."""
        if ex.hard is None or ex.hard not in self._index:
            return False
        known = ex.teacher_labels
        return bool(known) and all(
            ex.hard in soft.labels and soft.labels[_argmax(soft.logits)] != ex.hard
            for soft in known
        )

    def teacher_choice(self, ex: Example) -> str | None:
        """The label the KD target of ``ex`` ranks first, among the student's labels."""
        if self.settings.strategy == "multi_teacher":
            target = self.teachers.target(ex.teacher_labels, self.labels, 1.0)
        elif ex.soft is not None:
            target = aligned(ex.soft.labels, softened(ex.soft.logits, 1.0), self.labels)
        else:
            target = None
        if target is None:
            return None
        return self.labels[max(range(len(target)), key=target.__getitem__)]

    def learn_many(
        self, examples: Sequence[Example], *, self_targets: bool = False
    ) -> dict[str, float]:
        """One optimizer step on ``examples``; returns the loss components."""
        t0 = time.perf_counter()
        self.model.train()
        batch = self.encoder.encode([ex.turns for ex in examples])
        feed = to_torch(batch)
        use_att = (
            self.settings.strategy in TEACHER_STRATEGIES
            and self.settings.attention_weight > 0
            and any(ex.soft is not None and ex.soft.attention for ex in examples)
        )
        with autocast(self.bf16):  # learn_many runs in a worker thread: autocast is per thread
            out = self.model(**feed, output_attentions=use_att)
        logits = out.logits.float()
        rows, t_logits = self._targets(examples, feed, self_targets)
        # Columns the teacher does not know are masked on both sides of the KD term.
        student_kd = logits[rows].masked_fill(t_logits <= MASKED, MASKED)
        kd = kd_kl(student_kd, t_logits, self.temperature)
        targets = torch.tensor(
            [self._index.get(ex.hard, IGNORE) if ex.hard else IGNORE for ex in examples]
        )
        ce = hard_ce(logits, targets)
        has_kd, has_ce = bool(rows), bool((targets != IGNORE).any())
        if not (has_kd or has_ce or use_att):
            # Nothing in this batch teaches anything (e.g. soft labels over a foreign label
            # set): no step at all, or AdamW's weight decay would still move the weights.
            zero = {"total": 0.0, "kd": 0.0, "ce": 0.0, "attention": 0.0}
            return {**zero, "seconds": time.perf_counter() - t0}
        # With only one kind of label in the batch, that kind carries the whole weight.
        alpha = self.settings.alpha if (has_kd and has_ce) else (1.0 if has_kd else 0.0)
        loss = combined(kd, ce, alpha)
        novel = [i for i, ex in enumerate(examples) if self._novel(ex)] if has_kd else []
        if novel and self.settings.novel_label_weight > 0:
            # A hard label no teacher can express: KD cannot teach it, so its example's CE
            # also carries the KD share (a new intent is learnt before teachers catch up).
            extra = hard_ce(logits[novel], targets[novel])
            loss = loss + alpha * self.settings.novel_label_weight * extra
        w = self.settings.overruled_label_weight
        overruled = [i for i, ex in enumerate(examples) if self._overruled(ex)] if w > 0 else []
        if overruled and has_kd:
            # The user confirmed an intent the teacher ranks lower: KD would teach the
            # teacher's mistake at weight alpha, so the confirmed answer gets that much too.
            extra = hard_ce(logits[overruled], targets[overruled])
            loss = loss + alpha * w * extra
        att = self._attention_loss(out, batch, examples) if use_att else loss.detach() * 0.0
        loss = loss + self.settings.attention_weight * att
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], 1.0
            )
            self.optimizer.step()
            self._update_ema()
        self.steps += 1
        self.examples_seen += len(examples)
        return {
            "total": float(loss.detach()),
            "kd": float(kd.detach()),
            "ce": float(ce.detach()),
            "attention": float(att.detach()),
            "seconds": time.perf_counter() - t0,
        }

    @staticmethod
    def _attention_loss(out: Any, batch: Batch, examples: Sequence[Example]) -> torch.Tensor:
        """Student [CLS]→token attention (last layer, heads averaged) vs the teacher's."""
        cls_attention = out.attentions[-1][:, :, 0, :].float().mean(dim=1)
        first_segment = (batch.token_type_ids == 0) & (batch.attention_mask == 1)
        lengths = [int(n) for n in first_segment.sum(axis=1)]
        vectors = [
            torch.tensor(ex.soft.attention if ex.soft and ex.soft.attention else [])
            for ex in examples
        ]
        return attention_alignment(cls_attention, vectors, lengths)

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


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
