"""One incremental teacher update: tune a copy on hard labels, then judge it on held-out ones.

The copy's classifier grows a row per new intent (old rows are kept, so old
predictions do not move until training moves them); a new row starts from the mean
features of its examples (:mod:`stream_distill.models.imprint`), so one or two labels
are enough to tell the intent apart. Each step mixes *fresh*
examples (labels since the last update, and every example of a new intent) with
*replayed* older ones, and a distillation term keeps the copy's distribution over
the old intents close to the current teacher's (learning without forgetting).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from stream_distill.config import TeacherSettings
from stream_distill.models.factory import extend_head
from stream_distill.models.imprint import imprint
from stream_distill.models.precision import autocast, use_bfloat16
from stream_distill.significance import significantly_worse
from stream_distill.teacher.labelled import Labelled
from stream_distill.teacher.model import TeacherModel

DISTILL_TEMPERATURE = 2.0


def _sample(pool: Sequence[Labelled], k: int, rng: random.Random) -> list[Labelled]:
    if not pool or k <= 0:
        return []
    return rng.sample(list(pool), k) if len(pool) >= k else rng.choices(pool, k=k)


def _draw(
    new: Sequence[Labelled],
    fresh: Sequence[Labelled],
    replay: Sequence[Labelled],
    size: int,
    share: float,
    rng: random.Random,
) -> list[Labelled]:
    """One batch: ``1 - share`` of it new-intent examples (when there are any), then of the
    rest ``1 - share`` fresh and ``share`` replayed ones; an empty pool leaves its rows to
    the others. A new intent with a dozen examples is thus seen often enough to be learnt,
    whatever the number of fresh labels of old intents.
    """
    pools = [p for p in (new, fresh, replay) if p]
    if len(pools) == 1:
        return _sample(pools[0], size, rng)
    n_new = round(size * (1 - share)) if new else 0
    rest = size - n_new
    n_fresh = (round(rest * (1 - share)) if replay else rest) if fresh else 0
    return [
        *_sample(new, n_new, rng),
        *_sample(fresh, n_fresh, rng),
        *_sample(replay, rest - n_fresh, rng),
    ]


def finetune(
    current: TeacherModel,
    fresh: Sequence[Labelled],
    replay: Sequence[Labelled],
    settings: TeacherSettings,
    *,
    new_labels: Sequence[str] = (),
    seed: int = 0,
) -> TeacherModel:
    """A tuned copy of ``current`` over ``current.labels + new_labels``; ``current`` is untouched.

    Examples whose intent is in neither list are left out.
    """
    labels = (*current.labels, *new_labels)
    index = {label: i for i, label in enumerate(labels)}
    added = set(new_labels)
    new = [ex for ex in (*fresh, *replay) if ex.intent in added]
    fresh = [ex for ex in fresh if ex.intent in index and ex.intent not in added]
    replay = [ex for ex in replay if ex.intent in index and ex.intent not in added]
    if not new and not fresh and not replay:
        raise ValueError("no examples to tune the teacher on")
    n_old = len(current.labels)
    started = time.perf_counter()
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(current.model)
        imprinted: list[str] = []
        if new_labels:
            extend_head(model, labels)
            if settings.imprint_new_intents:
                by_label = {
                    label: [ex.turns for ex in new if ex.intent == label] for label in new_labels
                }
                imprinted = imprint(model, current.encoder, by_label, n_old)
        embeddings = getattr(model.base_model, "embeddings", None)
        words = getattr(embeddings, "word_embeddings", None)
        if isinstance(words, torch.nn.Module):
            words.requires_grad_(False)  # a third of the weights, little to gain on few labels
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=settings.update_lr, weight_decay=0.01)
        model.train()
        bf16 = use_bfloat16(settings.precision)  # as the scorer runs it: ~2x faster updates
        for _ in range(settings.update_steps):
            rows = _draw(
                new, fresh, replay, settings.update_batch_size, settings.update_replay_fraction, rng
            )
            batch = current.encoder.encode([ex.turns for ex in rows])
            feed = {k: torch.from_numpy(v) for k, v in batch.as_feed().items()}
            targets = torch.tensor([index[ex.intent] for ex in rows], dtype=torch.long)
            with autocast(bf16):
                logits = model(**feed).logits.float()
            loss = F.cross_entropy(logits, targets)
            known = targets < n_old  # rows of intents the current teacher knows
            if settings.update_distill_weight > 0 and bool(known.any()):
                with torch.no_grad(), autocast(bf16):
                    old = current.model(**feed).logits.float()[known]
                t = DISTILL_TEMPERATURE
                # Over every label, the new ones with probability 0: an old intent's example
                # keeps its distribution, and a new intent may not take its mass.
                target = F.pad(F.softmax(old / t, dim=-1), (0, len(labels) - n_old))
                kd = F.kl_div(
                    F.log_softmax(logits[known] / t, dim=-1), target, reduction="batchmean"
                )
                loss = loss + settings.update_distill_weight * kd * t * t
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.train(False)
        model.requires_grad_(True)
    tuned = TeacherModel(
        model,
        current.encoder,
        teacher_id=current.teacher_id,
        # Not the parent's meta: its data fingerprint and store version describe the parent.
        meta={"base": current.meta.get("base", ""), "parent_version": current.version},
    )
    tuned.metrics.update(
        {
            "tune_seconds": round(time.perf_counter() - started, 3),
            "tune_new": float(len(new)),
            "tune_fresh": float(len(fresh)),
            "tune_replay": float(len(replay)),
            "tune_imprinted": float(len(imprinted)),
        }
    )
    return tuned


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate may replace the current teacher, and the figures behind it."""

    accepted: bool
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


