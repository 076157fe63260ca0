"""Distillation losses as pure functions (golden values in tests/test_losses.py).

Hinton et al.'s direction: the teacher's softened distribution is the target,
``KL(p_teacher^T || p_student^T) · T²`` (the T² keeps gradient scale constant
across temperatures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over the batch of ``T² · KL(softmax(t/T) || softmax(s/T))``; 0 for an empty batch."""
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (t * t)


def hard_ce(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on hard labels; rows with ``IGNORE`` targets do not count (0 if none)."""
    if bool((targets != IGNORE).any()):
        return F.cross_entropy(student_logits, targets, ignore_index=IGNORE)
    return student_logits.sum() * 0.0


def combined(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α·KD + (1−α)·CE``."""
    return alpha * kd + (1.0 - alpha) * ce


def attention_alignment(
    student_cls_attention: torch.Tensor, teacher_vectors: list[torch.Tensor], lengths: list[int]
) -> torch.Tensor:
    """Mean ``KL(teacher || student)`` of [CLS]→token attention over each row's first segment.

    ``student_cls_attention`` is [batch, seq] (last layer, heads averaged); row ``i`` is
    compared on its first ``lengths[i]`` tokens ([CLS] + the current turn + [SEP]), the
    stretch both tokenisations share, each side renormalised there. Rows whose teacher
    vector is shorter than that stretch are skipped; 0 when no row qualifies.
    """
    terms: list[torch.Tensor] = []
    for i, (t_vec, n) in enumerate(zip(teacher_vectors, lengths, strict=True)):
        if n < 2 or t_vec.numel() < n:
            continue
        t = t_vec[:n].clamp_min(1e-8)
        t = t / t.sum()
        s = student_cls_attention[i, :n].clamp_min(1e-8)
        s = s / s.sum()
        terms.append((t * (t.log() - s.log())).sum())
    if not terms:
        return student_cls_attention.sum() * 0.0
    return torch.stack(terms).mean()
