"""Compact JSON for the soft labels a checkpoint holds (most of its bytes).

A checkpoint keeps every example awaiting a late hard label and the whole replay
reservoir, each with its soft label: 150 label names and 150 logits apiece written
as plain JSON made a 15k-example join state ~100 MB per checkpoint. Here each
distinct label list is written once (a table beside the examples) and logits and
attention travel as base64 of little-endian float32 when that is exact (a torch
teacher's values always are), else float64. Still JSON: nothing is unpickled, and
every soft label is validated again when it is read back. Checkpoints written with
whole soft labels load unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from stream_distill.events import SoftLabel

PACKED = ("labels", "logits", "attention")


def pack_floats(values: Sequence[float]) -> str:
    """``f4:<base64>`` when float32 holds every value exactly, else ``f8:<base64>``."""
    wide = np.asarray(values, dtype="<f8")
    narrow = wide.astype("<f4")
    if np.array_equal(narrow.astype("<f8"), wide):
        return "f4:" + base64.b64encode(narrow.tobytes()).decode("ascii")
    return "f8:" + base64.b64encode(wide.tobytes()).decode("ascii")


def unpack_floats(text: str) -> tuple[float, ...]:
    kind, _, payload = text.partition(":")
    if kind not in ("f4", "f8"):
        raise ValueError(f"unknown packed float kind {kind!r}")
    raw = base64.b64decode(payload.encode("ascii"), validate=True)
    return tuple(np.frombuffer(raw, dtype="<" + kind).astype(float).tolist())


class SoftCodec:
    """Writes and reads soft labels against one table of label lists."""

    def __init__(self, lists: Sequence[Sequence[str]] = ()) -> None:
        self._lists = [tuple(x) for x in lists]
        self._ids = {labels: i for i, labels in enumerate(self._lists)}

    def table(self) -> list[list[str]]:
        return [list(x) for x in self._lists]

    def _ref(self, labels: tuple[str, ...]) -> int:
        ref = self._ids.get(labels)
        if ref is None:
            ref = self._ids[labels] = len(self._lists)
            self._lists.append(labels)
        return ref

    def dump(self, soft: SoftLabel | None) -> dict[str, Any] | None:
        if soft is None:
            return None
        out = soft.model_dump(mode="json", exclude=set(PACKED))
        out["labels_ref"] = self._ref(soft.labels)
        out["logits_packed"] = pack_floats(soft.logits)
        if soft.attention is not None:
            out["attention_packed"] = pack_floats(soft.attention)
        return out

    def load(self, data: dict[str, Any] | None) -> SoftLabel | None:
        if data is None:
            return None
        if "labels_ref" not in data:  # written whole (an older checkpoint)
            return SoftLabel.model_validate(data)
        fields = dict(data)
        ref = int(fields.pop("labels_ref"))
        if not 0 <= ref < len(self._lists):
            raise ValueError(f"label list {ref} is not in the checkpoint's table")
        fields["labels"] = self._lists[ref]
        fields["logits"] = unpack_floats(fields.pop("logits_packed"))
        attention = fields.pop("attention_packed", None)
        if attention is not None:
            fields["attention"] = unpack_floats(attention)
        return SoftLabel.model_validate(fields)
