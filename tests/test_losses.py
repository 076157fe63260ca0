"""Golden values for the distillation losses, computed by hand (see the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from stream_distill.trainer.losses import IGNORE, combined, hard_ce, kd_kl


def _softmax(xs: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_kl_golden_value() -> None:
    s, t_logits, temp = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2.0
    p_t, p_s = _softmax(t_logits, temp), _softmax(s, temp)
    # KL(p_t || p_s) = sum p_t log(p_t / p_s), times T^2
    golden = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True)) * temp**2
    got = kd_kl(torch.tensor([s]), torch.tensor([t_logits]), temp).item()
    assert got == pytest.approx(golden, rel=1e-5)
    assert golden == pytest.approx(1.28063, abs=1e-4)  # pinned number, not re-derived


def test_kd_kl_direction_is_teacher_target() -> None:
    s = torch.tensor([[0.0, 0.0, 4.0]])
    t = torch.tensor([[4.0, 0.0, 0.0]])
    a = kd_kl(s, t, 1.0).item()
    p_t, p_s = _softmax([4.0, 0.0, 0.0], 1.0), _softmax([0.0, 0.0, 4.0], 1.0)
    fwd = sum(x * math.log(x / y) for x, y in zip(p_t, p_s, strict=True))
    assert a == pytest.approx(fwd, rel=1e-5)


def test_kd_kl_zero_when_equal_and_batch_mean() -> None:
    x = torch.tensor([[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]])
    assert kd_kl(x, x, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    one = kd_kl(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]]), 2.0)
    two = kd_kl(
        torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]),
        torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]]),
        2.0,
    )
    assert two.item() == pytest.approx(one.item() / 2, rel=1e-5)


def test_hard_ce_golden_and_ignore() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    targets = torch.tensor([0, IGNORE])
    golden = -math.log(_softmax([1.0, 2.0, 3.0], 1.0)[0])  # = 2.4076
    assert hard_ce(logits, targets).item() == pytest.approx(golden, rel=1e-5)
    assert golden == pytest.approx(2.4076, abs=1e-4)
    assert hard_ce(logits, torch.tensor([IGNORE, IGNORE])).item() == 0.0


def test_combined_weights() -> None:
    kd, ce = torch.tensor(2.0), torch.tensor(4.0)
    assert combined(kd, ce, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)


def test_attention_alignment_golden_value() -> None:
    from stream_distill.trainer.losses import attention_alignment

    student = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    # row 0: compared on 3 tokens; row 1: teacher too short (2 < 3) → skipped
    teacher = [torch.tensor([0.2, 0.4, 0.4, 0.0]), torch.tensor([0.5, 0.5])]
    got = attention_alignment(student, teacher, [3, 3]).item()
    p, q = [0.2, 0.4, 0.4], [0.5, 0.25, 0.25]
    golden = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert got == pytest.approx(golden, rel=1e-5)
    assert golden == pytest.approx(0.192745, abs=1e-5)  # pinned
    # renormalisation: a teacher vector scaled by any constant gives the same loss
    scaled = [teacher[0] * 3.0, teacher[1]]
    assert attention_alignment(student, scaled, [3, 3]).item() == pytest.approx(got, rel=1e-5)


def test_attention_alignment_zero_when_equal_or_no_rows() -> None:
    from stream_distill.trainer.losses import attention_alignment

    s = torch.tensor([[0.6, 0.3, 0.1]])
    assert attention_alignment(s, [torch.tensor([0.6, 0.3, 0.1])], [3]).item() == pytest.approx(
        0.0, abs=1e-6
    )
    assert attention_alignment(s, [torch.tensor([1.0])], [3]).item() == 0.0


# -- temperature schedule -------------------------------------------------------------------


def test_temperature_schedule_golden_values() -> None:
    from stream_distill.trainer.schedule import temperature_at

    assert [temperature_at(s, "constant", 2.0, 1.0, 10) for s in (0, 5, 99)] == [2.0] * 3
    # linear 4 → 1 over 10 steps: 4 - 0.3·step, then held at 1 (and at 4 before 0)
    linear = [temperature_at(s, "linear", 4.0, 1.0, 10) for s in (-3, 0, 5, 9, 10, 20)]
    assert linear == pytest.approx([4.0, 4.0, 2.5, 1.3, 1.0, 1.0])
    # cosine: 1 + 3 · (1 + cos(π · step / 10)) / 2; step 2: 1 + 1.5 · 1.809017 = 3.713525
    cosine = [temperature_at(s, "cosine", 4.0, 1.0, 10) for s in (0, 2, 5, 10, 11)]
    assert cosine == pytest.approx([4.0, 3.713525, 2.5, 1.0, 1.0], abs=1e-6)
    # rising schedules are allowed too
    assert temperature_at(5, "linear", 1.0, 3.0, 10) == pytest.approx(2.0)
