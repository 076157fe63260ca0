"""uvicorn's httptools protocol: one write per response, and a short path for direct routes.

uvicorn writes a response's status line and headers, then its body, as two
``transport.write`` calls: two ``send`` system calls and, with ``TCP_NODELAY``, two
segments, so the client wakes up twice (and a client that reads the head first parses
twice). At a few hundred microseconds per request outside the model, that is worth one
small proxy. :class:`OneWriteProtocol` gives uvicorn a transport that holds a response
head until the next write, which the body joins; a head with no body after it (HEAD,
204, ``100 Continue``) leaves at the end of the loop iteration, or before a close.
Every other call goes straight to the real transport.

The proxy recognises a head by its shape (``HTTP/1.x`` ... blank line). Order is kept
whatever it holds: anything held leaves before, or together with, the next write.

A ``POST`` to one of a :class:`~stream_distill.serving.middleware.DirectApp`'s direct
routes skips ASGI altogether here: uvicorn still parses the request and keeps the
connection (keep-alive, pipelining, flow control, graceful shutdown), but instead of the
ASGI task (scope, ``receive``/``send`` messages, header checks, two writes) a plain task
reads the body off uvicorn's request cycle, calls the route's handler and writes the
answer in one piece, under the same body limit and with the same refusals as
``DirectApp`` has on its ASGI path (which other servers and in-process clients use).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from stream_distill.serving.middleware import (
    INTERNAL_ERROR,
    JSON,
    TEXT,
    DirectHandler,
    detail_body,
    refuse_length,
    too_large,
)


class HeldHeadTransport:
    """A transport proxy that joins a response head with the write after it."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
        elif isinstance(data, bytes) and data.startswith(b"HTTP/1.") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now (the body did not follow in the same iteration)."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class OneWriteProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` over a :class:`HeldHeadTransport`, with direct routes
    answered by :func:`answer_direct` (``Config(http=OneWriteProtocol)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        proxy = HeldHeadTransport(transport, self.loop)
        super().connection_made(proxy)  # type: ignore[arg-type]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # uvicorn calls this for every request it starts, pipelined ones included
        direct: dict[str, DirectHandler] | None = getattr(app, "direct", None)
        scope = cycle.scope
        handler = direct.get(scope["path"]) if direct and scope["method"] == "POST" else None
        if handler is None:
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(answer_direct(cycle, handler, app.max_body_bytes))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)


async def answer_direct(cycle: RequestResponseCycle, handler: DirectHandler, limit: int) -> None:
    """Read the body (as the cycle's ``receive`` does), run ``handler``, answer in one write."""
    refused = refuse_length(cycle.scope["headers"], limit)
    if refused is not None:
        await respond(cycle, refused[0], detail_body(refused[1]), JSON)
        return
    body = bytearray()
    while True:
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        if not cycle.disconnected:
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected:
            return  # nobody to answer
        body += cycle.body
        cycle.body = bytearray()
        if len(body) > limit:
            status, detail = too_large(limit)
            await respond(cycle, status, detail_body(detail), JSON)
            return
        if not cycle.more_body:
            break
    try:
        status, content, extra = await handler(bytes(body))
    except Exception as exc:  # as uvicorn answers an ASGI app that raised
        cycle.logger.error("Exception in ASGI application\n", exc_info=exc)
        await respond(cycle, 500, INTERNAL_ERROR, TEXT)
        return
    await respond(cycle, status, content, JSON, extra)


async def respond(
    cycle: RequestResponseCycle,
    status: int,
    body: bytes,
    content_type: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Write a whole response on ``cycle`` as uvicorn's ``send`` would, in one write.

    The headers are ours (no caller input), so uvicorn's per-header checks are skipped.
    """
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    head = [STATUS_LINE[status]]
    for name, value in (
        *cycle.default_headers,
        (b"content-length", b"%d" % len(body)),
        (b"content-type", content_type),
        *extra,
    ):
        head += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        head.append(b"connection: close\r\n")
    head += (b"\r\n", body)
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    if cycle.access_log:
        scope = cycle.scope
        cycle.access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            get_client_addr(scope),
            scope["method"],
            get_path_with_query_string(scope),
            scope["http_version"],
            status,
        )
    cycle.transport.write(b"".join(head))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
