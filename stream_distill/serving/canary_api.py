"""Rollout routes: ``GET /v1/rollout`` and, with the admin token, start, promote, abort.

``POST /v1/admin/rollout`` ``{"version": "v7", "mode": "canary", "fraction": 0.2}`` puts
a version (kept in memory, or loaded and verified from the registry) next to the live
one; ``POST /v1/admin/rollout/promote`` serves it, ``POST /v1/admin/rollout/abort``
drops it. The admin routes answer 401/403 exactly as ``/v1/admin/rollback`` does.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_distill.errors import IntegrityError, ModelRejected, NotReady, RegistryError
from stream_distill.serving.admin import _denied
from stream_distill.serving.service import ServingCore


class RolloutIn(BaseModel):
    """The body of ``POST /v1/admin/rollout``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    version: str = Field(min_length=1, max_length=64, description="Version to roll out.")
    mode: Literal["canary", "shadow"] = Field(default="canary", description="How it runs.")
    fraction: float | None = Field(
        default=None, gt=0, le=1, description="Share of requests; default from the settings."
    )


class _Reason(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    reason: str = Field(default="manual", min_length=1, max_length=200)


def _invalid(exc: ValidationError) -> Response:
    detail = exc.errors(include_url=False, include_input=False, include_context=False)
    return JSONResponse({"detail": [e["msg"] for e in detail]}, status_code=422)


def canary_router(core: ServingCore) -> APIRouter:
    router = APIRouter()
    rollout = core.rollout

    @router.get("/v1/rollout")
    async def state() -> Response:
        return JSONResponse(rollout.state())

    @router.post("/v1/admin/rollout")
    async def begin(request: Request) -> Response:
        denied = _denied(core, request.headers.get("authorization"))
        if denied is not None:
            return denied
        try:
            body = RolloutIn.model_validate_json(await request.body())
        except ValidationError as exc:
            return _invalid(exc)
        try:
            r = await rollout.begin(body.version, body.mode, body.fraction)
        except NotReady as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        except (ValueError, ModelRejected, IntegrityError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=409)
        except RegistryError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return JSONResponse(r.as_dict())

    async def _reason(request: Request) -> str | Response:
        raw = await request.body()
        try:
            return (_Reason.model_validate_json(raw) if raw.strip() else _Reason()).reason
        except ValidationError as exc:
            return _invalid(exc)

    @router.post("/v1/admin/rollout/promote")
    async def promote(request: Request) -> Response:
        denied = _denied(core, request.headers.get("authorization"))
        if denied is not None:
            return denied
        reason = await _reason(request)
        if isinstance(reason, Response):
            return reason
        try:
            came_from, to = rollout.promote(f"manual: {reason}")
        except LookupError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=409)
        return JSONResponse({"from": came_from, "to": to})

    @router.post("/v1/admin/rollout/abort")
    async def abort(request: Request) -> Response:
        denied = _denied(core, request.headers.get("authorization"))
        if denied is not None:
            return denied
        reason = await _reason(request)
        if isinstance(reason, Response):
            return reason
        try:
            aborted = rollout.abort(f"manual: {reason}")
        except LookupError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=409)
        return JSONResponse({"aborted": aborted, "serving": core.version})

    return router
