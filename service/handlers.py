"""The edge where errors meet HTTP: the handlers that turn a ``ServiceError``, FastAPI's validation
errors, Starlette's 404/405 and anything unexpected into the one JSON error shape with its kind's
status. (``service.errors`` holds the kinds and the domain errors; it imports no web framework, so
the library code that raises them stays light.)"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vqtok.service.errors import ErrorType, ServiceError, describe_validation_errors, error_body

logger = logging.getLogger("vqtok.service.handlers")


def error_response(error_type: ErrorType, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The JSON error answer, with the status of ``error_type``."""
    return JSONResponse(error_body(message, error_type), status_code=error_type.status, headers=dict(headers or {}))


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.error_type, exc.message, exc.headers)


async def _request_validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    # A JSON body that does not parse is malformed (400), not merely invalid.
    for e in errors:
        if e.get("type") == "json_invalid":
            position = e["loc"][-1] if e.get("loc") else "?"
            reason = (e.get("ctx") or {}).get("error", e.get("msg", "invalid"))
            message = f"request body is not valid JSON: {reason} at character {position}"
            return error_response(ErrorType.BAD_REQUEST, message)
    return error_response(ErrorType.INVALID_REQUEST, describe_validation_errors(errors))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(ErrorType.for_status(exc.status_code), message, exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    message = f"internal error ({type(exc).__name__}); the server log has details"
    return error_response(ErrorType.INTERNAL_ERROR, message)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
