"""A synthetic chatbot: classify requests at a steady rate, feedback on a fraction of turns."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from stream_distill.data.synthetic import LabeledTurn, TrafficConfig, TrafficGenerator

RETRIES = 3
MAX_RETRY_WAIT_S = 1.0


@dataclass
class TrafficStats:
    requests: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    retried: int = 0
    feedback_sent: int = 0
    feedback_failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    server_latencies_ms: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # in order of first appearance
    correct: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=100000))
    started: float = field(default_factory=time.monotonic)

    def percentile(self, q: float, server: bool = False) -> float:
        xs = self.server_latencies_ms if server else self.latencies_ms
        return float(np.percentile(xs, q)) if xs else float("nan")

    def online_accuracy(self, last_n: int | None = None) -> float:
        items = list(self.correct)[-last_n:] if last_n else list(self.correct)
        return sum(ok for _, ok in items) / len(items) if items else float("nan")

    def window_accuracy(self, first: bool, n: int = 200) -> float:
        items = list(self.correct)
        items = items[:n] if first else items[-n:]
        return sum(ok for _, ok in items) / len(items) if items else float("nan")


class Chatbot:
    """Drives ``serve`` over real HTTP like a chatbot would."""

    def __init__(
        self,
        base_url: str,
        *,
        rate: float,
        feedback_fraction: float,
        feedback_token: str | None,
        seed: int = 7,
        max_in_flight: int = 64,
        turns: Iterator[LabeledTurn] | None = None,
    ) -> None:
        """``turns`` replaces the synthetic generator (e.g. a labelled dataset, each turn once)."""
        self.base_url = base_url
        self.rate = rate
        self.feedback_fraction = feedback_fraction
        self.token = feedback_token
        self.turns = (
            turns if turns is not None else TrafficGenerator(TrafficConfig(seed=seed)).turns(10**12)
        )
        self.rng = random.Random(seed)
        self.stats = TrafficStats()
        self._sem = asyncio.Semaphore(max_in_flight)

    async def _one(self, client: httpx.AsyncClient, turn: LabeledTurn) -> None:
        body = {
            "conversation_id": turn.conversation_id,
            "turns": [t.model_dump() for t in turn.turns],
        }
        t0 = time.perf_counter()
        try:
            r = await self._post_with_retry(client, body)
        except httpx.HTTPError as exc:
            self.stats.failed += 1
            self.stats.errors[type(exc).__name__] += 1
            return
        finally:
            self.stats.requests += 1
        if r.status_code != 200:
            self.stats.failed += 1
            self.stats.errors[f"http_{r.status_code}"] += 1
            return
        self.stats.latencies_ms.append((time.perf_counter() - t0) * 1000)
        out = r.json()
        self.stats.server_latencies_ms.append(float(out["latency_ms"]))
        if out["model_version"] not in self.stats.versions:
            self.stats.versions.append(out["model_version"])
        self.stats.correct.append((time.monotonic(), out["intent"] == turn.intent))
        if self.rng.random() < self.feedback_fraction:
            await self._feedback(client, out["request_id"], turn.confirmed_intent)

    async def _post_with_retry(
        self, client: httpx.AsyncClient, body: Mapping[str, Any]
    ) -> httpx.Response:
        """Like a real chatbot: a refused request (429/503) is retried after ``Retry-After``."""
        r = await client.post("/v1/classify", json=body)
        for _ in range(RETRIES):
            if r.status_code not in (429, 503):
                break
            self.stats.retried += 1
            wait = min(float(r.headers.get("Retry-After", "0.1") or 0.1), MAX_RETRY_WAIT_S)
            await asyncio.sleep(wait)
            r = await client.post("/v1/classify", json=body)
        return r

    async def _feedback(self, client: httpx.AsyncClient, request_id: str, intent: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            r = await client.post(
                "/v1/feedback",
                json={"request_id": request_id, "intent": intent, "source": "user_confirmed"},
                headers=headers,
            )
            ok = r.status_code == 202
        except httpx.HTTPError:
            ok = False
        if ok:
            self.stats.feedback_sent += 1
        else:
            self.stats.feedback_failed += 1

    async def _guarded(self, client: httpx.AsyncClient, turn: LabeledTurn) -> None:
        async with self._sem:
            await self._one(client, turn)

    async def run(self, seconds: float, stop: asyncio.Event | None = None) -> TrafficStats:
        """Open-loop load: one request every ``1/rate`` s, whatever the answers' speed.

        Ends after ``seconds``, on ``stop``, or when the turns run out.
        """
        interval = 1.0 / self.rate
        tasks: set[asyncio.Task[None]] = set()
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10.0, limits=limits) as c:
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds and not (stop and stop.is_set()):
                turn = next(self.turns, None)
                if turn is None:
                    break
                t = asyncio.create_task(self._guarded(c, turn))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                n += 1
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if tasks:
                await asyncio.gather(*tasks)
        return self.stats
