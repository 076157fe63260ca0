"""The Open Inference Protocol v2 (KServe / Triton HTTP) face of serve.

One model, ``intent`` by default: input ``TEXT`` (BYTES ``[n]``, each element one
user turn), outputs ``PROBS`` (FP32 ``[n, labels]``), ``LABELS`` (BYTES
``[labels]``) and ``INTENT`` (BYTES ``[n]``, the argmax). Both the JSON form and
the binary tensor extension are spoken: with an ``Inference-Header-Content-Length``
header the body is a JSON header followed by raw tensors, BYTES elements each
a 4-byte little-endian length and the bytes.

Bodies are parsed here rather than by FastAPI because tritonclient sends its JSON
without a Content-Type and binary bodies are not JSON at all. OIP inference emits
no request events: a batch of bare texts has no conversation to key them on, and
the events are meant for the chatbot's own traffic on ``/v1/classify``.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from stream_distill.events import Turn
from stream_distill.serving.predictor import Predictor
from stream_distill.serving.service import ServingCore

MODEL_NAME = "intent"
PLATFORM = "onnxruntime_onnx"
TEXT, PROBS, LABELS, INTENT = "TEXT", "PROBS", "LABELS", "INTENT"
OUTPUTS = (PROBS, LABELS, INTENT)
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)
MAX_BATCH = 64
"""Texts per request: one request holds a worker thread for its whole batch."""

RETRY_AFTER_S = "1"


class OipError(Exception):
    """A request the protocol refuses: ``status`` and a reason for ``{"error": ...}``."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str | None
    texts: tuple[str, ...]
    outputs: tuple[tuple[str, bool], ...]
    """(output name, as binary) in the order the answer lists them."""


# -- BYTES tensors ----------------------------------------------------------------------------


