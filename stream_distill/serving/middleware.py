"""ASGI middleware in front of serve's FastAPI app: body limits and the direct hot path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await _plain(send, 400, "bad Content-Length")
                    return
                if int(value) > self.max_bytes:
                    await _plain(send, 413, f"body exceeds {self.max_bytes} bytes")
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
                await _plain(send, 413, f"body exceeds {self.max_bytes} bytes")
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


class DirectRoutes:
    """``POST`` to one of ``routes`` goes straight to its handler, body in, response out.

    The hot path of serve skips the router and FastAPI's per-request machinery (about a
    quarter of the event loop's time per request). The FastAPI route of the same path
    stays, for the OpenAPI document and for apps run without this middleware; it calls
    the same handler, so both answer alike.
    """

    def __init__(
        self, app: ASGIApp, routes: Mapping[str, Callable[[bytes], Awaitable[Response]]]
    ) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = (
            self.routes.get(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if handler is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        response = await handler(b"".join(chunks))
        await response(scope, receive, send)


async def _plain(send: Send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}).body
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
