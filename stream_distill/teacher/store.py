"""A versioned teacher store on a filesystem (local disk or a volume every scorer mounts).

Layout::

    <root>/versions/<version>/model.safetensors, config.json   (HF weights and config)
                             /tokenizer.json, teacher.json      (see teacher.model)
                             /manifest.json  {version, files: {name: sha256}, teacher_version,
                                              labels, label_set_version, parent, metrics, ...}

Versions are ``v1, v2, ...`` like the student registry. A writer builds a version in
``<root>/tmp/`` and renames it into ``versions/``, so a reader never sees half of
one. Readers check the manifest's own sha256 (announced in ``TeacherPublished``)
and every file against the manifest before loading.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stream_distill.errors import IntegrityError, RegistryError
from stream_distill.registry.base import (
    check_version_name,
    next_after,
    parse_manifest,
    sha256_bytes,
    sort_versions,
)
from stream_distill.teacher.model import TeacherModel

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True, slots=True)
class StoredTeacher:
    """A version as written: its name, the sha256 of its manifest, and the manifest."""

    version: str
    sha256: str
    manifest: dict[str, Any]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TeacherStore:
    """Teacher versions under ``root``; one writer (the updater), many readers (scorers)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"

    def uri(self, version: str) -> str:
        return (self.versions_dir / version).resolve().as_uri()

    def list_versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sort_versions([p.name for p in self.versions_dir.iterdir()])

    def latest(self) -> str | None:
        versions = self.list_versions()
        return versions[-1] if versions else None

    def publish(
        self,
        teacher: TeacherModel,
        *,
        parent: str | None = None,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> StoredTeacher:
        """Write ``teacher`` as the next version; all of it becomes visible at once."""
        version = next_after(self.latest())
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{version}.", dir=tmp_root))
        try:
            teacher.save(staging)
            files = {p.name: sha256_bytes(p.read_bytes()) for p in sorted(staging.iterdir())}
            manifest: dict[str, Any] = {
                "version": version,
                "files": files,
                "teacher_id": teacher.teacher_id,
                "teacher_version": teacher.version,
                "labels": list(teacher.labels),
                "label_set_version": teacher.label_set_version,
                "parent": parent,
                "metrics": dict(metrics or {}),
                "created": datetime.now(UTC).isoformat(),
                **dict(extra or {}),
            }
            data = json.dumps(manifest, indent=2).encode()
            with open(staging / MANIFEST_FILE, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            for name in files:
                with open(staging / name, "rb") as fh:
                    os.fsync(fh.fileno())
            target = self.versions_dir / version
            if target.exists():
                raise RegistryError(f"teacher version {version} already exists")
            os.rename(staging, target)
            _fsync(self.versions_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return StoredTeacher(version, sha256_bytes(data), manifest)

    def read_manifest(self, version: str) -> dict[str, Any]:
        """The manifest alone, unverified; RegistryError if unreadable."""
        check_version_name(version)
        try:
            data = (self.versions_dir / version / MANIFEST_FILE).read_bytes()
        except OSError as exc:
            raise RegistryError(f"teacher version {version} unreadable: {exc}") from exc
        return parse_manifest(version, data)

    def manifest_sha256(self, version: str) -> str:
        """sha256 of the version's manifest as stored; RegistryError if unreadable."""
        check_version_name(version)
        try:
            return sha256_bytes((self.versions_dir / version / MANIFEST_FILE).read_bytes())
        except OSError as exc:
            raise RegistryError(f"teacher version {version} unreadable: {exc}") from exc

    def verify(self, version: str, expected_sha256: str | None = None) -> dict[str, Any]:
        """Check the manifest (against ``expected_sha256`` when given) and every file it names."""
        check_version_name(version)
        folder = self.versions_dir / version
        try:
            data = (folder / MANIFEST_FILE).read_bytes()
        except OSError as exc:
            raise RegistryError(f"teacher version {version} unreadable: {exc}") from exc
        if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
            raise IntegrityError(f"teacher {version}/{MANIFEST_FILE}: sha256 differs from event")
        manifest = parse_manifest(version, data)
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise RegistryError(f"teacher version {version}: manifest names no files")
        for name, digest in files.items():
            try:
                blob = (folder / name).read_bytes()
            except OSError as exc:
                raise RegistryError(f"teacher version {version} lacks {name}: {exc}") from exc
            if sha256_bytes(blob) != digest:
                raise IntegrityError(f"teacher {version}/{name}: sha256 differs from manifest")
        return manifest

    def load(
        self, version: str, expected_sha256: str | None = None, *, teacher_id: str | None = None
    ) -> TeacherModel:
        """Verify, then load; RegistryError if unreadable, IntegrityError if tampered."""
        manifest = self.verify(version, expected_sha256)
        try:
            teacher = TeacherModel.load(self.versions_dir / version, teacher_id=teacher_id)
        except (OSError, ValueError, KeyError) as exc:
            raise RegistryError(f"teacher version {version} unloadable: {exc}") from exc
        if teacher.version != manifest.get("teacher_version"):
            raise IntegrityError(f"teacher {version}: weights version differs from manifest")
        teacher.meta["store_version"] = version
        return teacher

    def prune(self, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete all but the newest ``keep`` versions (and any in ``protect``)."""
        versions = self.list_versions()
        doomed = [v for v in versions[:-keep] if v not in protect] if keep else []
        for v in doomed:
            shutil.rmtree(self.versions_dir / v, ignore_errors=True)
        return doomed
