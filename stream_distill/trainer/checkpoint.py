"""The trainer's atomic checkpoint: weights, optimizer, join state and input offsets together.

Exactly-once learning comes from writing *everything* the trainer knows in one
atomic step — the consumed offsets per partition included — and seeking to
those offsets on restart. Layout::

    <dir>/ckpt-<n>/model.safetensors   student weights
                  /optim.safetensors   AdamW moments (tensors only)
                  /state.json          offsets, join state, labels, config, counters
    <dir>/LATEST                       name of the newest complete ckpt-<n>

A checkpoint directory is staged under a temporary name, fsynced and renamed;
``LATEST`` is replaced the same way. Nothing is unpickled: only safetensors and JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from stream_distill.bus.base import TopicPartition

if TYPE_CHECKING:
    from stream_distill.trainer.learner import Learner

LATEST = "LATEST"
EMA_PREFIX = "ema::"
"""Keys of the EMA of the weights in ``Snapshot.model_state`` (beside the weights')."""


@dataclass
class Snapshot:
    model_state: dict[str, torch.Tensor]
    optim_state: dict[str, torch.Tensor]
    state: dict[str, Any]


def encode_offsets(offsets: dict[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}|{tp.partition}": off for tp, off in offsets.items()}


def decode_offsets(raw: dict[str, int]) -> dict[TopicPartition, int]:
    out: dict[TopicPartition, int] = {}
    for key, off in raw.items():
        topic, part = key.rsplit("|", 1)
        out[TopicPartition(topic, int(part))] = int(off)
    return out


def optimizer_tensors(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """AdamW state as named tensors keyed by parameter position."""
    out: dict[str, torch.Tensor] = {}
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if not st:
            continue
        for name, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            out[f"{i}.{name}"] = t.detach().clone().contiguous()
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], tensors: dict[str, torch.Tensor]
) -> None:
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        opt.state[params[int(idx)]][name] = value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.keep = keep

    def latest_name(self) -> str | None:
        """LATEST if it names a complete checkpoint, else the newest complete one on disk."""
        try:
            name = (self.dir / LATEST).read_text().strip()
        except FileNotFoundError:
            name = ""
        if name and (self.dir / name / "state.json").is_file():
            return name
        complete = sorted(p.name for p in self.dir.glob("ckpt-*") if (p / "state.json").is_file())
        return complete[-1] if complete else None

    def save(self, snap: Snapshot) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{self._next_number():08d}"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.dir))
        try:
            save_file(
                {k: v.contiguous() for k, v in snap.model_state.items()},
                staging / "model.safetensors",
            )
            save_file(snap.optim_state, staging / "optim.safetensors")
            for f in ("model.safetensors", "optim.safetensors"):
                with open(staging / f, "rb+") as fh:
                    os.fsync(fh.fileno())
            _write(staging / "state.json", json.dumps(snap.state).encode())
            os.rename(staging, self.dir / name)
            _fsync_dir(self.dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        tmp = self.dir / f".{LATEST}.tmp"
        _write(tmp, name.encode())
        os.replace(tmp, self.dir / LATEST)
        _fsync_dir(self.dir)
        self._prune(name)
        return name

    def _next_number(self) -> int:
        # Past every ckpt-<n> on disk, not just LATEST: a crash between the rename and the
        # LATEST update leaves a newer directory that must never be renamed onto.
        nums = [int(p.name[5:]) for p in self.dir.glob("ckpt-*") if p.name[5:].isdigit()]
        return max(nums, default=0) + 1

    def _prune(self, current: str) -> None:
        ckpts = sorted(p.name for p in self.dir.glob("ckpt-*") if p.is_dir())
        for old in ckpts[: -self.keep]:
            if old != current:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        for stale in self.dir.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self) -> Snapshot | None:
        name = self.latest_name()
        if name is None:
            return None
        folder = self.dir / name
        return Snapshot(
            model_state=load_file(folder / "model.safetensors"),
            optim_state=load_file(folder / "optim.safetensors"),
            state=json.loads((folder / "state.json").read_text()),
        )


def learner_tensors(learner: Learner) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Copies of the learner's weights (and their EMA, if built) and optimizer tensors."""
    model_state = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
    if learner.ema is not None:
        for k, v in learner.ema.state_dict().items():
            model_state[EMA_PREFIX + k] = v.detach().clone()
    params = list(learner.model.parameters())
    return model_state, optimizer_tensors(learner.optimizer, params)


def load_learner_tensors(learner: Learner, snap: Snapshot) -> None:
    """Put :func:`learner_tensors` of ``snap`` back (the label list already grown to it)."""
    state = snap.model_state
    learner.model.load_state_dict({k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)})
    ema = {k[len(EMA_PREFIX) :]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    if ema:
        learner._ema_model().load_state_dict(ema)
    params = list(learner.model.parameters())
    load_optimizer_tensors(learner.optimizer, params, snap.optim_state)