def _hits(teacher: TeacherModel, examples: Sequence[Labelled]) -> tuple[list[bool], bool]:
    """(right or wrong per example, all logits finite)."""
    out = teacher.predict([ex.turns for ex in examples], attention=False)
    predicted = [teacher.labels[int(i)] for i in out.logits.argmax(axis=1)]
    hits = [p == ex.intent for p, ex in zip(predicted, examples, strict=True)]
    return hits, bool(np.isfinite(out.logits).all())


def _accuracy(teacher: TeacherModel, examples: Sequence[Labelled]) -> tuple[float, bool]:
    """(accuracy, all logits finite)."""
    hits, finite = _hits(teacher, examples)
    return sum(hits) / len(examples), finite


def validate(
    current: TeacherModel,
    candidate: TeacherModel,
    holdout: Sequence[Labelled],
    *,
    margin: float,
    min_holdout: int,
    z: float = 0.0,
) -> Verdict:
    """Accept unless the candidate drops a label, emits non-finite logits, or does worse.

    Worse means: held-out accuracy on the intents the current teacher knows falls
    more than ``margin`` below the current teacher's by more than ``z`` standard errors
    of the paired difference (:func:`significantly_worse`), judged once at least
    ``min_holdout`` such labels exist. Recall of new intents is reported.
    """
    lost = [label for label in current.labels if label not in candidate.labels]
    if lost:
        return Verdict(False, f"labels dropped: {lost}")
    known = set(current.labels)
    old = [ex for ex in holdout if ex.intent in known]
    new = [ex for ex in holdout if ex.intent not in known and ex.intent in candidate.labels]
    metrics: dict[str, float] = {"holdout_old": float(len(old)), "holdout_new": float(len(new))}
    if new:
        recall, finite = _accuracy(candidate, new)
        metrics["new_intent_recall"] = recall
        if not finite:
            return Verdict(False, "non-finite logits", metrics)
    if old:
        hits_before, _ = _hits(current, old)
        hits_after, finite = _hits(candidate, old)
        before, after = sum(hits_before) / len(old), sum(hits_after) / len(old)
        metrics.update({"old_accuracy_current": before, "old_accuracy": after})
        if not finite:
            return Verdict(False, "non-finite logits", metrics)
        worse = significantly_worse(hits_before, hits_after, margin, z)
        if len(old) >= min_holdout and worse:
            return Verdict(
                False, f"worse on old intents: {after:.3f} < {before:.3f} - {margin}", metrics
            )
    if old or new:
        n = len(old) + len(new)
        metrics["holdout_accuracy"] = (
            metrics.get("old_accuracy", 0.0) * len(old)
            + metrics.get("new_intent_recall", 0.0) * len(new)
        ) / n
    return Verdict(True, "ok", metrics)
