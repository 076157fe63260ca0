"""Which float precision torch roles compute in (``teacher.precision``, ``trainer.precision``)."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def native_bfloat16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16)."""
    for name in PROBES:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and bool(probe()):
                return True
        except RuntimeError:
            continue
    return False


def use_bfloat16(precision: str) -> bool:
    """``auto`` is bfloat16 exactly where the CPU multiplies it natively.

    There CPU autocast to bfloat16 runs a BERT-sized model ~2.5x faster and moves its
    logits by ~0.03; elsewhere it is much slower, so ``auto`` stays float32.
    """
    if precision != "auto":
        return precision == "bfloat16"
    return native_bfloat16()


BF16_MIN_ROWS = 8
"""``auto`` scores batches of fewer rows in float32. Measured for MiniLM-L6 (one thread,
AMX): float32 vs bfloat16 ms per row at batch 1: 8.0 vs 11.5; 4: 3.9 vs 4.0; 8: 3.3
vs 2.3; 16: 3.0 vs 1.6. Autocast's casts cost more than they save on a lone request."""


def use_bfloat16_for(precision: str, rows: int) -> bool:
    """:func:`use_bfloat16` for inference on ``rows`` rows: ``auto`` also wants
    :data:`BF16_MIN_ROWS` rows; an explicit ``bfloat16`` always gets it."""
    if precision == "auto" and rows < BF16_MIN_ROWS:
        return False
    return use_bfloat16(precision)


def autocast(bf16: bool) -> AbstractContextManager[object]:
    """CPU autocast to bfloat16 when ``bf16`` (per thread: enter it where the model runs).

    Weights, gradients and optimizer state stay float32; matmuls drop to bfloat16.
    """
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
