"""A versioned model store on a filesystem (local disk or a shared volume).

Layout::

    <root>/versions/<version>/model.onnx
                             /labels.json
                             /tokenizer.json
                             /manifest.json   {version, files: {name: sha256}, parent, metrics, ...}

Writers build a version in ``<root>/tmp/`` and ``rename`` it into place, so a
reader never sees half a version. Readers verify every file's sha256 against the
manifest before handing the bytes out.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from stream_distill.errors import RegistryError
from stream_distill.registry.base import (
    LABELS_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    ModelVersion,
    VersionedStore,
    check_version_name,
    parse_manifest,
    sha256_bytes,
    sort_versions,
    verified,
)
from stream_distill.registry.sealed import SealedFile, read_model

# Older imports name these from here.
__all__ = [
    "LABELS_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "TOKENIZER_FILE",
    "ModelVersion",
    "Registry",
    "sha256_bytes",
]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry(VersionedStore):
    """Versions ``v1, v2, ...`` under ``root``; one writer, many readers."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    def uri(self, version: str) -> str:
        return (self.versions_dir / version).resolve().as_uri()

    def list_versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sort_versions([p.name for p in self.versions_dir.iterdir()])

    def _write(self, version: str, files: dict[str, bytes], manifest: bytes) -> None:
        """Stage every file (fsynced) in tmp/, then rename the folder into versions/."""
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=tmp_root))
        try:
            for name, data in (*files.items(), (MANIFEST_FILE, manifest)):
                with open(staging / name, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            target = self.versions_dir / version
            if target.exists():
                raise RegistryError(f"version {version} already exists")
            os.rename(staging, target)
            _fsync_dir(self.versions_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load(self, version: str) -> ModelVersion:
        """Read a version and verify every file against its manifest.

        ``model.onnx`` is copied into a sealed in-memory file where possible (see
        :mod:`~stream_distill.registry.sealed`): hashed there, and loaded from there.
        """
        check_version_name(version)
        folder = self.versions_dir / version
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_bytes())
            blobs: dict[str, bytes | SealedFile] = {
                name: read_model(folder / name)
                if name == MODEL_FILE
                else (folder / name).read_bytes()
                for name in manifest["files"]
            }
            return verified(version, manifest, blobs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"version {version} unreadable: {exc}") from exc

    def read_manifest(self, version: str) -> dict[str, Any]:
        check_version_name(version)
        try:
            data = (self.versions_dir / version / MANIFEST_FILE).read_bytes()
        except OSError as exc:
            raise RegistryError(f"version {version} unreadable: {exc}") from exc
        return parse_manifest(version, data)

    def prune(self, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete all but the newest ``keep`` versions (and any in ``protect``)."""
        versions = self.list_versions()
        doomed = [v for v in versions[:-keep] if v not in protect] if keep else []
        for v in doomed:
            shutil.rmtree(self.versions_dir / v, ignore_errors=True)
        return doomed
