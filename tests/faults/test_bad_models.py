"""Bad model candidates announced while traffic flows: all rejected, zero failed requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stream_distill.bus.kafka import KafkaBus
from stream_distill.registry.store import ModelVersion, Registry
from stream_distill.testing import (
    announce_model,
    eventually,
    make_bow_onnx,
    minilm_tokenizer_json,
    publish_bow,
    serve_for_test,
    with_external_data,
)

LABELS = ("order_status", "refund", "cancel_order", "greeting")
OUTSIDE = "outside.bin"  # valid weights for the bias, beside (not inside) the registry


def _external(location: str, initializer: str = "bias") -> bytes:
    """A bow model with one initializer read from ``location`` (ONNX external data)."""
    return with_external_data(make_bow_onnx(LABELS, seed=7), location, initializer)


def _nan() -> bytes:
    model = onnx.load_from_string(make_bow_onnx(LABELS, seed=5))
    for init in model.graph.initializer:
        if init.name == "bias":
            init.CopyFrom(numpy_helper.from_array(np.full(len(LABELS), np.nan, np.float32), "bias"))
    return bytes(model.SerializeToString())


def _candidates(root: Path) -> dict[str, Callable[[Registry], tuple[ModelVersion, dict[str, Any]]]]:
    tok = minilm_tokenizer_json()
    truncated = make_bow_onnx(LABELS, seed=9)[:5000]
    return {
        "nan-weights": lambda r: (r.publish(_nan(), LABELS, tok), {}),
        "truncated": lambda r: (r.publish(truncated, LABELS, tok), {}),
        "wrong-sha256": lambda r: (publish_bow(r, LABELS, seed=9), {"sha256": "0" * 64}),
        "wrong-width": lambda r: (
            r.publish(make_bow_onnx((*LABELS, "x"), seed=9), LABELS, tok),
            {},
        ),
        # <registry>/versions/<v>/../../../outside.bin is a real file of the right size
        "external-escape": lambda r: (r.publish(_external(f"../../../{OUTSIDE}"), LABELS, tok), {}),
        "external-absolute": lambda r: (r.publish(_external(str(root / OUTSIDE)), LABELS, tok), {}),
    }


def _outside_file(root: Path) -> None:
    # Long enough for the bias or the (16 x labels) weight matrix.
    (root / OUTSIDE).write_bytes(np.full(16 * len(LABELS), 0.5, np.float32).tobytes())


async def test_bad_candidates_under_load(kbus: KafkaBus, tmp_path: Path) -> None:
    _outside_file(tmp_path)
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, LABELS, seed=1, bias_label=2)
    answers: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def stream(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                r = await client.post("/v1/classify", json={"text": f"caller {i} asks {n}"})
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text}")
            else:
                answers.append(r.json()["model_version"])

    async with serve_for_test(registry, kbus, poll_interval_s=60) as (serve, client):
        assert await serve.core.wait_ready(10)
        workers = [asyncio.create_task(stream(client, i)) for i in range(4)]
        try:
            async with kbus.producer() as producer:
                for kind, build in _candidates(tmp_path).items():
                    mv, kw = build(registry)
                    mark = len(answers)
                    await announce_model(producer, kbus.topics, mv, **kw)
                    await eventually(lambda v=mv.version: v in serve.core.rejected, timeout_s=15)
                    await eventually(lambda m=mark: len(answers) >= m + 10)  # still answering
                    assert serve.core.version == "v1", kind
                good = publish_bow(registry, LABELS, seed=3, bias_label=1)
                await announce_model(producer, kbus.topics, good)
                await eventually(lambda: serve.core.version == good.version, timeout_s=15)
                mark = len(answers)
                await eventually(lambda: len(answers) >= mark + 10)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    assert failures == []
    assert set(answers) == {"v1", good.version}  # no bad candidate ever answered
    assert sorted(serve.core.rejected) == [f"v{i}" for i in range(2, 8)]


async def test_external_data_relative_to_working_directory_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _outside_file(tmp_path)
    monkeypatch.chdir(tmp_path)  # serve's working directory holds the file, the registry not
    registry = Registry(tmp_path / "registry")
    publish_bow(registry, LABELS, seed=1)
    registry.publish(_external(OUTSIDE, "weight"), LABELS, minilm_tokenizer_json())
    async with serve_for_test(registry, poll_interval_s=0.1) as (serve, client):
        assert await serve.core.wait_ready(10)
        await eventually(lambda: "v2" in serve.core.rejected or serve.core.version == "v2")
        r = await client.post("/v1/classify", json={"text": "hello"})
        assert r.status_code == 200
        assert serve.core.version == "v1" and "v2" in serve.core.rejected
