"""The model store on S3, against a real S3 API server (moto) on a loopback port."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stream_distill.bus.base import Topics
from stream_distill.bus.broker import free_port
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import RegistrySettings, ServeSettings, Settings
from stream_distill.errors import IntegrityError, RegistryError
from stream_distill.registry import open_registry
from stream_distill.registry.base import MODEL_FILE, sha256_bytes
from stream_distill.registry.s3 import S3Registry, split_uri
from stream_distill.registry.store import Registry
from stream_distill.serving.runner import run_serve
from stream_distill.testing import announce_model, eventually, make_bow_onnx

moto_server = pytest.importorskip("moto.server")

LABELS = ("greet", "refund", "cancel")
TOKENIZER = '{"model": {"type": "WordPiece"}}'
_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def settings(s3_url: str) -> RegistrySettings:
    """A fresh bucket per test, the store under the prefix ``models/``."""
    bucket = f"sd-test-{next(_buckets)}"
    cfg = RegistrySettings(
        root=f"s3://{bucket}/models",
        s3_endpoint_url=s3_url,
        s3_region="us-east-1",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )
    store = open_registry(cfg)
    assert isinstance(store, S3Registry)
    store.client.create_bucket(Bucket=bucket)
    return cfg


@pytest.fixture
def store(settings: RegistrySettings) -> S3Registry:
    s = open_registry(settings)
    assert isinstance(s, S3Registry)
    return s


def _keys(store: S3Registry) -> list[str]:
    listed = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _put(store: S3Registry, key: str, body: bytes) -> None:
    store.client.put_object(Bucket=store.bucket, Key=key, Body=body)


def test_publish_load_round_trip_and_layout(store: S3Registry) -> None:
    assert store.list_versions() == [] and store.latest() is None
    mv = store.publish(b"onnx-bytes", LABELS, TOKENIZER, metrics={"holdout_accuracy": 0.9})
    assert mv.version == "v1"
    assert _keys(store) == [
        f"models/versions/v1/{n}"
        for n in ("labels.json", "manifest.json", "model.onnx", "tokenizer.json")
    ]
    loaded = store.load("v1")
    assert loaded == mv
    assert loaded.model == b"onnx-bytes" and loaded.labels == LABELS
    assert loaded.tokenizer_json == TOKENIZER
    assert loaded.sha256 == sha256_bytes(b"onnx-bytes")
    assert store.read_manifest("v1")["metrics"] == {"holdout_accuracy": 0.9}
    assert store.uri("v1") == f"s3://{store.bucket}/models/versions/v1"


def test_numbering_sorts_by_number_and_refuses_duplicates(store: S3Registry) -> None:
    assert [store.publish(b"m", LABELS, TOKENIZER).version for _ in range(2)] == ["v1", "v2"]
    store.publish(b"m", LABELS, TOKENIZER, version="v10")
    assert store.list_versions() == ["v1", "v2", "v10"]
    assert store.latest() == "v10" and store.next_version() == "v11"
    with pytest.raises(RegistryError, match="already exists"):
        store.publish(b"other", LABELS, TOKENIZER, version="v2")
    assert store.load("v2").model == b"m"
    with pytest.raises(RegistryError, match="bad version name"):
        store.load("../v1")


def test_tampered_object_raises_integrity_error(store: S3Registry) -> None:
    store.publish(b"good", LABELS, TOKENIZER)
    _put(store, "models/versions/v1/model.onnx", b"evil")
    with pytest.raises(IntegrityError, match=r"v1/model\.onnx"):
        store.load("v1")
    store.publish(b"good", LABELS, TOKENIZER)
    _put(store, "models/versions/v2/labels.json", json.dumps(["a", "b", "c"]).encode())
    with pytest.raises(IntegrityError, match=r"v2/labels\.json"):
        store.load("v2")


def test_version_without_manifest_is_invisible(store: S3Registry) -> None:
    store.publish(b"m", LABELS, TOKENIZER)
    # What a publish that crashed before its manifest leaves behind.
    _put(store, f"models/versions/v2/{MODEL_FILE}", b"half")
    _put(store, "models/versions/not-a-version/manifest.json", b"{}")
    assert store.list_versions() == ["v1"] and store.latest() == "v1"
    assert store.next_version() == "v2"
    with pytest.raises(RegistryError) as info:
        store.load("v2")
    assert not isinstance(info.value, IntegrityError)
    # The next publish takes the orphaned name over.
    assert store.publish(b"whole", LABELS, TOKENIZER).version == "v2"
    assert store.load("v2").model == b"whole"


def test_prune_keeps_newest_and_protected(store: S3Registry) -> None:
    for _ in range(5):
        store.publish(b"m", LABELS, TOKENIZER)
    assert store.prune(2, protect={"v1"}) == ["v2", "v3"]
    assert store.list_versions() == ["v1", "v4", "v5"]
    gone = ("models/versions/v2/", "models/versions/v3/")
    assert not [k for k in _keys(store) if k.startswith(gone)]
    assert len(_keys(store)) == 3 * 4
    assert store.prune(10) == []


def test_unreachable_store_is_a_registry_error(settings: RegistrySettings) -> None:
    dead = settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(RegistryError, match="cannot list"):
        open_registry(dead).list_versions()
    missing = settings.model_copy(update={"root": "s3://no-such-bucket/x"})
    with pytest.raises(RegistryError):
        open_registry(missing).list_versions()


def test_missing_boto3_names_the_extra(
    settings: RegistrySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as in an image without the extra
    with pytest.raises(RegistryError, match=r"pip install 'stream-distill\[s3\]'"):
        open_registry(settings)


def test_settings_choose_the_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert split_uri("s3://b/a/b/") == ("b", "a/b/") and split_uri("s3://b") == ("b", "")
    with pytest.raises(RegistryError):
        split_uri("s3:///x")
    monkeypatch.setenv("SD_REGISTRY__ROOT", "s3://models-bucket/prod")
    monkeypatch.setenv("SD_REGISTRY__S3_SECRET_ACCESS_KEY", "hidden")
    from_env = Settings().registry
    assert from_env.root == "s3://models-bucket/prod"  # not folded to "s3:/" like a Path
    assert "hidden" not in repr(from_env)
    local = open_registry(RegistrySettings(root=tmp_path / "reg"))
    assert isinstance(local, Registry) and local.root == tmp_path / "reg"


async def test_serve_loads_and_swaps_from_s3(store: S3Registry) -> None:
    """serve on an S3 store: answers from v1, then hot-swaps to v2 on its ModelPublished."""
    await asyncio.to_thread(
        store.publish, make_bow_onnx(LABELS, seed=1), LABELS, _tokenizer(), version="v1"
    )
    bus = MemoryBus(Topics("sd-s3."))
    kw: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "poll_interval_s": 30.0}
    async with (
        run_serve(store, ServeSettings(), bus, **kw) as serve,
        httpx.AsyncClient(base_url=serve.url, timeout=20.0) as client,
    ):
        await asyncio.wait_for(serve.core.watcher.positioned.wait(), 20.0)
        await eventually(lambda: serve.core.ready)
        r = await client.post("/v1/classify", json={"text": "i want my money back"})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "v1" and r.json()["intent"] in LABELS

        v2 = await asyncio.to_thread(
            store.publish, make_bow_onnx(LABELS, bias_label=2), LABELS, _tokenizer()
        )
        producer = bus.producer()
        await producer.start()
        try:
            await announce_model(producer, bus.topics, v2)
        finally:
            await producer.aclose()
        await eventually(lambda: serve.core.version == "v2")
        r = await client.post("/v1/classify", json={"text": "hello there"})
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "v2" and r.json()["intent"] == "cancel"


def _tokenizer() -> str:
    from stream_distill.testing import minilm_tokenizer_json

    return minilm_tokenizer_json()
