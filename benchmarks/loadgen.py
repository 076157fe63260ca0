"""Open-loop HTTP load on ``POST /v1/classify``, run as its own process.

Request ``i`` is due at ``start + i / rate`` whatever happened to earlier ones, and its
latency is counted from that due time, so a server (or a sender) that falls behind
shows up in the tail instead of slowing the offered load (no coordinated omission).

Two threads keep the client's own timing out of the numbers: a sender that sleeps
with ``clock_nanosleep`` precision and 1 us timer slack (asyncio timers round up to
whole milliseconds) and spins the last 50 us, then writes pre-built requests on idle keep-alive
connections, and a receiver that waits on all sockets with epoll and stamps each
response as its bytes arrive. How late each request left is reported (send lag).
Bodies go out in file order from ``--start`` (wrapping around), so that successive runs
against one server can send bodies it has not seen yet.
Bounded in time (``--duration``) and count (``--max-requests``); SIGTERM ends the
sending early. Times are ``time.monotonic()``, comparable across processes.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --rate 200 --duration 10 \
        --bodies bodies.jsonl --samples out.npy

Prints one JSON object: rate, sent, ok, failed (non-200 or no answer), p50/p99/max ms.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

CONNECT_TIMEOUT_S = 5.0
SPIN_S = 0.00005
"""The sender sleeps until this long before a request is due, then spins."""

PR_SET_TIMERSLACK = 29


def tight_timers() -> None:
    """Let this thread's sleeps end within microseconds of their time (Linux timer slack
    is 50 us by default), so the sender spins little: every microsecond it spins is CPU
    the server under test does not get."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class Conn:
    """One keep-alive connection: outgoing request ids in order, bytes not yet parsed."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.waiting: deque[int] = deque()
        self.buf = b""
        self.dead = False


class LoadGen:
    def __init__(
        self, url: str, bodies: list[bytes], path: str = "/v1/classify", start: int = 0
    ) -> None:
        parts = urlsplit(url)
        self.first_body = start
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.requests = [head.encode() + b"Content-Length: %d\r\n\r\n" % len(b) + b for b in bodies]
        self.conns: list[Conn] = []
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sending_done = threading.Event()
        self.due: list[float] = []
        self.sent_at: list[float] = []
        self.done_at: list[float] = []
        self.status: list[int] = []
        self.answered = 0
        self.sent = 0

    def connect(self) -> Conn:
        conn = Conn(self.host, self.port)
        with self.lock:
            self.conns.append(conn)
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
        return conn

    # -- sender ------------------------------------------------------------------------
    def send_all(self, rate: float, duration_s: float, max_requests: int, max_conns: int) -> None:
        tight_timers()
        n = min(max_requests, int(rate * duration_s))
        self.due = [0.0] * n
        self.sent_at = [0.0] * n
        self.done_at = [float("nan")] * n
        self.status = [0] * n
        start = time.monotonic() + 0.05
        for i in range(n):
            if self.stop.is_set():
                break
            due = start + i / rate
            wait = due - time.monotonic()
            if wait > SPIN_S:
                time.sleep(wait - SPIN_S)
            while time.monotonic() < due:  # the last stretch spins: sleeps wake up late
                pass
            conn = self._pick(i, max_conns)
            self.due[i] = due
            conn.waiting.append(i)
            try:
                conn.sock.sendall(self.requests[(self.first_body + i) % len(self.requests)])
            except OSError:
                conn.dead = True  # the receiver marks what it still waited for as failed
            self.sent_at[i] = time.monotonic()
            self.sent = i + 1
        self.sending_done.set()

    def _pick(self, i: int, max_conns: int) -> Conn:
        conns = self.conns
        k = len(conns)
        for j in range(k):
            c = conns[(i + j) % k]
            if not c.waiting and not c.dead:
                return c
        if k < max_conns:
            return self.connect()
        # every connection is busy: pipeline on the least loaded one (the wait counts)
        return min((c for c in conns if not c.dead), key=lambda c: len(c.waiting))

    # -- receiver ----------------------------------------------------------------------
    def receive(self, drain_s: float) -> None:
        deadline = None
        while True:
            if self.sending_done.is_set():
                if self.answered >= self.sent:
                    return
                deadline = deadline or time.monotonic() + drain_s
                if time.monotonic() > deadline:
                    return
            ready = self.sel.select(0.05)  # registering from the sender meanwhile is safe
            for key, _ in ready:
                conn: Conn = key.data
                try:
                    data = conn.sock.recv(262144)
                except OSError:
                    data = b""
                now = time.monotonic()
                if not data:
                    self._close(conn)
                    continue
                conn.buf += data
                self._parse(conn, now)

    def _parse(self, conn: Conn, now: float) -> None:
        while True:
            end = conn.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = conn.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(conn.buf) < end + 4 + length:
                return
            conn.buf = conn.buf[end + 4 + length :]
            i = conn.waiting.popleft()
            self.done_at[i] = now
            self.status[i] = int(lines[0].split(" ", 2)[1])
            self.answered += 1

    def _close(self, conn: Conn) -> None:
        conn.dead = True
        with self.lock:
            self.sel.unregister(conn.sock)
        conn.sock.close()
        self.answered += len(conn.waiting)  # never answered: status stays 0
        conn.waiting.clear()

    def run(
        self, rate: float, duration_s: float, max_requests: int, conns: int, drain_s: float
    ) -> None:
        for _ in range(conns):
            self.connect()
        sender = threading.Thread(
            target=self.send_all, args=(rate, duration_s, max_requests, 4 * conns + 64)
        )
        sender.start()
        self.receive(drain_s)
        sender.join()
        for c in self.conns:
            c.sock.close()

    def samples(self) -> np.ndarray:
        """``[sent, 4]``: due time (monotonic s), latency ms (nan: no answer), status, and
        how late the sender wrote the request (ms; part of the latency, the client's own)."""
        n = self.sent
        due = np.asarray(self.due[:n])
        lat = (np.asarray(self.done_at[:n]) - due) * 1e3
        lag = (np.asarray(self.sent_at[:n]) - due) * 1e3
        status = np.asarray(self.status[:n], dtype=np.float64)
        return np.stack([due, lat, status, lag], axis=1)


def summarise(samples: np.ndarray, rate: float) -> dict[str, Any]:
    lat, status, lag = samples[:, 1], samples[:, 2], samples[:, 3]
    ok = status == 200
    codes = np.unique(status, return_counts=True)
    answered = lat[ok]
    sent_at = samples[:, 0] + lag / 1e3
    span = float(sent_at[-1] - sent_at[0]) if len(samples) > 1 else 0.0  # as actually sent

    def pct(q: float) -> float:
        return round(float(np.percentile(answered, q)), 3) if len(answered) else float("nan")

    return {  # status 0: no answer (connection lost, or still waiting after --drain)
        "rate": rate,
        "sent": len(samples),
        "ok": int(ok.sum()),
        "failed": int((~ok).sum()),
        "offered_rps": round((len(samples) - 1) / span, 1) if span else 0.0,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": round(float(answered.max()), 3) if len(answered) else float("nan"),
        "send_lag_p50_ms": round(float(np.percentile(lag, 50)), 3) if len(lag) else float("nan"),
        "send_lag_p99_ms": round(float(np.percentile(lag, 99)), 3) if len(lag) else float("nan"),
        "statuses": {str(int(k)): int(n) for k, n in zip(*codes, strict=True)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--bodies", type=Path, required=True, help="JSON lines: one request body each")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--duration", type=float, required=True, help="seconds of sending, at most")
    ap.add_argument("--max-requests", type=int, default=1_000_000)
    ap.add_argument("--start", type=int, default=0, help="index of the first body sent")
    ap.add_argument("--connections", type=int, default=16, help="opened up front")
    ap.add_argument("--drain", type=float, default=5.0, help="seconds to wait for late answers")
    ap.add_argument("--samples", type=Path, help="write the per-request samples (.npy)")
    args = ap.parse_args()
    sys.setswitchinterval(1e-4)  # two threads: hand the GIL over quickly
    bodies = [line.encode() for line in args.bodies.read_text().splitlines() if line.strip()]
    gen = LoadGen(args.url, bodies, start=args.start)
    signal.signal(signal.SIGTERM, lambda *_: gen.stop.set())
    gen.run(args.rate, args.duration, args.max_requests, args.connections, args.drain)
    samples = gen.samples()
    if args.samples is not None:
        np.save(args.samples, samples)
    print(json.dumps(summarise(samples, args.rate)), flush=True)


if __name__ == "__main__":
    main()