def encode_bytes_tensor(items: Sequence[bytes]) -> bytes:
    """Each element as a 4-byte little-endian length followed by its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """The inverse of :func:`encode_bytes_tensor`; :class:`OipError` on a torn buffer."""
    items: list[bytes] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise OipError("BYTES tensor ends inside an element length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise OipError(f"BYTES element {len(items)} claims {size} bytes past the buffer end")
        items.append(raw[at : at + size])
        at += size
    return items


# -- requests -------------------------------------------------------------------------------


def _inflate(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    if encoding in (None, "", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise OipError(f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)  # the body limit holds inflated too
    except zlib.error as exc:
        raise OipError(f"body is not valid {encoding}: {exc}") from None
    if len(out) > max_bytes:
        raise OipError(f"inflated body exceeds {max_bytes} bytes", 413)
    return out


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tail of a request body."""
    if header_length is None:
        head, tail = body, b""
    else:
        digits = header_length.strip()
        if not (digits.isascii() and digits.isdigit()) or int(digits) > len(body):
            raise OipError(f"bad {HEADER_LENGTH} {header_length!r} for a {len(body)}-byte body")
        head, tail = body[: int(digits)], body[int(digits) :]
    try:
        parsed = json.loads(head)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise OipError(f"request header is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise OipError("request must be a JSON object")
    return parsed, tail


def _params(obj: dict[str, Any], what: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise OipError(f"{what}: parameters must be an object")
    if "shared_memory_region" in params:
        raise OipError(f"{what}: shared memory is not supported")
    return params


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of flat or nested JSON data (iterative: nesting depth is the caller's)."""
    flat: list[Any] = []
    stack: list[Iterator[Any]] = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _texts(tensor: Any, tail: bytes, limits: tuple[int, int]) -> tuple[tuple[str, ...], int]:
    """The texts of the one input and how many bytes of ``tail`` it used."""
    max_batch, max_chars = limits
    if not isinstance(tensor, dict):
        raise OipError("each input must be an object")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name != TEXT:
        raise OipError(f"unexpected input {name!r}: the model takes one input {TEXT!r}")
    if datatype != "BYTES":
        raise OipError(f"input {TEXT} has datatype {datatype!r}, expected 'BYTES'")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise OipError(f"input {TEXT}: shape must be a list of non-negative integers")
    if len(shape) != 1:
        raise OipError(f"input {TEXT} has shape {shape}, expected [-1] (one text per element)")
    n = shape[0]
    if not 1 <= n <= max_batch:
        raise OipError(f"input {TEXT}: {n} texts, expected 1 to {max_batch}")
    size = _params(tensor, f"input {TEXT}").get("binary_data_size")
    used = 0
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(tail):
            raise OipError(f"input {TEXT}: binary_data_size {size!r} does not fit the body")
        if "data" in tensor:
            raise OipError(f"input {TEXT} has both data and binary_data_size")
        raw = decode_bytes_tensor(tail[:size])
        used = size
        try:
            items = [b.decode("utf-8") for b in raw]
        except UnicodeDecodeError:
            raise OipError(f"input {TEXT}: texts must be UTF-8") from None
    elif "data" in tensor:
        items = _flatten(tensor["data"])
        if not all(isinstance(t, str) for t in items):
            raise OipError(f"input {TEXT}: data must hold strings")
    else:
        raise OipError(f"input {TEXT} has no data")
    if len(items) != n:
        raise OipError(f"input {TEXT} has shape {shape} but {len(items)} elements")
    for i, text in enumerate(items):
        if not text.strip():
            raise OipError(f"input {TEXT}: element {i} is empty")
        if len(text) > max_chars:
            raise OipError(f"input {TEXT}: element {i} is longer than {max_chars} characters")
    return tuple(items), used


def _outputs(req: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
    binary_default = _params(req, "request").get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise OipError("binary_data_output must be a boolean")
    wanted = req.get("outputs")
    if wanted is None:
        return tuple((name, binary_default) for name in OUTPUTS)
    if not isinstance(wanted, list) or not wanted:
        raise OipError("outputs must be a non-empty list")
    chosen: list[tuple[str, bool]] = []
    for out in wanted:
        name = out.get("name") if isinstance(out, dict) else None
        if name not in OUTPUTS:
            raise OipError(f"unknown output {name!r}: the model has {list(OUTPUTS)}")
        if any(name == seen for seen, _ in chosen):
            raise OipError(f"output {name} requested twice")
        params = _params(out, f"output {name}")
        if "classification" in params:
            raise OipError("the classification extension is not supported; use INTENT")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise OipError(f"output {name}: binary_data must be a boolean")
        chosen.append((name, binary))
    return tuple(chosen)


def parse_infer(
    body: bytes, header_length: str | None, max_batch: int, max_chars: int
) -> InferRequest:
    """An infer request body (already inflated) as texts and wanted outputs."""
    req, tail = _split(body, header_length)
    request_id = req.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError("id must be a string")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise OipError(f"inputs must be a list holding the one input {TEXT!r}")
    texts, used = _texts(inputs[0], tail, (max_batch, max_chars))
    if used != len(tail):
        raise OipError(f"{len(tail) - used} bytes of binary data belong to no input")
    return InferRequest(request_id, texts, _outputs(req))


# -- answers --------------------------------------------------------------------------------


def infer_response(
    model_name: str, session: Predictor, probs: np.ndarray, req: InferRequest
) -> Response:
    """The answer, with a binary tail when any output was asked for as binary."""
    labels = list(session.labels)
    n, k = len(req.texts), len(labels)
    probs = np.ascontiguousarray(probs, dtype="<f4").reshape(n, k)
    intents = [labels[i] for i in np.argmax(probs, axis=1)]
    tensors: dict[str, tuple[str, list[int], Any, bytes]] = {
        PROBS: ("FP32", [n, k], probs.ravel().tolist(), probs.tobytes()),
        LABELS: ("BYTES", [k], labels, encode_bytes_tensor([s.encode() for s in labels])),
        INTENT: ("BYTES", [n], intents, encode_bytes_tensor([s.encode() for s in intents])),
    }
    outputs: list[dict[str, Any]] = []
    tail: list[bytes] = []
    for name, binary in req.outputs:
        datatype, shape, data, raw = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            out["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            out["data"] = data
        outputs.append(out)
    answer: dict[str, Any] = {
        "model_name": model_name,
        "model_version": session.version,
        "outputs": outputs,
    }
    if req.id is not None:
        answer["id"] = req.id
    if not tail:
        return JSONResponse(answer)
    head = json.dumps(answer, separators=(",", ":")).encode()
    return Response(
        head + b"".join(tail),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def _error(reason: str, status: int = 400) -> Response:
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _server_version() -> str:
    try:
        return metadata.version("stream-distill")
    except metadata.PackageNotFoundError:
        return "0"


# -- routes ---------------------------------------------------------------------------------


def oip_router(
    core: ServingCore, model_name: str = MODEL_NAME, *, max_batch: int = MAX_BATCH
) -> APIRouter:
    """The OIP v2 model routes over ``core``'s current model, served as ``model_name``.

    ``/v2/health/*`` live with the rest of the app's health routes.
    """
    settings, hooks = core.settings, core.hooks
    router = APIRouter()
    server = {
        "name": "stream_distill",
        "version": _server_version(),
        "extensions": list(EXTENSIONS),
    }

    def resolve(name: str, version: str | None) -> Predictor:
        """The session this request will use, once, whatever swaps meanwhile."""
        if name != model_name:
            raise OipError(f"unknown model {name!r}; this server has {model_name!r}", 404)
        session = core.session
        if session is None:
            raise OipError(f"model {model_name!r} has no version loaded yet", 503)
        if version is not None and version != session.version:
            raise OipError(
                f"model {model_name!r} version {version!r} is not loaded "
                f"(serving {session.version!r})",
                404,
            )
        return session

    def model_metadata(session: Predictor) -> dict[str, Any]:
        k = len(session.labels)
        return {
            "name": model_name,
            "versions": [session.version],
            "platform": PLATFORM,
            "inputs": [{"name": TEXT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": PROBS, "datatype": "FP32", "shape": [-1, k]},
                {"name": LABELS, "datatype": "BYTES", "shape": [k]},
                {"name": INTENT, "datatype": "BYTES", "shape": [-1]},
            ],
        }

    async def ready(request: Request, name: str) -> Response:
        try:
            session = resolve(name, request.path_params.get("version"))
        except OipError as exc:
            # The spec answers "not ready" with a 4xx; 503 stays for the server-wide probe.
            return _error(str(exc), 400 if exc.status == 503 else exc.status)
        return JSONResponse({"name": model_name, "version": session.version, "ready": True})

    async def get_metadata(request: Request, name: str) -> Response:
        try:
            return JSONResponse(model_metadata(resolve(name, request.path_params.get("version"))))
        except OipError as exc:
            return _error(str(exc), exc.status)

    async def infer(request: Request, name: str) -> Response:
        t0 = time.perf_counter()
        try:
            session = resolve(name, request.path_params.get("version"))
            body = _inflate(
                await request.body(),
                request.headers.get("content-encoding"),
                settings.max_body_bytes,
            )
            req = parse_infer(
                body, request.headers.get(HEADER_LENGTH), max_batch, settings.max_text_chars
            )
        except OipError as exc:
            outcome = "shed" if exc.status == 503 else "invalid"
            hooks.on_request(outcome, (time.perf_counter() - t0) * 1e3, core.version)
            return _error(str(exc), exc.status)
        dialogues = [[Turn(role="user", text=t)] for t in req.texts]
        try:
            probs = await asyncio.to_thread(session.predict, dialogues)
        except Exception as exc:  # the model failing on valid input is ours, not the caller's
            hooks.on_request("error", (time.perf_counter() - t0) * 1e3, session.version)
            return _error(f"inference failed: {exc}", 500)
        hooks.on_batch(len(req.texts))
        latency_ms = (time.perf_counter() - t0) * 1e3
        outcome = "deadline" if latency_ms > settings.deadline_ms else "ok"
        hooks.on_request(outcome, latency_ms, session.version)
        return infer_response(model_name, session, probs, req)

    async def server_metadata() -> Response:
        return JSONResponse(server)

    router.add_api_route("/v2", server_metadata, methods=["GET"])
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_api_route(model, get_metadata, methods=["GET"])
        router.add_api_route(f"{model}/ready", ready, methods=["GET"])
        router.add_api_route(f"{model}/infer", infer, methods=["POST"])
    return router
