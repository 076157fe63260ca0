"""The model store on an S3-compatible object store: the only module that imports boto3.

Same layout as the local store, under ``s3://<bucket>/<prefix>``::

    <prefix>/versions/<version>/model.onnx
                               /labels.json
                               /tokenizer.json
                               /manifest.json

S3 has no rename, so a version is made visible by its manifest: the three files
go up first and ``manifest.json`` last, and readers list manifests only. A
crashed publish therefore leaves orphan files but never half a version. Pruning
deletes the manifest first for the same reason. ``load`` verifies every file's
sha256 exactly like the local store: a replaced object raises IntegrityError.

boto3 is an optional extra (``pip install 'stream-distill[s3]'``); credentials
come from settings or, when unset, from boto3's usual chain (env, profile, IAM role).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from stream_distill.config import RegistrySettings
from stream_distill.errors import RegistryError
from stream_distill.registry.base import (
    MANIFEST_FILE,
    ModelVersion,
    VersionedStore,
    check_version_name,
    parse_manifest,
    sort_versions,
    verified,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

SCHEME = "s3://"


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b/")``; the prefix is empty or ends in ``/``."""
    if not uri.startswith(SCHEME):
        raise RegistryError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len(SCHEME) :].partition("/")
    if not bucket:
        raise RegistryError(f"no bucket in {uri!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def make_client(settings: RegistrySettings) -> S3Client:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # serve images without the extra
        raise RegistryError(
            f"registry root {settings.root!r} needs boto3: pip install 'stream-distill[s3]'"
        ) from exc
    secret = settings.s3_secret_access_key
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        # Path-style addressing: MinIO, Ceph and test servers rarely have per-bucket DNS.
        config=Config(
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


class S3Registry(VersionedStore):
    """Versions ``v1, v2, ...`` under ``s3://bucket/prefix``; one writer, many readers."""

    def __init__(self, client: S3Client, bucket: str, prefix: str = "") -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.versions_key = f"{self.prefix}versions/"
        self._s3_errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> S3Registry:
        bucket, prefix = split_uri(settings.root)
        return cls(make_client(settings), bucket, prefix)

    def _key(self, version: str, name: str = "") -> str:
        return f"{self.versions_key}{version}/{name}"

    def uri(self, version: str) -> str:
        return f"{SCHEME}{self.bucket}/{self._key(version)}".rstrip("/")

    def list_versions(self) -> list[str]:
        names: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.versions_key
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    version, _, name = obj["Key"][len(self.versions_key) :].partition("/")
                    if name == MANIFEST_FILE:
                        names.append(version)
        except self._s3_errors as exc:
            raise RegistryError(f"cannot list {self.uri('')}: {exc}") from exc
        return sort_versions(names)

    def _write(self, version: str, files: dict[str, bytes], manifest: bytes) -> None:
        """Upload the files, then the manifest that makes the version exist."""
        if self._exists(self._key(version, MANIFEST_FILE)):
            raise RegistryError(f"version {version} already exists")
        try:
            for name, data in files.items():
                self.client.put_object(Bucket=self.bucket, Key=self._key(version, name), Body=data)
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(version, MANIFEST_FILE),
                Body=manifest,
                ContentType="application/json",
            )
        except self._s3_errors as exc:
            raise RegistryError(f"publishing {self.uri(version)} failed: {exc}") from exc

    def load(self, version: str) -> ModelVersion:
        """Read a version and verify every file against its manifest."""
        check_version_name(version)
        try:
            manifest = json.loads(self._get(self._key(version, MANIFEST_FILE)))
            blobs = {name: self._get(self._key(version, name)) for name in manifest["files"]}
            return verified(version, manifest, blobs)
        except self._s3_errors as exc:
            raise RegistryError(f"version {version} unreadable: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:  # a manifest that is not ours
            raise RegistryError(f"version {version} unreadable: {exc}") from exc

    def read_manifest(self, version: str) -> dict[str, Any]:
        check_version_name(version)
        try:
            data = self._get(self._key(version, MANIFEST_FILE))
        except self._s3_errors as exc:
            raise RegistryError(f"version {version} unreadable: {exc}") from exc
        return parse_manifest(version, data)

    def prune(self, keep: int, protect: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Delete all but the newest ``keep`` versions (and any in ``protect``)."""
        versions = self.list_versions()
        doomed = [v for v in versions[:-keep] if v not in protect] if keep else []
        for v in doomed:
            try:
                # The manifest first: from then on no reader sees the version.
                self.client.delete_object(Bucket=self.bucket, Key=self._key(v, MANIFEST_FILE))
                listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(v))
                rest: list[ObjectIdentifierTypeDef] = [
                    {"Key": o["Key"]} for o in listed.get("Contents", [])
                ]
                if rest:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": rest})
            except self._s3_errors as exc:
                raise RegistryError(f"pruning {self.uri(v)} failed: {exc}") from exc
        return doomed

    def _get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except self._s3_errors as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise RegistryError(f"cannot reach {self.uri('')}: {exc}") from exc
        return True
