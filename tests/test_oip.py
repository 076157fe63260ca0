"""Open Inference Protocol v2 on serve: the real tritonclient against a real uvicorn server.

tritonclient's HTTP client is synchronous, so each use of it runs in a worker
thread (``triton``) while the server keeps the test's event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from stream_distill.bus.base import Topics
from stream_distill.bus.memory import MemoryBus
from stream_distill.config import ServeSettings
from stream_distill.events import Turn
from stream_distill.registry.store import ModelVersion, Registry
from stream_distill.serving.session import StudentSession
from stream_distill.testing import RecordingHooks, eventually, publish_bow, serve_for_test

LABELS = ("order_status", "refund", "cancel_order", "greeting")
TEXTS = ["where is my order A123?", "i want my money back", "hello there", "cancel it please"]
T = TypeVar("T")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def reference_probs(mv: ModelVersion, texts: list[str]) -> np.ndarray:
    session = StudentSession.from_version(mv, ServeSettings())
    return session.predict([[Turn(role="user", text=t)] for t in texts])


async def triton(url: str, call: Callable[[th.InferenceServerClient], T]) -> T:
    """Run ``call`` with a fresh client in a worker thread (the client blocks)."""

    def run() -> T:
        client = th.InferenceServerClient(url.removeprefix("http://"), network_timeout=20.0)
        try:
            return call(client)
        finally:
            client.close()

    return await asyncio.to_thread(run)


def text_input(texts: list[str], *, binary: bool) -> th.InferInput:
    tensor = th.InferInput("TEXT", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    return tensor


def outputs(binary: bool) -> list[th.InferRequestedOutput]:
    return [th.InferRequestedOutput(n, binary_data=binary) for n in ("PROBS", "LABELS", "INTENT")]


def infer(*args: Any, **kw: Any) -> Callable[[th.InferenceServerClient], th.InferResult]:
    """``client.infer(*args, **kw)``, for :func:`triton`."""
    return lambda client: client.infer(*args, **kw)


def raises(call: Callable[[th.InferenceServerClient], Any]) -> Callable[..., Any]:
    """``call`` expected to fail: its (status, message)."""

    def run(client: th.InferenceServerClient) -> tuple[str | None, str]:
        with pytest.raises(InferenceServerException) as info:
            call(client)
        return info.value.status(), info.value.message()

    return run


def strings(array: np.ndarray | None) -> list[str]:
    """A BYTES output as text: bytes when it came binary, str when it came as JSON."""
    assert array is not None
    return [x.decode() if isinstance(x, bytes) else x for x in array.tolist()]


def check_result(result: th.InferResult, mv: ModelVersion, texts: list[str]) -> None:
    want = reference_probs(mv, texts)
    probs = result.as_numpy("PROBS")
    assert probs is not None and probs.dtype == np.float32 and probs.shape == (len(texts), 4)
    np.testing.assert_allclose(probs, want, atol=1e-5, rtol=0)
    assert strings(result.as_numpy("LABELS")) == list(LABELS)
    assert strings(result.as_numpy("INTENT")) == [LABELS[i] for i in want.argmax(axis=1)]
    assert result.get_response()["model_version"] == mv.version


# -- tritonclient ---------------------------------------------------------------------------


async def test_probes_and_metadata(registry: Registry) -> None:
    async with serve_for_test(registry) as (serve, _):
        url = serve.url
        assert await triton(url, lambda c: c.is_server_live())
        assert not await triton(url, lambda c: c.is_server_ready())
        assert not await triton(url, lambda c: c.is_model_ready("intent"))
        status, message = await triton(url, raises(lambda c: c.get_model_metadata("intent")))
        assert status == "503" and "no version loaded" in message
        status, message = await triton(
            url, raises(infer("intent", [text_input(["hi"], binary=False)]))
        )
        assert status == "503" and "no version loaded" in message

        mv = publish_bow(registry, LABELS, seed=3)  # the registry poll finds it
        await eventually(lambda: serve.core.ready)
        assert await triton(url, lambda c: c.is_server_ready())
        assert await triton(url, lambda c: c.is_model_ready("intent"))
        assert await triton(url, lambda c: c.is_model_ready("intent", "v1"))
        assert not await triton(url, lambda c: c.is_model_ready("intent", "v9"))
        assert not await triton(url, lambda c: c.is_model_ready("nope"))

        server = await triton(url, lambda c: c.get_server_metadata())
        assert server["name"] == "stream_distill" and "binary_tensor_data" in server["extensions"]
        meta = await triton(url, lambda c: c.get_model_metadata("intent"))
        assert meta == {
            "name": "intent",
            "versions": [mv.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "PROBS", "datatype": "FP32", "shape": [-1, 4]},
                {"name": "LABELS", "datatype": "BYTES", "shape": [4]},
                {"name": "INTENT", "datatype": "BYTES", "shape": [-1]},
            ],
        }
        assert await triton(url, lambda c: c.get_model_metadata("intent", "v1")) == meta
        status, message = await triton(url, raises(lambda c: c.get_model_metadata("nope")))
        assert status == "404" and "unknown model 'nope'" in message


async def test_infer_json_binary_and_compressed(registry: Registry) -> None:
    mv = publish_bow(registry, LABELS, seed=3)
    async with serve_for_test(registry) as (serve, _):
        assert await serve.core.wait_ready(10)
        url = serve.url
        for binary in (False, True):
            inputs, wanted = [text_input(TEXTS, binary=binary)], outputs(binary)
            result = await triton(url, infer("intent", inputs, outputs=wanted, request_id="r1"))
            check_result(result, mv, TEXTS)
            assert result.get_response()["id"] == "r1"
            sent_binary = [o for o in result.get_response()["outputs"] if "parameters" in o]
            assert len(sent_binary) == (3 if binary else 0)

        # No outputs named: tritonclient asks for all of them in binary.
        result = await triton(url, infer("intent", [text_input(TEXTS, binary=True)]))
        check_result(result, mv, TEXTS)
        # Mixed: JSON input, one binary output, one JSON output; one text.
        mixed = [th.InferRequestedOutput("PROBS"), th.InferRequestedOutput("INTENT", False)]
        result = await triton(
            url, infer("intent", [text_input(TEXTS[:1], binary=False)], outputs=mixed)
        )
        assert [o["name"] for o in result.get_response()["outputs"]] == ["PROBS", "INTENT"]
        assert result.as_numpy("LABELS") is None
        want = reference_probs(mv, TEXTS[:1])
        np.testing.assert_allclose(result.as_numpy("PROBS"), want, atol=1e-5, rtol=0)
        inputs = [text_input(TEXTS, binary=True)]
        for algorithm in ("gzip", "deflate"):
            call = infer(
                "intent", inputs, model_version="v1", request_compression_algorithm=algorithm
            )
            check_result(await triton(url, call), mv, TEXTS)


async def test_model_version_names_the_model_that_ran(registry: Registry) -> None:
    publish_bow(registry, LABELS, seed=3)
    async with serve_for_test(registry) as (serve, _):
        assert await serve.core.wait_ready(10)
        mv2 = publish_bow(registry, LABELS, seed=4, bias_label=1)
        await eventually(lambda: serve.core.version == mv2.version)
        result = await triton(serve.url, infer("intent", [text_input(TEXTS, binary=True)]))
        check_result(result, mv2, TEXTS)
        assert set(strings(result.as_numpy("INTENT"))) == {"refund"}
        status, message = await triton(
            serve.url,
            raises(infer("intent", [text_input(["hi"], binary=True)], model_version="v1")),
        )
        assert status == "404" and "version 'v1' is not loaded (serving 'v2')" in message


async def test_client_errors_are_4xx_with_a_reason(registry: Registry) -> None:
    publish_bow(registry, LABELS)
    async with serve_for_test(registry) as (serve, _):
        assert await serve.core.wait_ready(10)
        floats = th.InferInput("TEXT", [2], "FP32")
        floats.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
        matrix = th.InferInput("TEXT", [2, 1], "BYTES")
        matrix.set_data_from_numpy(np.array([["a"], ["b"]], dtype=object))
        other = th.InferInput("WORDS", [1], "BYTES")
        other.set_data_from_numpy(np.array(["a"], dtype=object))
        hi = [text_input(["hi"], binary=True)]
        cases: list[tuple[Callable[[th.InferenceServerClient], Any], str, str]] = [
            (infer("nope", hi), "404", "unknown model 'nope'"),
            (infer("intent", [floats]), "400", "datatype 'FP32', expected 'BYTES'"),
            (infer("intent", [matrix]), "400", "shape [2, 1], expected [-1]"),
            (infer("intent", [other]), "400", "unexpected input 'WORDS'"),
            (infer("intent", [hi[0], hi[0]]), "400", "the one input 'TEXT'"),
            (
                infer("intent", hi, outputs=[th.InferRequestedOutput("LOGITS")]),
                "400",
                "unknown output 'LOGITS'",
            ),
            (
                infer("intent", hi, outputs=[th.InferRequestedOutput("PROBS", class_count=2)]),
                "400",
                "classification extension is not supported",
            ),
        ]
        for call, want_status, want_reason in cases:
            status, message = await triton(serve.url, raises(call))
            assert (status, want_reason in message) == (want_status, True), message


def binary_body(header: dict[str, Any], tail: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head))}


def packed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def text_tensor(shape: list[int], size: int) -> dict[str, Any]:
    return {
        "name": "TEXT",
        "datatype": "BYTES",
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


def json_request(data: Any, shape: list[int] | None = None) -> bytes:
    shape = shape if shape is not None else [len(data)]
    tensor = {"name": "TEXT", "datatype": "BYTES", "shape": shape, "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


MALFORMED: list[tuple[bytes, dict[str, str], str]] = [
    (b"{not json", {}, "not JSON"),
    (b"[1, 2]", {}, "must be a JSON object"),
    (b"\xff\xfe{", {}, "not JSON"),
    (b'{"inputs": []}', {}, "the one input 'TEXT'"),
    (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1]}]}', {}, "has no data"),
    (json_request(["a", "b"], [3]), {}, "shape [3] but 2 elements"),
    (json_request([1, 2]), {}, "data must hold strings"),
    (json_request(["ok", "  "]), {}, "element 1 is empty"),
    (json_request(["x" * 2001]), {}, "longer than 2000 characters"),
    (json_request(["a"] * 65), {}, "65 texts, expected 1 to 64"),
    (json_request(["a"], [-1]), {}, "non-negative integers"),
    (json_request(["a"]), {"Content-Encoding": "br"}, "unsupported Content-Encoding 'br'"),
    (json_request(["a"]), {"Content-Encoding": "gzip"}, "not valid gzip"),
    (b"{}", {"Inference-Header-Content-Length": "99"}, "bad Inference-Header-Content-Length"),
    (b"{}", {"Inference-Header-Content-Length": "x"}, "bad Inference-Header-Content-Length"),
    (b"", {}, "not JSON"),
]


def _binary_cases() -> list[tuple[bytes, dict[str, str], str]]:
    cases: list[tuple[dict[str, Any], bytes, str]] = [
        ({"inputs": [text_tensor([1], 10)]}, packed(b"hi"), "does not fit the body"),
        ({"inputs": [text_tensor([1], 3)]}, b"\x05\x00\x00", "inside an element length"),
        ({"inputs": [text_tensor([1], 6)]}, b"\x09\x00\x00\x00hi", "past the buffer end"),
        ({"inputs": [text_tensor([2], 6)]}, packed(b"hi"), "shape [2] but 1 elements"),
        ({"inputs": [text_tensor([1], 6)]}, packed(b"hi") + b"!!", "belong to no input"),
        ({"inputs": [text_tensor([1], 6)]}, packed(b"\xff\xfe"), "must be UTF-8"),
        (
            {"inputs": [{**text_tensor([1], 6), "data": ["hi"]}]},
            packed(b"hi"),
            "both data and binary_data_size",
        ),
    ]
    return [(*binary_body(h, t), reason) for h, t, reason in cases]


async def test_malformed_bodies_get_400(registry: Registry) -> None:
    publish_bow(registry, LABELS)
    cases = [*MALFORMED, *_binary_cases()]
    async with serve_for_test(registry) as (serve, client):
        assert await serve.core.wait_ready(10)
        for body, headers, reason in cases:
            r = await client.post("/v2/models/intent/infer", content=body, headers=headers)
            assert r.status_code == 400, (body[:60], r.text)
            assert reason in r.json()["error"], (reason, r.text)
        r = await client.get("/v2/models/nope/ready")
        assert r.status_code == 404 and "unknown model" in r.json()["error"]


# -- plain HTTP -----------------------------------------------------------------------------


async def test_plain_json_round_trip(registry: Registry) -> None:
    mv = publish_bow(registry, LABELS, seed=3)
    bus = MemoryBus(Topics("oip."))
    hooks = RecordingHooks()
    async with serve_for_test(registry, bus, hooks=hooks) as (serve, client):
        assert await serve.core.wait_ready(10)
        request = {
            "id": "42",
            "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]}],
        }
        r = await client.post("/v2/models/intent/infer", json=request)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert (body["model_name"], body["model_version"], body["id"]) == ("intent", "v1", "42")
        out = {o["name"]: o for o in body["outputs"]}
        assert (out["PROBS"]["datatype"], out["PROBS"]["shape"]) == ("FP32", [2, 4])
        want = reference_probs(mv, TEXTS[:2])
        np.testing.assert_allclose(
            np.array(out["PROBS"]["data"], dtype=np.float32).reshape(2, 4), want, atol=1e-5
        )
        assert out["LABELS"] == {"name": "LABELS", "datatype": "BYTES", "shape": [4],
                                 "data": list(LABELS)}  # fmt: skip
        assert out["INTENT"]["data"] == [LABELS[i] for i in want.argmax(axis=1)]

        # Nested data, gzip, no Content-Type (as tritonclient sends it).
        nested = json_request([[TEXTS[0]], [TEXTS[1]]], [2])
        r = await client.post(
            "/v2/models/intent/infer",
            content=gzip.compress(nested),
            headers={"Content-Encoding": "gzip", "Content-Type": ""},
        )
        assert r.status_code == 200, r.text
        assert {o["name"]: o for o in r.json()["outputs"]}["PROBS"]["data"] == out["PROBS"]["data"]
        assert (await client.get("/v2")).json()["extensions"] == ["binary_tensor_data"]
        ready = await client.get("/v2/models/intent/ready")
        assert ready.status_code == 200 and ready.json()["version"] == "v1"
        assert (await client.get("/v2/health/ready")).status_code == 200

    outcomes = [(o, v) for o, _, v in hooks.named("on_request")]
    assert outcomes == [("ok", "v1"), ("ok", "v1")]
    assert hooks.named("on_batch") == [(2,), (2,)]
    assert bus.records(bus.topics.requests) == []  # OIP inference emits no request events
