"""serve's HTTP protocol: one write per response, and direct routes answered off ASGI
with uvicorn's connection handling intact (keep-alive, pipelining, close, 100-continue)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx

from stream_distill.serving.http import HttpServer
from stream_distill.serving.middleware import DirectApp, Raw
from stream_distill.serving.wire import HeldHeadTransport


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


async def test_a_head_leaves_with_its_body_in_one_write() -> None:
    real = FakeTransport()
    proxy = HeldHeadTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    proxy.write(HEAD)
    assert real.writes == []
    proxy.write(b"{}")
    assert real.writes == [HEAD + b"{}"]
    proxy.write(b"more")  # not a head: straight through
    assert real.writes[-1] == b"more"
    assert proxy.get_extra_info("peername") == "info:peername"  # the rest is the real one's
    await asyncio.sleep(0)
    assert len(real.writes) == 2  # nothing held any more


async def test_a_head_alone_leaves_at_the_end_of_the_iteration_or_on_close() -> None:
    real = FakeTransport()
    proxy = HeldHeadTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    proxy.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    await asyncio.sleep(0)
    assert real.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
    proxy.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    proxy.close()
    assert real.writes[-1] == b"HTTP/1.1 100 Continue\r\n\r\n" and real.closed


def app_with(handler_calls: list[bytes]) -> DirectApp:
    async def handler(body: bytes) -> Raw:
        handler_calls.append(body)
        if body == b"boom":
            raise RuntimeError("boom")
        return 200, b'{"n":%d}' % len(handler_calls), ((b"x-extra", b"1"),)

    app = DirectApp()
    app.set_direct({"/direct": handler}, max_body_bytes=64)

    @app.get("/routed")
    async def routed() -> dict[str, str]:
        return {"via": "router"}

    return app


def read_responses(sock: socket.socket, n: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """``n`` responses off a socket (Content-Length framing), in order."""
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        status, *lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        size = int(headers[b"content-length"])
        while len(buf) < size:
            buf += sock.recv(65536)
        out.append((status, headers, buf[:size]))
        buf = buf[size:]
    return out


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def test_pipelined_requests_are_answered_in_order() -> None:
    calls: list[bytes] = []
    async with HttpServer(app_with(calls)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(
                post("/direct", b"a")
                + b"GET /routed HTTP/1.1\r\nHost: t\r\n\r\n"
                + post("/direct", b"bb")
                + post("/direct", b"x" * 65)  # over the limit
            )
            answers = await asyncio.to_thread(read_responses, sock, 4)
    assert [a[0] for a in answers] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 413 Request Entity Too Large",
    ]
    assert answers[0][2] == b'{"n":1}' and answers[0][1][b"x-extra"] == b"1"
    assert answers[1][2] == b'{"via":"router"}'
    assert answers[2][2] == b'{"n":2}'
    assert calls == [b"a", b"bb"]
    assert all(b"date" in a[1] for a in answers)


async def test_close_http10_continue_and_errors() -> None:
    calls: list[bytes] = []
    async with HttpServer(app_with(calls)) as server:

        def exchange(raw: bytes, n: int = 1, closes: bool = True) -> tuple[list[Any], bytes]:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(raw)
                answers = read_responses(sock, n)
                rest = sock.recv(100) if closes else b"open"  # b"" once the server closed
            return answers, rest

        answers, rest = await asyncio.to_thread(
            exchange, post("/direct", b"c", "Connection: close\r\n")
        )
        assert answers[0][0] == b"HTTP/1.1 200 OK" and answers[0][1][b"connection"] == b"close"
        assert rest == b""
        http10 = b"POST /direct HTTP/1.0\r\nContent-Length: 1\r\n\r\nd"
        answers, rest = await asyncio.to_thread(exchange, http10)
        assert answers[0][2] == b'{"n":2}' and rest == b""

        def expect_continue() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(
                    post("/direct", b"", "Expect: 100-continue\r\n").replace(
                        b"Content-Length: 0", b"Content-Length: 2"
                    )
                )
                interim = sock.recv(100)
                sock.sendall(b"ee")
                return interim + b"|" + read_responses(sock, 1)[0][2]

        assert await asyncio.to_thread(expect_continue) == b'HTTP/1.1 100 Continue\r\n\r\n|{"n":3}'
        answers, _ = await asyncio.to_thread(
            exchange, post("/direct", b"boom") + post("/direct", b"f"), 2, False
        )
        assert answers[0][0] == b"HTTP/1.1 500 Internal Server Error"
        assert answers[1][2] == b'{"n":5}'  # the connection serves on after a failed request


async def test_the_fast_path_answers_as_the_asgi_path() -> None:
    """Over HTTP (the protocol's path) and in process (DirectApp's ASGI path) alike."""
    bodies = [b"q", b"x" * 65, b"boom"]
    over_http, in_process = [], []
    async with HttpServer(app_with([])) as server, httpx.AsyncClient(base_url=server.url) as c:
        for body in bodies:
            over_http.append(await c.post("/direct", content=body))
    asgi = httpx.ASGITransport(app=app_with([]), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=asgi, base_url="http://t") as c:
        for body in bodies:
            in_process.append(await c.post("/direct", content=body))
    for a, b in zip(over_http, in_process, strict=True):
        assert (a.status_code, a.content) == (b.status_code, b.content)
        assert a.headers["content-type"] == b.headers["content-type"]
        assert a.headers.get("x-extra") == b.headers.get("x-extra")
