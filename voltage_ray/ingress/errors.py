"""One place that renders every error in the spec's shape.

Handlers are looked up along the exception's class hierarchy (Starlette does this), so every
:class:`VoltageError` subclass is rendered by one handler. Validation errors and malformed JSON are
400s, never FastAPI's 422; unknown exceptions are 500s with a request id and no internal text.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from voltage_ray.errors import BadRequest, InternalError, VoltageError, unwrap
from voltage_ray.limits.idempotency import Replayed

logger = logging.getLogger(__name__)

_STATUS_MESSAGES = {
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
}


def request_id(request: Request | None = None) -> str:
    """Serve's id for the current request (also in its logs and x-request-id), else a new one."""
    if request is not None:
        rid = getattr(request.state, "request_id", None)
        if rid:
            return str(rid)
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # outside a replica (unit tests)
        rid = ""
    rid = rid or uuid.uuid4().hex
    if request is not None:
        request.state.request_id = rid
    return rid


class SafeJSONResponse(JSONResponse):
    """JSON that renders whatever text it carries: a string that UTF-8 cannot encode (a lone
    surrogate from a path or a header) is written as JSON's ``\\uXXXX`` escapes instead."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(exc: VoltageError, endpoint: str, rid: str | None = None) -> JSONResponse:
    extra: dict[str, Any] = {"request_id": rid} if rid and exc.status >= 500 else {}
    headers = dict(exc.headers)
    if rid:
        headers["x-request-id"] = rid
    return SafeJSONResponse(exc.body(endpoint, **extra), status_code=exc.status, headers=headers)


def to_voltage_error(exc: BaseException, endpoint: str, rid: str) -> VoltageError:
    """Map any exception to the error the client sees, logging the unexpected ones."""
    exc = unwrap(exc)
    if isinstance(exc, VoltageError):
        return exc
    logger.error("request %s to %s failed: %s", rid, endpoint, type(exc).__name__, exc_info=exc)
    return InternalError()


def validation_message(errors: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    """A readable message and a compact list from pydantic/FastAPI validation errors."""
    items = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            return "Malformed JSON body", [{"loc": "body", "msg": "malformed JSON"}]
        msg = str(err.get("msg", "invalid value"))
        if kind == "extra_forbidden":
            msg = "Unrecognized request argument supplied"
        items.append({"loc": ".".join(loc) or "body", "msg": msg})
    head = "; ".join(f"{i['loc']}: {i['msg']}" for i in items[:3])
    more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
    return f"Invalid request parameters: {head}{more}", items


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(VoltageError)
    async def _voltage(request: Request, exc: VoltageError) -> JSONResponse:
        return error_response(exc, request.url.path, request_id(request))

    @app.exception_handler(Replayed)
    async def _replayed(request: Request, exc: Replayed) -> Response:
        answer = exc.answer
        headers = [*answer.headers, ("idempotent-replayed", "true")]
        response = Response(answer.body, status_code=answer.status)
        response.raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, items = validation_message(list(exc.errors()))
        err = BadRequest(message, details={"errors": _jsonable(items)})
        return error_response(err, request.url.path, request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = VoltageError(_STATUS_MESSAGES.get(exc.status_code, str(exc.detail)))
        err.status = exc.status_code
        err.headers = dict(exc.headers or {})
        return error_response(err, request.url.path, request_id(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        if isinstance(unwrap(exc), TaskCancelledError):
            # Serve cancelled the request's own task: its client went away (mid-stream, Serve's
            # receive raises this). Nobody is left to answer, and it is no server fault.
            logger.info("request %s to %s ended: the client went away", rid, request.url.path)
            return error_response(InternalError(), request.url.path, rid)
        return error_response(to_voltage_error(exc, request.url.path, rid), request.url.path, rid)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
