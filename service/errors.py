"""One error shape for every failure: ``{"error": "<what was wrong and where>", "error_type": "<kind>"}``.

Code raises a ``ServiceError`` subclass (the class fixes the status and ``error_type``); the handlers
installed by ``install_error_handlers`` turn it, FastAPI's validation errors, Starlette's 404/405 and
anything unexpected into that shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("vqtok.service.errors")


class ServiceError(Exception):
    """A request the service refuses; subclasses set ``status`` and ``error_type``."""

    status: int = 400
    error_type: str = "bad_request"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ServiceError):
    """Malformed request: unparseable JSON, bad base64, a corrupt image, an unreadable multipart body."""

    status, error_type = 400, "bad_request"


class Unauthorized(ServiceError):
    status, error_type = 401, "unauthorized"


class NotFound(ServiceError):
    status, error_type = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, error_type = 405, "method_not_allowed"


class NotAcceptable(ServiceError):
    """The ``Accept`` header asks for a representation this response cannot have."""

    status, error_type = 406, "not_acceptable"


class PayloadTooLarge(ServiceError):
    """Body over ``max_body_bytes`` or an image over ``max_pixels``."""

    status, error_type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """Not an image, or a content type / image format the service does not read."""

    status, error_type = 415, "unsupported_media_type"


class InvalidRequest(ServiceError):
    """Well-formed but invalid: index out of range, ragged grid, over the token limit, wrong image count."""

    status, error_type = 422, "invalid_request"


class QueueFull(ServiceError):
    status, error_type = 429, "queue_full"


class RequestTimeout(ServiceError):
    """The client did not send its whole body within ``body_timeout_s``."""

    status, error_type = 408, "request_timeout"


class NotReady(ServiceError):
    """Still loading, shutting down, or the batcher stopped."""

    status, error_type = 503, "not_ready"


class InferenceFailed(ServiceError):
    """The model raised on the batch holding this request (e.g. out of memory); the service goes on."""

    status, error_type = 503, "inference_failed"


class DeadlineExceeded(ServiceError):
    """Queued and computed for longer than ``request_timeout_s``."""

    status, error_type = 504, "deadline_exceeded"


_STATUS_ERRORS: dict[int, type[ServiceError]] = {
    cls.status: cls
    for cls in (BadRequest, Unauthorized, NotFound, MethodNotAllowed, NotAcceptable, PayloadTooLarge,
                UnsupportedMediaType, InvalidRequest, QueueFull, RequestTimeout, NotReady, DeadlineExceeded)
}


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def error_response(
    status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type), status_code=status, headers=dict(headers or {}))


def format_location(loc: Sequence[Any]) -> str:
    """``("body", "indices", 0, 3)`` -> ``body.indices[0][3]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "request"


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union branch it tried inside ``loc`` (``"list[list[constrained-int]]"``)."""
    return isinstance(part, str) and ("[" in part or part.startswith("constrained-"))


def _without_union_noise(errors: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Union fields report every branch they tried: drop the branch names from ``loc``, drop the
    "wrong shape" errors of branches that did not apply when a branch that did has its own error,
    and drop the duplicates that remain."""
    untagged = [{**e, "loc": tuple(p for p in e.get("loc", ()) if not _is_union_tag(p))} for e in errors]
    tagged = any(any(_is_union_tag(p) for p in e.get("loc", ())) for e in errors)
    if tagged and any(e.get("type") != "list_type" for e in untagged):
        untagged = [e for e in untagged if e.get("type") != "list_type"]
    seen: set[tuple[Any, ...]] = set()
    unique = []
    for e in untagged:
        key = (e["loc"], e.get("msg"))
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return unique


def describe_validation_errors(errors: Sequence[Mapping[str, Any]], limit: int = 3) -> str:
    """pydantic error dicts -> ``"query.fit: Input should be 'pad', 'crop', ...; ..."`` (first ``limit``)."""
    errors = _without_union_noise(errors)
    parts = [f"{format_location(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors[:limit]]
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


def validation_error(exc: ValidationError, prefix: Sequence[str | int] = ()) -> InvalidRequest:
    """A pydantic ``ValidationError`` from our own parsing, as a 422 naming the field."""
    errors = [{**e, "loc": (*prefix, *e["loc"])} for e in exc.errors(include_url=False)]
    return InvalidRequest(describe_validation_errors(errors))


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.error_type, exc.message, exc.headers)


async def _request_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    # A JSON body that does not parse is malformed (400), not merely invalid.
    for e in errors:
        if e.get("type") == "json_invalid":
            position = e["loc"][-1] if e.get("loc") else "?"
            reason = (e.get("ctx") or {}).get("error", e.get("msg", "invalid"))
            message = f"request body is not valid JSON: {reason} at character {position}"
            return error_response(400, "bad_request", message)
    return error_response(422, "validation_error", describe_validation_errors(errors))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    cls = _STATUS_ERRORS.get(exc.status_code)
    error_type = cls.error_type if cls else "http_error"
    return error_response(exc.status_code, error_type, message, exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); the server log has details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
