"""What every model store offers, and the manifest both stores write and check.

A version is four files under ``versions/<version>/``; ``manifest.json`` records
the sha256 of the other three. A store is the local directory
(:mod:`~stream_distill.registry.store`) or an S3-compatible bucket
(:mod:`~stream_distill.registry.s3`); serve and the trainer see only
:class:`ModelStore`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from stream_distill.errors import IntegrityError, RegistryError
from stream_distill.registry.sealed import SealedFile, sha256_of

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{1,9})\Z")  # \Z, not $: "$" also matches before a final "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_version_name(version: str) -> None:
    if not _VERSION_RE.match(version):
        raise RegistryError(f"bad version name {version!r}")


def sort_versions(names: list[str]) -> list[str]:
    """The well-formed names among ``names``, oldest first (``v2`` before ``v10``)."""
    found = [n for n in names if _VERSION_RE.match(n)]
    return sorted(found, key=lambda v: int(v[1:]))


@dataclass(frozen=True)
class ModelVersion:
    """A verified version, read fully into memory.

    ``content`` holds ``model.onnx``: ``bytes``, or (loaded from a local store on Linux)
    a :class:`~stream_distill.registry.sealed.SealedFile` that nothing can change.
    """

    version: str
    content: bytes | SealedFile
    labels: tuple[str, ...]
    tokenizer_json: str
    manifest: dict[str, Any]

    @property
    def model(self) -> bytes:
        """``model.onnx`` as bytes (a copy when the content is a sealed file)."""
        content = self.content
        return content.read() if isinstance(content, SealedFile) else content

    @property
    def sha256(self) -> str:
        return str(self.manifest["files"][MODEL_FILE])

    @property
    def max_length(self) -> int:
        return int(self.manifest.get("max_length", 64))


def version_files(model: bytes, labels: tuple[str, ...], tokenizer_json: str) -> dict[str, bytes]:
    return {
        MODEL_FILE: model,
        LABELS_FILE: json.dumps(list(labels)).encode(),
        TOKENIZER_FILE: tokenizer_json.encode(),
    }


def build_manifest(
    version: str,
    files: Mapping[str, bytes],
    labels: tuple[str, ...],
    *,
    parent: str | None,
    metrics: Mapping[str, Any] | None,
    max_length: int,
) -> dict[str, Any]:
    return {
        "version": version,
        "files": {name: sha256_bytes(data) for name, data in files.items()},
        "labels": list(labels),
        "parent": parent,
        "metrics": dict(metrics or {}),
        "max_length": max_length,
        "created": datetime.now(UTC).isoformat(),
    }


def verified(
    version: str, manifest: dict[str, Any], blobs: Mapping[str, bytes | SealedFile]
) -> ModelVersion:
    """Check ``blobs`` (every file the manifest names) against it; the loaded version.

    Each file is hashed exactly once, here; only ``model.onnx`` may be a sealed file.
    """
    expected: dict[str, str] = manifest["files"]
    for name in (MODEL_FILE, LABELS_FILE, TOKENIZER_FILE):
        if name not in blobs:
            raise RegistryError(f"version {version} lacks {name}")
    for name, data in blobs.items():
        if sha256_of(data) != expected[name]:
            raise IntegrityError(f"{version}/{name}: sha256 differs from manifest")
    labels = json.loads(_plain(blobs[LABELS_FILE]))
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise RegistryError(f"version {version}: labels.json is not a list of strings")
    tokenizer_json = _plain(blobs[TOKENIZER_FILE]).decode()
    return ModelVersion(version, blobs[MODEL_FILE], tuple(labels), tokenizer_json, manifest)


def _plain(data: bytes | SealedFile) -> bytes:
    return data.read() if isinstance(data, SealedFile) else data


class ModelStore(Protocol):
    """Versions ``v1, v2, ...``; one writer (the trainer), many readers (serve replicas)."""

    def uri(self, version: str) -> str:
        """Where ``version`` lives, for ``ModelPublished.uri`` (``file://`` or ``s3://``)."""
        ...

    def list_versions(self) -> list[str]:
        """Complete versions only, oldest first."""
        ...

    def latest(self) -> str | None: ...

    def next_version(self) -> str: ...

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
        """Write a new version so that readers see all of it or none of it."""
        ...

    def load(self, version: str) -> ModelVersion:
        """Read a version; RegistryError if unreadable, IntegrityError if tampered."""
        ...

    def read_manifest(self, version: str) -> dict[str, Any]:
        """Only the manifest (metrics, parent...), unverified; RegistryError if unreadable."""
        ...

    def prune(self, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete all but the newest ``keep`` versions (and any in ``protect``)."""
        ...


def parse_manifest(version: str, data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"version {version}: manifest is not JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise RegistryError(f"version {version}: manifest is not an object")
    return manifest


def next_after(latest: str | None) -> str:
    return f"v{int(latest[1:]) + 1 if latest else 1}"


class VersionedStore:
    """What both stores share: numbering and the preparation of a publish.

    A subclass lists versions, loads them, and writes one prepared version with
    ``_write`` (atomically: a reader sees all of it or none of it).
    """

    def list_versions(self) -> list[str]:
        raise NotImplementedError

    def latest(self) -> str | None:
        versions = self.list_versions()
        return versions[-1] if versions else None

    def next_version(self) -> str:
        return next_after(self.latest())

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
        """Write a new version and return it."""
        version = version or self.next_version()
        check_version_name(version)
        files = version_files(model, labels, tokenizer_json)
        manifest = build_manifest(
            version, files, labels, parent=parent, metrics=metrics, max_length=max_length
        )
        self._write(version, files, json.dumps(manifest).encode())
        return ModelVersion(version, model, labels, tokenizer_json, manifest)

    def _write(self, version: str, files: dict[str, bytes], manifest: bytes) -> None:
        raise NotImplementedError
