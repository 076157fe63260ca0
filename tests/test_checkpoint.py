"""The trainer's checkpoint: exact tensors, exact optimizer resume, atomic layout, no pickle."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from stream_distill.bus.base import TopicPartition
from stream_distill.trainer.checkpoint import (
    LATEST,
    CheckpointStore,
    Snapshot,
    decode_offsets,
    encode_offsets,
    load_optimizer_tensors,
    optimizer_tensors,
)

torch.set_num_threads(1)

X = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.5, 0.25, -0.5, 1.0], [0.0, 0.0, 1.0, -2.0]])
Y = torch.tensor([2, 0, 1])


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(X), Y)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, **state: object) -> Snapshot:
    return Snapshot(
        model_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        optim_state=optimizer_tensors(opt, list(model.parameters())),
        state=dict(state),
    )


def _tiny_snapshot(step: int) -> Snapshot:
    return Snapshot({"w": torch.full((2,), float(step))}, {}, {"step": step})


# -- offsets ---------------------------------------------------------------------------------


def test_encode_offsets_golden() -> None:
    offsets = {TopicPartition("sd.requests", 0): 12, TopicPartition("sd.soft-labels", 3): 0}
    assert encode_offsets(offsets) == {"sd.requests|0": 12, "sd.soft-labels|3": 0}


def test_offsets_round_trip_through_json() -> None:
    offsets = {
        TopicPartition("sd.requests", 0): 12,
        TopicPartition("sd.requests", 11): 7,
        TopicPartition("odd|name", 2): 99,  # only the last "|" separates the partition
    }
    assert decode_offsets(json.loads(json.dumps(encode_offsets(offsets)))) == offsets
    assert decode_offsets({}) == {}


# -- tensors ---------------------------------------------------------------------------------


def test_optimizer_tensors_before_and_after_a_step() -> None:
    model, opt = _model_and_opt()
    params = list(model.parameters())
    assert optimizer_tensors(opt, params) == {}
    _step(model, opt)
    tensors = optimizer_tensors(opt, params)
    assert set(tensors) == {f"{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")}
    assert tensors["0.exp_avg"].shape == (3, 4) and tensors["1.exp_avg"].shape == (3,)
    assert float(tensors["0.step"]) == 1.0
    # Copies, not views: the next step must not change what was captured.
    before = tensors["0.exp_avg"].clone()
    _step(model, opt)
    assert torch.equal(tensors["0.exp_avg"], before)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    _step(model, opt)
    state = {"labels": ["a", "b", "c"], "steps": 1, "offsets": {"sd.requests|0": 4}}
    snap = _snapshot(model, opt, **state)
    store = CheckpointStore(tmp_path)
    assert store.save(snap) == "ckpt-00000001"
    loaded = store.load()
    assert loaded is not None
    assert loaded.state == state
    assert set(loaded.model_state) == {"weight", "bias"}
    for key, value in snap.model_state.items():
        assert loaded.model_state[key].dtype == value.dtype
        assert torch.equal(loaded.model_state[key], value)
    assert set(loaded.optim_state) == set(snap.optim_state)
    for key, value in snap.optim_state.items():
        assert loaded.optim_state[key].dtype == value.dtype
        assert loaded.optim_state[key].shape == value.shape
        assert torch.equal(loaded.optim_state[key], value)


def test_restored_optimizer_takes_the_identical_next_step(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    for _ in range(3):
        _step(model, opt)
    store = CheckpointStore(tmp_path)
    store.save(_snapshot(model, opt))
    snap = store.load()
    assert snap is not None

    fresh, fresh_opt = _model_and_opt(seed=123)  # different weights until restored
    fresh.load_state_dict(snap.model_state)
    load_optimizer_tensors(fresh_opt, list(fresh.parameters()), snap.optim_state)
    cold, cold_opt = _model_and_opt(seed=123)
    cold.load_state_dict(snap.model_state)  # weights only: the control

    for _ in range(2):
        _step(model, opt)
        _step(fresh, fresh_opt)
        _step(cold, cold_opt)
    for a, b, c in zip(model.parameters(), fresh.parameters(), cold.parameters(), strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)  # moments matter, so the check above is not vacuous
    assert float(fresh_opt.state[next(iter(fresh.parameters()))]["step"]) == 5.0


# -- layout ----------------------------------------------------------------------------------


def test_empty_store_loads_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "missing")
    assert store.latest_name() is None
    assert store.load() is None


def test_latest_points_to_newest_and_old_ones_are_pruned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    names = [store.save(_tiny_snapshot(i)) for i in range(1, 5)]
    assert names == [f"ckpt-{i:08d}" for i in range(1, 5)]
    assert (tmp_path / LATEST).read_text() == "ckpt-00000004"
    assert store.latest_name() == "ckpt-00000004"
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000003", "ckpt-00000004"]
    snap = store.load()
    assert snap is not None and snap.state == {"step": 4}
    assert torch.equal(snap.model_state["w"], torch.tensor([4.0, 4.0]))


def test_keep_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=1)
    for i in range(3):
        store.save(_tiny_snapshot(i))
    assert [p.name for p in tmp_path.glob("ckpt-*")] == ["ckpt-00000003"]


def test_leftover_staging_dir_is_ignored_and_cleaned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_tiny_snapshot(1))
    staging = tmp_path / ".staging-dead"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half a file")
    (staging / "state.json").write_text('{"step": 666}')
    snap = store.load()
    assert snap is not None and snap.state == {"step": 1}
    store.save(_tiny_snapshot(2))
    assert not staging.exists()


def test_checkpoint_dir_without_state_json_is_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_tiny_snapshot(1))
    broken = tmp_path / "ckpt-00000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"truncated")
    snap = store.load()
    assert snap is not None and snap.state == {"step": 1}


def test_latest_naming_an_incomplete_dir_is_not_loaded(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    name = store.save(_tiny_snapshot(1))
    (tmp_path / name / "state.json").unlink()
    assert store.latest_name() is None
    assert store.load() is None


def test_save_after_a_crash_before_latest_was_updated(tmp_path: Path) -> None:
    # A crash between renaming ckpt-2 into place and rewriting LATEST leaves ckpt-2 on disk
    # while LATEST still names ckpt-1. The next save must not try to reuse the name ckpt-2.
    store = CheckpointStore(tmp_path, keep=3)
    store.save(_tiny_snapshot(1))
    shutil.copytree(tmp_path / "ckpt-00000001", tmp_path / "ckpt-00000002")
    assert store.latest_name() == "ckpt-00000001"
    assert store.save(_tiny_snapshot(3)) == "ckpt-00000003"
    snap = store.load()
    assert snap is not None and snap.state == {"step": 3}
    assert store.save(_tiny_snapshot(4)) == "ckpt-00000004"


def test_save_when_latest_file_is_lost(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_tiny_snapshot(1))
    (tmp_path / LATEST).unlink()
    # the newest complete checkpoint on disk is still found
    snap = store.load()
    assert snap is not None and snap.state == {"step": 1}
    assert store.save(_tiny_snapshot(2)) == "ckpt-00000002"
    snap = store.load()
    assert snap is not None and snap.state == {"step": 2}


# -- no pickle -------------------------------------------------------------------------------


def _safetensors_header(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert isinstance(header, dict)
    return header


def test_checkpoint_holds_only_safetensors_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)

    model, opt = _model_and_opt()
    _step(model, opt)
    store = CheckpointStore(tmp_path)
    name = store.save(_snapshot(model, opt, steps=1))
    assert store.load() is not None

    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        LATEST,
        f"{name}/model.safetensors",
        f"{name}/optim.safetensors",
        f"{name}/state.json",
    ]
    assert (tmp_path / LATEST).read_bytes() == name.encode()
    assert json.loads((tmp_path / name / "state.json").read_text()) == {"steps": 1}
    model_header = _safetensors_header(tmp_path / name / "model.safetensors")
    assert {k for k in model_header if k != "__metadata__"} == {"weight", "bias"}
    optim_header = _safetensors_header(tmp_path / name / "optim.safetensors")
    assert {k for k in optim_header if k != "__metadata__"} == {
        f"{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")
    }
