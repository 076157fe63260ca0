"""The HTTP face of serve: FastAPI routes, request validation, body limits, uvicorn.

``create_app`` builds the ASGI app from a started-or-not :class:`ServingCore`
and an optional :class:`FeedbackCollector`; :class:`HttpServer` runs it under
uvicorn on a socket it binds itself (so ``port=0`` works and the bound port is
known). :func:`stream_distill.serving.runner.run_serve` composes the whole role.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from starlette.types import ASGIApp

from stream_distill.errors import (
    DeadlineExceeded,
    FeedbackRejected,
    FeedbackUnavailable,
    NotReady,
    Overloaded,
    RateLimited,
)
from stream_distill.feedback.collector import FeedbackCollector, FeedbackIn
from stream_distill.metrics.prometheus import PrometheusHooks
from stream_distill.serving.admin import admin_router
from stream_distill.serving.canary_api import canary_router
from stream_distill.serving.dashboard import dashboard_router
from stream_distill.serving.middleware import BodyLimit, DirectApp, Raw, as_response
from stream_distill.serving.oip import oip_router
from stream_distill.serving.schemas import ClassifyIn, Limits, fast_classify_in
from stream_distill.serving.service import ClassifyResult, LoadedVersion, ServingCore

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
T = TypeVar("T")


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def _answer(r: ClassifyResult) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": r.request_id,
        "intent": r.intent,
        "confidence": r.confidence,
        "top": [{"intent": t.intent, "p": t.p} for t in r.top],
        "model_version": r.model_version,
        "latency_ms": round(r.latency_ms, 3),
    }
    if r.answered_by is not None:  # the cascade saw this request
        body["answered_by"] = r.answered_by
    return body


def _refusal(status: int, detail: str, retry_after_s: float) -> Response:
    retry = str(max(1, math.ceil(retry_after_s)))  # Retry-After carries whole seconds
    return JSONResponse({"detail": detail}, status_code=status, headers={"Retry-After": retry})


_RETRY_NOW = ((b"retry-after", RETRY_AFTER_S.encode()),)


def _raw_refusal(status: int, detail: str, retry_after_s: float) -> Raw:
    retry = b"%d" % max(1, math.ceil(retry_after_s))  # Retry-After carries whole seconds
    return status, orjson.dumps({"detail": detail}), ((b"retry-after", retry),)


def _kept(core: ServingCore) -> list[dict[str, Any]]:
    """Kept versions (a rollback can reach them instantly), with their online accuracy."""
    loaded_at: dict[str, LoadedVersion] = {}
    for v in core.verified:
        loaded_at.setdefault(v.version, v)  # later entries of a version are rollbacks
    rows = []
    for kept in core.kept:
        first = loaded_at.get(kept.version)
        online = core.online.stats(kept.version)
        rows.append(
            {
                "version": kept.version,
                "sha256": kept.session.sha256,
                "loaded_at": first.loaded_at.isoformat() if first else None,
                "load_ms": round(first.load_s * 1e3, 1) if first else None,
                "predecessor": kept.predecessor,
                "serving": kept.version == core.version,
                "pinned": core.pin is not None and core.pin.version == kept.version,
                "online_accuracy": online.accuracy if online else None,
                "online_labels": online.labels if online else 0,
            }
        )
    return rows


def create_app(
    core: ServingCore,
    feedback: FeedbackCollector | None = None,
    *,
    metrics: CollectorRegistry | None = None,
) -> FastAPI:
    """The serve API over ``core`` (and ``feedback`` when given).

    ``metrics`` is the registry ``GET /metrics`` renders; by default the one of
    ``core.hooks`` when those are :class:`PrometheusHooks`.
    """
    settings = core.settings
    hooks = core.hooks
    if metrics is None:
        metrics = hooks.registry if isinstance(hooks, PrometheusHooks) else CollectorRegistry()
    limits = Limits(max_text_chars=settings.max_text_chars, max_turns=settings.max_turns)
    context = {"limits": limits}
    app = DirectApp(title="stream_distill serve", version="1", docs_url="/docs", redoc_url=None)
    app.state.core = core
    app.state.feedback = feedback

    async def classify_raw(body: bytes) -> Raw:
        t0 = time.perf_counter()
        parsed = fast_classify_in(body, limits)
        if parsed is None:  # not the common shape: pydantic decides, and words the errors
            try:
                req = ClassifyIn.model_validate_json(body, context=context)
            except ValidationError as exc:
                hooks.on_request("invalid", (time.perf_counter() - t0) * 1e3, core.version)
                return 422, orjson.dumps({"detail": _errors(exc)}), ()
            parsed = (req.dialogue(), req.conversation_id, req.deadline_ms, req.cascade)
        dialogue, conversation_id, deadline_ms, cascade = parsed
        try:
            result = await core.classify(
                dialogue, conversation_id, deadline_ms=deadline_ms, cascade=cascade
            )
        except NotReady as exc:
            return 503, orjson.dumps({"detail": str(exc)}), _RETRY_NOW
        except DeadlineExceeded as exc:
            return _raw_refusal(503, f"deadline: {exc}", exc.retry_after_s)
        except Overloaded as exc:
            return _raw_refusal(429, f"overloaded: {exc}", exc.retry_after_s)
        return 200, orjson.dumps(_answer(result)), ()

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        return as_response(await classify_raw(await request.body()))

    if feedback is not None:

        @app.post("/v1/feedback")
        async def post_feedback(request: Request) -> Response:
            principal = feedback.authenticate(request.headers.get("authorization"))
            if principal is None:
                return JSONResponse(
                    {"detail": "missing or invalid bearer token"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            try:
                feedback.admit(principal)
            except RateLimited as exc:
                return _refusal(429, str(exc), exc.retry_after_s)
            try:
                body = FeedbackIn.model_validate_json(await request.body())
            except ValidationError as exc:
                hooks.on_feedback("invalid")
                return JSONResponse({"detail": _errors(exc)}, status_code=422)
            try:
                accepted = await feedback.submit(principal, body)
            except FeedbackRejected as exc:
                return JSONResponse({"detail": str(exc)}, status_code=exc.status)
            except FeedbackUnavailable as exc:
                return JSONResponse(
                    {"detail": str(exc)}, status_code=503, headers={"Retry-After": RETRY_AFTER_S}
                )
            return JSONResponse(
                {"feedback_id": accepted.feedback_id, "duplicate": accepted.duplicate},
                status_code=202,
            )

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        ok = core.ready and not core.draining
        return JSONResponse(
            {"ready": ok, "draining": core.draining, "model_version": core.version},
            status_code=200 if ok else 503,
            headers={} if ok else {"Retry-After": RETRY_AFTER_S},
        )

    @app.get("/v1/models")
    async def models() -> Response:
        session = core.session
        serving = (
            {"version": session.version, "sha256": session.sha256, "labels": list(session.labels)}
            if session is not None
            else None
        )
        loaded = [
            {
                "version": v.version,
                "sha256": v.sha256,
                "loaded_at": v.loaded_at.isoformat(),
                "load_ms": round(v.load_s * 1e3, 1),
            }
            for v in core.verified
        ]
        pin = core.pin
        return JSONResponse(
            {
                "serving": serving,
                "versions": _kept(core),
                "pinned": None if pin is None else {"version": pin.version, "above": pin.above},
                "loaded": loaded,
                "rejected": core.rejected,
                "rollout": core.rollout.state(),
            }
        )

    app.include_router(admin_router(core))
    app.include_router(canary_router(core))
    app.include_router(oip_router(core))
    app.include_router(dashboard_router(core, metrics))
    # POST /v1/classify skips the ASGI stack (under the same body limit); the rest does not
    app.set_direct({"/v1/classify": classify_raw}, settings.max_body_bytes)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop's event loop when it is installed.

    A request spends most of its time outside the model in the event loop (parsing,
    routing, waking the batcher and the request back up), which uvloop does in C.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _protocol() -> type[asyncio.Protocol] | str:
    """httptools (a dependency) parses in C, and each answer leaves in one write
    (:mod:`.wire`); uvicorn's h11 protocol where httptools is missing."""
    try:
        from stream_distill.serving.wire import OneWriteProtocol
    except ImportError:
        return "auto"
    return OneWriteProtocol


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the role that owns this server decides what signals mean


class HttpServer:
    """uvicorn on a socket bound here: ``port=0`` picks a free port, read it from ``.port``."""

    def __init__(
        self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
    ) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.log_level = log_level
        self.port = port
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto=TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto
        # says TCP, and without it every response waits ~40 ms on a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.requested_port))
        sock.setblocking(False)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,  # leave the process's logging alone
            log_level=self.log_level,
            access_log=False,
            proxy_headers=False,  # nothing reads the client address; the wrapper costs
            http=_protocol(),
            timeout_graceful_shutdown=5,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="sd-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # surfaces the startup error
                raise RuntimeError("HTTP server stopped during startup")
            await asyncio.sleep(0.005)

    async def aclose(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10.0)
            except TimeoutError:
                self._server.force_exit = True
                await self._task
        if self._sock is not None:
            self._sock.close()
        self._server = self._task = self._sock = None

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def serve_http(app: ASGIApp, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve ``app`` until ``stop`` is set."""
    async with HttpServer(app, host, port) as server:
        log.info("serving HTTP on %s", server.url)
        await stop.wait()
