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

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stream_distill.errors import IntegrityError, RegistryError

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{1,9})\Z")  # \Z, not $: "$" also matches before a final "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ModelVersion:
    """A verified version, read fully into memory."""

    version: str
    model: bytes
    labels: tuple[str, ...]
    tokenizer_json: str
    manifest: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.manifest["files"][MODEL_FILE])

    @property
    def max_length(self) -> int:
        return int(self.manifest.get("max_length", 64))


class Registry:
    """Versions ``v1, v2, ...`` under ``root``; one writer, many readers."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    def uri(self, version: str) -> str:
        return (self.versions_dir / version).resolve().as_uri()

    def list_versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        found = [p.name for p in self.versions_dir.iterdir() if _VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def latest(self) -> str | None:
        versions = self.list_versions()
        return versions[-1] if versions else None

    def next_version(self) -> str:
        latest = self.latest()
        return f"v{int(latest[1:]) + 1 if latest else 1}"

    def publish(
        self,
        model: bytes,
        labels: tuple[str, ...],
        tokenizer_json: str,
        *,
        parent: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        max_length: int = 64,
        version: str | None = None,
    ) -> ModelVersion:
        """Write a new version atomically and return it."""
        version = version or self.next_version()
        if not _VERSION_RE.match(version):
            raise RegistryError(f"bad version name {version!r}")
        files = {
            MODEL_FILE: model,
            LABELS_FILE: json.dumps(list(labels)).encode(),
            TOKENIZER_FILE: tokenizer_json.encode(),
        }
        manifest: dict[str, Any] = {
            "version": version,
            "files": {name: sha256_bytes(data) for name, data in files.items()},
            "labels": list(labels),
            "parent": parent,
            "metrics": dict(metrics or {}),
            "max_length": max_length,
            "created": datetime.now(UTC).isoformat(),
        }
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=tmp_root))
        try:
            for name, data in (*files.items(), (MANIFEST_FILE, json.dumps(manifest).encode())):
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
        return ModelVersion(version, model, labels, tokenizer_json, manifest)

    def load(self, version: str) -> ModelVersion:
        """Read a version and verify every file against its manifest."""
        if not _VERSION_RE.match(version):
            raise RegistryError(f"bad version name {version!r}")
        folder = self.versions_dir / version
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_bytes())
            expected: dict[str, str] = manifest["files"]
            blobs = {name: (folder / name).read_bytes() for name in expected}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"version {version} unreadable: {exc}") from exc
        for name in (MODEL_FILE, LABELS_FILE, TOKENIZER_FILE):
            if name not in blobs:
                raise RegistryError(f"version {version} lacks {name}")
        for name, data in blobs.items():
            if sha256_bytes(data) != expected[name]:
                raise IntegrityError(f"{version}/{name}: sha256 differs from manifest")
        labels = json.loads(blobs[LABELS_FILE])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise RegistryError(f"version {version}: labels.json is not a list of strings")
        return ModelVersion(
            version, blobs[MODEL_FILE], tuple(labels), blobs[TOKENIZER_FILE].decode(), manifest
        )

    def prune(self, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete all but the newest ``keep`` versions (and any in ``protect``)."""
        versions = self.list_versions()
        doomed = [v for v in versions[:-keep] if v not in protect] if keep else []
        for v in doomed:
            shutil.rmtree(self.versions_dir / v, ignore_errors=True)
        return doomed
