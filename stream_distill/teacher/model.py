"""The teacher model: an HF sequence classifier plus the shared dialogue encoder.

On disk a teacher is a directory with the HF weights (safetensors), ``tokenizer.json``
and ``teacher.json`` (version, labels, max_length, metrics, provenance). ``teacher.json``
is written last and the directory is swapped in by rename, so a half-written teacher is
never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from stream_distill.events import Turn
from stream_distill.models.factory import labels_of
from stream_distill.models.text import Batch, TextEncoder

META_FILE = "teacher.json"
TOKENIZER_FILE = "tokenizer.json"
_CHUNK = 64


def label_set_version(labels: Sequence[str]) -> str:
    """Short sha256 of the label list; it changes whenever the label space (or its order) does."""
    return hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()[:12]


def weights_version(model: PreTrainedModel, labels: Sequence[str], tokenizer: str) -> str:
    """``t-<12 hex>`` from the weights, labels and tokenizer: same content, same name."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    h.update(json.dumps(list(labels)).encode())
    h.update(tokenizer.encode())
    return f"t-{h.hexdigest()[:12]}"


@dataclass(frozen=True, slots=True)
class TeacherOutput:
    """Logits [n, n_labels] (float32) and, per dialogue, [CLS]→token attention of real tokens.

    ``attention`` is empty when it was not asked for.
    """

    logits: npt.NDArray[np.float32]
    attention: list[list[float]]


class TeacherModel:
    """Wraps a classifier and its encoder; ``predict`` is thread-safe enough for one worker."""

    def __init__(
        self,
        model: PreTrainedModel,
        encoder: TextEncoder,
        *,
        teacher_id: str = "teacher",
        version: str | None = None,
        metrics: Mapping[str, float] | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model.train(False)
        self.encoder = encoder
        self.teacher_id = teacher_id
        self.labels: tuple[str, ...] = labels_of(model)
        self.label_set_version = label_set_version(self.labels)
        self.max_length = encoder.max_length
        self.metrics: dict[str, float] = dict(metrics or {})
        self.meta: dict[str, str] = dict(meta or {})
        self.version = version or weights_version(model, self.labels, encoder.to_str())

    def _tensors(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in batch.as_feed().items()}

    def predict(
        self, dialogues: Sequence[Sequence[Turn]], *, attention: bool = True
    ) -> TeacherOutput:
        """Score dialogues (chunked, so a long list does not pad to its longest member)."""
        n = len(dialogues)
        logits = np.zeros((n, len(self.labels)), dtype=np.float32)
        weights: list[list[float]] = []
        self.model.train(False)
        with torch.inference_mode():
            for start in range(0, n, _CHUNK):
                batch = self.encoder.encode(dialogues[start : start + _CHUNK])
                out = self.model(**self._tensors(batch), output_attentions=attention)
                logits[start : start + len(batch.input_ids)] = out.logits.float().numpy()
                if attention:
                    weights.extend(_cls_attention(out.attentions[-1], batch.attention_mask))
        return TeacherOutput(logits=logits, attention=weights)

    def predict_labels(self, dialogues: Sequence[Sequence[Turn]]) -> list[str]:
        """Argmax label per dialogue."""
        out = self.predict(dialogues, attention=False)
        return [self.labels[int(i)] for i in out.logits.argmax(axis=1)]

    def save(self, directory: str | Path) -> Path:
        """Write the teacher to ``directory``, replacing what was there in one rename."""
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a teacher is meant to be shared
        try:
            # transformers 5 always writes safetensors (no pickle), which is what we want.
            self.model.save_pretrained(tmp)
            (tmp / TOKENIZER_FILE).write_text(self.encoder.to_str(), encoding="utf-8")
            meta: dict[str, Any] = {
                "teacher_id": self.teacher_id,
                "version": self.version,
                "labels": list(self.labels),
                "label_set_version": self.label_set_version,
                "max_length": self.max_length,
                "metrics": self.metrics,
                "meta": self.meta,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | Path, *, teacher_id: str | None = None) -> TeacherModel:
        """Load a teacher written by :meth:`save`."""
        root = Path(directory)
        meta = read_meta(root)
        if meta is None:
            raise FileNotFoundError(f"no {META_FILE} in {root}")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(root), attn_implementation="eager"
        )
        encoder = TextEncoder(
            Tokenizer.from_file(str(root / TOKENIZER_FILE)), int(meta["max_length"])
        )
        teacher = cls(
            model,
            encoder,
            teacher_id=teacher_id or str(meta.get("teacher_id", "teacher")),
            version=str(meta["version"]),
            metrics={k: float(v) for k, v in dict(meta.get("metrics", {})).items()},
            meta={k: str(v) for k, v in dict(meta.get("meta", {})).items()},
        )
        if teacher.labels != tuple(meta["labels"]):
            raise ValueError(f"{root}: config labels differ from {META_FILE}")
        return teacher


def read_meta(directory: Path) -> dict[str, Any] | None:
    """``teacher.json`` of a saved teacher, or None when there is none (or it is unreadable)."""
    try:
        raw = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _cls_attention(last: torch.Tensor, mask: npt.NDArray[np.int64]) -> list[list[float]]:
    """[batch, heads, q, k] → per row, [CLS]'s attention to each real token, mean over heads."""
    cls_row = last[:, :, 0, :].float().mean(dim=1).numpy()
    lengths = mask.sum(axis=1)
    # Padding sits at the end of each row (TextEncoder pads on the right).
    return [cls_row[i, : int(lengths[i])].astype(float).tolist() for i in range(len(lengths))]


def _swap_in(tmp: Path, target: Path) -> None:
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
