"""The serve role composed in one place: producer, core, feedback, app, HTTP server.

``app.py``/``cli.py`` only need::

    async with run_serve(registry, settings.serve, bus) as serve:
        print(serve.url)
        await stop.wait()

Shutdown runs in reverse: stop taking requests, drain request events, close the producer.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from stream_distill.bus.base import Bus
from stream_distill.config import ServeSettings
from stream_distill.feedback.collector import FeedbackCollector
from stream_distill.feedback.known import KnownRequests
from stream_distill.feedback.raw import RawFeedbackConsumer
from stream_distill.metrics.hooks import Hooks
from stream_distill.metrics.prometheus import PrometheusHooks
from stream_distill.registry.base import ModelStore
from stream_distill.serving.http import HttpServer, create_app
from stream_distill.serving.service import ServingCore


@dataclass(frozen=True, slots=True)
class RunningServe:
    core: ServingCore
    feedback: FeedbackCollector | None
    app: FastAPI
    server: HttpServer
    hooks: Hooks
    metrics: CollectorRegistry

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.asynccontextmanager
async def run_serve(
    registry: ModelStore,
    settings: ServeSettings,
    bus: Bus | None = None,
    *,
    hooks: Hooks | None = None,
    metrics: CollectorRegistry | None = None,
    host: str | None = None,
    port: int | None = None,
    poll_interval_s: float = 5.0,
    feedback: bool = True,
) -> AsyncIterator[RunningServe]:
    """Run serve until the block exits. ``host``/``port`` override ``settings`` (0: any port).

    Without ``bus`` there are no request events, no models topic (registry polling
    only) and no feedback endpoint. ``hooks`` default to :class:`PrometheusHooks` on
    ``metrics`` (a fresh registry unless given).
    """
    metrics = metrics if metrics is not None else CollectorRegistry()
    hooks = hooks if hooks is not None else PrometheusHooks(metrics)
    async with contextlib.AsyncExitStack() as stack:
        producer = bus.producer() if bus is not None else None
        if producer is not None:
            await producer.start()
            stack.push_async_callback(producer.aclose)
        core = ServingCore(
            registry, settings, hooks, bus=bus, producer=producer, poll_interval_s=poll_interval_s
        )
        await core.start()
        stack.push_async_callback(core.aclose)
        collector = None
        if producer is not None and feedback:
            known = KnownRequests(settings.feedback_known_requests, settings.feedback_join_window_s)
            core.on_answer = known.record
            collector = FeedbackCollector(
                producer,
                core.topics,
                settings,
                hooks,
                known=known,
                labels=lambda: core.session.labels if core.session is not None else None,
            )
            if bus is not None and settings.feedback_consume_raw:
                raw = RawFeedbackConsumer(
                    bus, collector, hooks, group_id=settings.feedback_group_id
                )
                await raw.start()
                stack.push_async_callback(raw.aclose)
        app = create_app(core, collector, metrics=metrics)
        server = HttpServer(app, host or settings.host, settings.port if port is None else port)
        await server.start()
        stack.push_async_callback(server.aclose)
        yield RunningServe(core, collector, app, server, hooks, metrics)
