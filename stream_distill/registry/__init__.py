"""Versioned model stores: a local directory, or an S3-compatible bucket."""

from __future__ import annotations

from pathlib import Path

from stream_distill.config import RegistrySettings
from stream_distill.registry.base import ModelStore, ModelVersion


def open_registry(settings: RegistrySettings) -> ModelStore:
    """The store ``settings.root`` names: ``s3://bucket/prefix`` or a directory."""
    if settings.root.startswith("s3://"):
        from stream_distill.registry.s3 import S3Registry  # boto3 only when asked for

        return S3Registry.from_settings(settings)
    from stream_distill.registry.store import Registry

    return Registry(Path(settings.root))


__all__ = ["ModelStore", "ModelVersion", "open_registry"]
