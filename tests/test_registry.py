"""The versioned model store: atomic publish, verified load, safe names, pruning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stream_distill.errors import IntegrityError, RegistryError
from stream_distill.registry.store import (
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    Registry,
    sha256_bytes,
)

LABELS = ("greet", "refund", "cancel")
TOKENIZER = '{"model": {"type": "WordPiece"}}'


def _publish(reg: Registry, model: bytes = b"onnx-bytes", version: str | None = None) -> str:
    return reg.publish(model, LABELS, TOKENIZER, version=version).version


def _manifest(reg: Registry, version: str) -> dict[str, object]:
    data = json.loads((reg.versions_dir / version / MANIFEST_FILE).read_text())
    assert isinstance(data, dict)
    return data


def test_sha256_bytes_golden() -> None:
    assert sha256_bytes(b"abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_publish_load_round_trip(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    published = reg.publish(
        b"\x00model\xff",
        LABELS,
        TOKENIZER,
        parent="v0",
        metrics={"holdout_accuracy": 0.75},
        max_length=32,
    )
    loaded = reg.load(published.version)
    assert loaded.version == "v1"
    assert loaded.model == b"\x00model\xff"
    assert loaded.labels == LABELS
    assert loaded.tokenizer_json == TOKENIZER
    assert loaded.max_length == 32
    assert loaded.manifest["parent"] == "v0"
    assert loaded.manifest["metrics"] == {"holdout_accuracy": 0.75}
    assert loaded.manifest["labels"] == list(LABELS)
    assert loaded.sha256 == hashlib.sha256(b"\x00model\xff").hexdigest()
    assert loaded.manifest == published.manifest
    assert reg.uri("v1") == (tmp_path / "versions" / "v1").resolve().as_uri()


def test_manifest_records_sha256_of_every_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = _publish(reg, b"weights")
    folder = reg.versions_dir / version
    files = _manifest(reg, version)["files"]
    assert isinstance(files, dict)
    assert set(files) == {MODEL_FILE, LABELS_FILE, TOKENIZER_FILE}
    for name, digest in files.items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert files[MODEL_FILE] == hashlib.sha256(b"weights").hexdigest()
    assert json.loads((folder / LABELS_FILE).read_text()) == list(LABELS)


def test_versions_number_upwards(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    assert reg.list_versions() == []
    assert reg.latest() is None
    assert reg.next_version() == "v1"
    assert [_publish(reg) for _ in range(3)] == ["v1", "v2", "v3"]
    assert reg.latest() == "v3"
    assert reg.next_version() == "v4"


def test_versions_sort_numerically_not_by_text(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for v in ("v2", "v10", "v9"):
        _publish(reg, version=v)
    assert reg.list_versions() == ["v2", "v9", "v10"]
    assert reg.latest() == "v10"
    assert reg.next_version() == "v11"


def test_publish_to_existing_version_raises_and_keeps_original(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg, b"first", version="v1")
    with pytest.raises(RegistryError, match="already exists"):
        _publish(reg, b"second", version="v1")
    assert reg.load("v1").model == b"first"
    assert list((tmp_path / "tmp").iterdir()) == []  # the staging copy was cleaned up


@pytest.mark.parametrize("name", ["MODEL", "LABELS"])
def test_tampered_file_raises_integrity_error(tmp_path: Path, name: str) -> None:
    reg = Registry(tmp_path)
    version = _publish(reg)
    target = reg.versions_dir / version / (MODEL_FILE if name == "MODEL" else LABELS_FILE)
    if name == "MODEL":
        target.write_bytes(b"onnx-bytez")
    else:
        target.write_text(json.dumps(["greet", "refund", "evil"]))
    with pytest.raises(IntegrityError, match="sha256 differs"):
        reg.load(version)


def test_tampered_tokenizer_raises_integrity_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = _publish(reg)
    (reg.versions_dir / version / TOKENIZER_FILE).write_text("{}")
    with pytest.raises(IntegrityError):
        reg.load(version)


def test_integrity_error_is_a_registry_error() -> None:
    assert issubclass(IntegrityError, RegistryError)


def test_missing_manifest_is_registry_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = _publish(reg)
    (reg.versions_dir / version / MANIFEST_FILE).unlink()
    with pytest.raises(RegistryError, match="unreadable") as info:
        reg.load(version)
    assert not isinstance(info.value, IntegrityError)


def test_missing_version_is_registry_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="unreadable"):
        Registry(tmp_path).load("v7")


def test_corrupt_manifest_is_registry_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = _publish(reg)
    (reg.versions_dir / version / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match="unreadable"):
        reg.load(version)


def test_missing_model_file_is_registry_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = _publish(reg)
    (reg.versions_dir / version / MODEL_FILE).unlink()
    with pytest.raises(RegistryError, match="unreadable"):
        reg.load(version)


def test_manifest_without_model_entry_is_registry_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    version = _publish(reg)
    path = reg.versions_dir / version / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    del manifest["files"][MODEL_FILE]
    path.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=f"lacks {MODEL_FILE}"):
        reg.load(version)


BAD_NAMES = ["../x", "v1/../../etc", "v1/..", "/etc", "x1", "v", "v-1", "V1", "v1.0", "v1\n", " v1"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_version_names_rejected(tmp_path: Path, name: str) -> None:
    (tmp_path / "reg").mkdir()
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="bad version name"):
        reg.load(name)
    with pytest.raises(RegistryError, match="bad version name"):
        _publish(reg, version=name)
    assert reg.list_versions() == []
    assert [p.name for p in tmp_path.iterdir()] == ["reg"]  # nothing written elsewhere
    assert not (tmp_path / "reg" / "versions").exists()


def test_half_written_staging_dir_is_never_listed(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg)
    # What a writer that died mid-publish leaves behind.
    staging = tmp_path / "tmp" / "v2.abc123"
    staging.mkdir(parents=True)
    (staging / MODEL_FILE).write_bytes(b"half")
    assert reg.list_versions() == ["v1"]
    assert reg.latest() == "v1"
    assert reg.next_version() == "v2"
    assert _publish(reg) == "v2"
    assert reg.load("v2").model == b"onnx-bytes"


def test_stray_entries_in_versions_dir_are_ignored(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    _publish(reg)
    (reg.versions_dir / "v2.tmp").mkdir()
    (reg.versions_dir / "latest").mkdir()
    assert reg.list_versions() == ["v1"]


def test_prune_keeps_newest(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for _ in range(5):
        _publish(reg)
    assert reg.prune(2) == ["v1", "v2", "v3"]
    assert reg.list_versions() == ["v4", "v5"]
    assert not (reg.versions_dir / "v1").exists()
    assert reg.prune(2) == []


def test_prune_spares_protected_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for _ in range(5):
        _publish(reg)
    assert reg.prune(1, protect={"v2", "v5"}) == ["v1", "v3", "v4"]
    assert reg.list_versions() == ["v2", "v5"]
    assert reg.load("v2").version == "v2"


def test_prune_with_fewer_versions_than_keep_deletes_nothing(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    assert reg.prune(3) == []
    _publish(reg)
    _publish(reg)
    assert reg.prune(3) == []
    assert reg.list_versions() == ["v1", "v2"]
    assert reg.next_version() == "v3"
