"""Operator routes: ``POST /v1/admin/rollback`` and ``POST /v1/admin/unpin``.

Both need ``Authorization: Bearer <serve.admin_token>``; without a configured
token the routes answer 403 so that an unset secret never means "open".
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_distill.errors import NotReady
from stream_distill.serving.service import ServingCore


class RollbackIn(BaseModel):
    """The body of ``POST /v1/admin/rollback`` (may be empty)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    version: str | None = Field(
        default=None, min_length=1, max_length=64, description="Kept version; default previous."
    )


def _denied(core: ServingCore, authorization: str | None) -> Response | None:
    token = core.settings.admin_token
    if token is None:
        return JSONResponse({"detail": "admin disabled"}, status_code=403)
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return JSONResponse(
            {"detail": "missing bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        return JSONResponse({"detail": "invalid admin token"}, status_code=403)
    return None


def admin_router(core: ServingCore) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/admin/rollback")
    async def rollback(request: Request) -> Response:
        denied = _denied(core, request.headers.get("authorization"))
        if denied is not None:
            return denied
        raw = await request.body()
        try:
            body = RollbackIn.model_validate_json(raw) if raw.strip() else RollbackIn()
        except ValidationError as exc:
            detail = exc.errors(include_url=False, include_input=False, include_context=False)
            return JSONResponse({"detail": [e["msg"] for e in detail]}, status_code=422)
        try:
            came_from, to = core.rollback(body.version, "manual: admin rollback")
        except NotReady as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)
        except LookupError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return JSONResponse({"from": came_from, "to": to})

    @router.post("/v1/admin/unpin")
    async def unpin(request: Request) -> Response:
        denied = _denied(core, request.headers.get("authorization"))
        if denied is not None:
            return denied
        pin = core.unpin()
        return JSONResponse({"unpinned": pin.version if pin is not None else None})

    return router
