"""Loading a candidate: one sealed copy, hashed and loaded as is; canned inputs encoded once."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from stream_distill.config import ServeSettings
from stream_distill.errors import IntegrityError, ModelRejected
from stream_distill.models.text import TextEncoder
from stream_distill.registry.sealed import SealedFile, sealing_available, sha256_of
from stream_distill.registry.store import MODEL_FILE, Registry
from stream_distill.serving import session as session_module
from stream_distill.serving.session import CANNED_DIALOGUES, StudentSession
from stream_distill.testing import (
    make_bow_onnx,
    minilm_tokenizer_json,
    publish_bow,
    with_external_data,
)

LABELS = ("order_status", "refund", "cancel_order", "greeting")
sealed_only = pytest.mark.skipif(not sealing_available(), reason="needs memfd sealing (Linux)")


@sealed_only
def test_local_load_hands_out_a_sealed_copy_nothing_can_change(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    published = publish_bow(registry, LABELS, seed=1)
    loaded = registry.load(published.version)
    content = loaded.content
    assert isinstance(content, SealedFile)
    assert content.sha256() == published.sha256 == loaded.sha256
    fd = content.fileno()
    with pytest.raises(PermissionError):
        os.write(fd, b"x")
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 10)
    # The registry's file changes afterwards, in place: the loaded copy does not.
    path = registry.versions_dir / published.version / MODEL_FILE
    with open(path, "r+b") as fh:
        fh.write(b"\x00" * 64)
    assert loaded.model == published.model
    assert content.sha256() == published.sha256
    with pytest.raises(IntegrityError):
        registry.load(published.version)


@sealed_only
def test_sealed_path_opens_the_sealed_bytes_alone_in_its_folder() -> None:
    sealed = SealedFile.of_bytes(b"\x00model\xff")
    with sealed.path() as path:
        assert os.listdir(os.path.dirname(path)) == ["model.onnx"]
        assert Path(path).read_bytes() == b"\x00model\xff"
        fd = os.open(path, os.O_RDWR)  # a second opening of the file may not write either
        try:
            with pytest.raises(OSError) as info:
                os.write(fd, b"x")
            assert info.value.errno == errno.EPERM
        finally:
            os.close(fd)
    assert not os.path.exists(path)
    assert sha256_of(sealed) == hashlib.sha256(b"\x00model\xff").hexdigest()


@sealed_only
def test_empty_sealed_file_hashes_and_reads_as_empty() -> None:
    sealed = SealedFile.of_bytes(b"")
    assert sealed.read() == b""
    assert sealed.sha256() == hashlib.sha256(b"").hexdigest()


def _external(location: str) -> bytes:
    return with_external_data(make_bow_onnx(LABELS, seed=7), location)


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "private-file"])
@pytest.mark.parametrize("location", ["model.onnx", "labels.json", "0", "../../../etc/hostname"])
def test_external_data_finds_nothing_on_either_load_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sealed: bool, location: str
) -> None:
    """Not the model file itself (in the load folder), nor the registry's other files,
    nor an open descriptor (the sealed file is reached through ``/proc/self/fd``)."""
    if sealed and not sealing_available():
        pytest.skip("needs memfd sealing (Linux)")
    if not sealed:
        monkeypatch.setattr(session_module, "sealing_available", lambda: False)
        monkeypatch.setattr(
            "stream_distill.registry.store.read_model", lambda path: path.read_bytes()
        )
    registry = Registry(tmp_path)
    (tmp_path / "0").write_bytes(b"\x00" * 64)
    mv = registry.publish(_external(location), LABELS, minilm_tokenizer_json())
    loaded = registry.load(mv.version)
    assert isinstance(loaded.content, SealedFile) == sealed
    with pytest.raises(ModelRejected, match="cannot load"):
        StudentSession.from_version(loaded, ServeSettings())


def test_both_load_paths_answer_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(tmp_path)
    mv = publish_bow(registry, LABELS, seed=2)
    first = StudentSession.from_version(registry.load(mv.version), ServeSettings())
    first.verify()
    monkeypatch.setattr(session_module, "sealing_available", lambda: False)
    second = StudentSession.from_version(mv, ServeSettings())  # bytes, via a private file
    second.verify()
    dialogues = list(CANNED_DIALOGUES)
    assert np.abs(first.predict(dialogues) - second.predict(dialogues)).max() <= 1e-6


def test_verify_encodes_the_canned_dialogues_once_per_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoding the over-long canned dialogues holds the GIL; versions that share a
    tokenizer share the encoding, so a swap does not stall requests for it."""
    registry = Registry(tmp_path)
    v1 = publish_bow(registry, LABELS, seed=1, max_length=40)
    v2 = publish_bow(registry, LABELS, seed=2, max_length=40)
    first = StudentSession.from_version(registry.load(v1.version), ServeSettings())
    first.verify()
    calls = []
    real = TextEncoder.encode

    def counting(self: TextEncoder, dialogues: object) -> object:
        calls.append(dialogues)
        return real(self, dialogues)  # type: ignore[arg-type]

    monkeypatch.setattr(TextEncoder, "encode", counting)
    second = StudentSession.from_version(registry.load(v2.version), ServeSettings())
    assert second.encoder is first.encoder
    second.verify()
    assert calls == []
    # The cached encoding is the encoding: the same answers as encoding afresh.
    fresh = second.predict(list(CANNED_DIALOGUES))
    assert len(calls) == 1
    cached = second._run(session_module._canned(second.encoder)[0])
    assert np.array_equal(fresh, cached)
