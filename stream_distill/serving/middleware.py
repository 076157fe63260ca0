"""ASGI middleware in front of serve's FastAPI app: body limits and the direct hot path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def refuse_length(headers: Iterable[tuple[bytes, bytes]], limit: int) -> tuple[int, str] | None:
    """(status, reason) when the declared Content-Length is malformed or over ``limit``."""
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                return 400, "bad Content-Length"
            if int(value) > limit:
                return too_large(limit)
    return None


def too_large(limit: int) -> tuple[int, str]:
    return 413, f"body exceeds {limit} bytes"


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, by Content-Length and by bytes actually read.

    The body is buffered (it is small by construction) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = refuse_length(scope["headers"], self.max_bytes)
        if refused is not None:
            await _plain(send, *refused)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _plain(send, *too_large(self.max_bytes))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


Raw = tuple[int, bytes, Sequence[tuple[bytes, bytes]]]
"""A JSON answer as the direct path sends it: status, body, headers beyond the content's."""

DirectHandler = Callable[[bytes], Awaitable[Raw]]

INTERNAL_ERROR = b"Internal Server Error"


class DirectApp(FastAPI):
    """A FastAPI app whose ``POST`` to one of :attr:`direct` skips the whole ASGI stack.

    Body in (under ``max_body_bytes``, refused as :class:`BodyLimit` refuses), status,
    JSON body and headers out, sent as two plain ASGI messages. The hot path of serve
    thus skips Starlette's middleware, the router, FastAPI's per-request machinery and
    the Response objects (most of the event loop's own time per request). The FastAPI
    route of the same path stays, for the OpenAPI document and for every other method;
    it calls the same handler, so both answer alike. An error the handler raises is a
    500, as Starlette's own error middleware answers it, and is re-raised for the
    server to log.
    """

    direct: dict[str, DirectHandler]
    max_body_bytes: int

    def set_direct(self, routes: Mapping[str, DirectHandler], max_body_bytes: int) -> None:
        self.direct = dict(routes)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        direct = getattr(self, "direct", None)
        handler = (
            direct.get(scope["path"])
            if direct and scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if handler is None:
            await super().__call__(scope, receive, send)
            return
        limit = self.max_body_bytes
        refused = refuse_length(scope["headers"], limit)
        if refused is not None:
            await _plain(send, *refused)
            return
        message = await receive()
        if message["type"] != "http.request":
            return  # the client went away
        body: bytes = message.get("body", b"")
        if message.get("more_body", False):  # chunked, or more than one read
            chunks = [body]
            size = len(body)
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await _plain(send, *too_large(limit))
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
        if len(body) > limit:
            await _plain(send, *too_large(limit))
            return
        try:
            status, content, extra = await handler(body)
        except Exception:
            await _send(send, 500, INTERNAL_ERROR, TEXT)
            raise
        await _send(send, status, content, JSON, extra)


JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    headers = [(b"content-length", b"%d" % len(body)), (b"content-type", content_type), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def as_response(raw: Raw) -> Response:
    """A :data:`Raw` answer as a Starlette response (for the routed path)."""
    status, body, extra = raw
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in extra}
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def detail_body(detail: str) -> bytes:
    """The JSON body of a refusal: ``{"detail": ...}``."""
    return bytes(JSONResponse({"detail": detail}).body)


async def _plain(send: Send, status: int, detail: str) -> None:
    body = detail_body(detail)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
