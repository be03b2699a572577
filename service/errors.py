"""One error shape for every failure: ``{"error": "<what was wrong and where>", "error_type": "<kind>"}``.

``ErrorType`` is the closed set of kinds, each with its HTTP status: the only place a kind meets a
status. Domain code (imaging, tokens, batching, parsing) raises a ``ServiceError`` subclass, which
names its ``ErrorType`` and knows nothing of HTTP; the edge (the handlers ``service.handlers``
installs, and ``middleware.send_error``) turns it, FastAPI's validation errors,
Starlette's 404/405 and anything unexpected into that shape, with the kind's status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import ValidationError


class ErrorType(StrEnum):
    """Every ``error_type`` the service answers with, and its HTTP status (text-embeddings-inference style).

    One kind per status, except 503: ``not_ready`` (loading, draining, batcher stopped) and
    ``inference_failed`` (the model raised on this request's batch; retry). Every 422 is ``invalid_request``,
    however the request was sent (query, form, JSON body) and whoever found the problem.
    """

    status: int

    def __new__(cls, value: str, status: int) -> ErrorType:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        return member

    BAD_REQUEST = "bad_request", 400
    UNAUTHORIZED = "unauthorized", 401
    NOT_FOUND = "not_found", 404
    METHOD_NOT_ALLOWED = "method_not_allowed", 405
    NOT_ACCEPTABLE = "not_acceptable", 406
    REQUEST_TIMEOUT = "request_timeout", 408
    PAYLOAD_TOO_LARGE = "payload_too_large", 413
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415
    INVALID_REQUEST = "invalid_request", 422
    QUEUE_FULL = "queue_full", 429
    INTERNAL_ERROR = "internal_error", 500
    NOT_READY = "not_ready", 503
    INFERENCE_FAILED = "inference_failed", 503
    DEADLINE_EXCEEDED = "deadline_exceeded", 504

    @classmethod
    def for_status(cls, status: int) -> ErrorType:
        """The kind of an HTTP error raised outside our code (Starlette's 404/405): the first member with
        that status. A status outside the set (none is known to occur) answers as ``bad_request`` (4xx)
        or ``internal_error``, with their status: the set stays closed."""
        for member in cls:
            if member.status == status:
                return member
        return cls.BAD_REQUEST if 400 <= status < 500 else cls.INTERNAL_ERROR


class ServiceError(Exception):
    """A request the service refuses; each subclass names its ``ErrorType`` (which fixes the status)."""

    error_type: ErrorType = ErrorType.BAD_REQUEST

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        """The HTTP status of this error's kind (``ErrorType.status``)."""
        return self.error_type.status


class BadRequest(ServiceError):
    """Malformed request: unparseable JSON, bad base64, a corrupt image, an unreadable multipart body."""

    error_type = ErrorType.BAD_REQUEST


class Unauthorized(ServiceError):
    error_type = ErrorType.UNAUTHORIZED


class NotFound(ServiceError):
    error_type = ErrorType.NOT_FOUND


class MethodNotAllowed(ServiceError):
    error_type = ErrorType.METHOD_NOT_ALLOWED


class NotAcceptable(ServiceError):
    """The ``Accept`` header asks for a representation this response cannot have."""

    error_type = ErrorType.NOT_ACCEPTABLE


class PayloadTooLarge(ServiceError):
    """Body over ``max_body_bytes`` or an image over ``max_pixels``."""

    error_type = ErrorType.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(ServiceError):
    """Not an image, or a content type / image format the service does not read."""

    error_type = ErrorType.UNSUPPORTED_MEDIA_TYPE


class InvalidRequest(ServiceError):
    """Well-formed but invalid: index out of range, ragged grid, over the token limit, wrong image count,
    a field of the wrong type or out of its bounds."""

    error_type = ErrorType.INVALID_REQUEST

    @classmethod
    def from_validation(cls, exc: ValidationError, prefix: Sequence[str | int] = ()) -> InvalidRequest:
        """A pydantic ``ValidationError`` from our own parsing, naming the field under ``prefix``
        (``("body",)``, ``("form",)``): the same message FastAPI's own validation gets."""
        errors = [{**e, "loc": (*prefix, *e["loc"])} for e in exc.errors(include_url=False)]
        return cls(describe_validation_errors(errors))


class QueueFull(ServiceError):
    error_type = ErrorType.QUEUE_FULL


class RequestTimeout(ServiceError):
    """The client did not send its whole body within ``body_timeout_s``."""

    error_type = ErrorType.REQUEST_TIMEOUT


class NotReady(ServiceError):
    """Still loading, shutting down, or the batcher stopped."""

    error_type = ErrorType.NOT_READY


class InferenceFailed(ServiceError):
    """The model raised on the batch holding this request (e.g. out of memory); the service goes on."""

    error_type = ErrorType.INFERENCE_FAILED


class DeadlineExceeded(ServiceError):
    """Queued and computed for longer than ``request_timeout_s``."""

    error_type = ErrorType.DEADLINE_EXCEEDED


def error_body(message: str, error_type: ErrorType) -> dict[str, str]:
    return {"error": message, "error_type": error_type.value}


def format_location(loc: Sequence[Any]) -> str:
    """``("body", "indices", 0, 3)`` -> ``body.indices[0][3]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "request"


def _is_union_tag(part: Any) -> bool:
    """pydantic names the union branch it tried inside ``loc`` (``"list[list[constrained-int]]"``, or a
    model's class name such as ``"ImageSize"``; our field names are all snake_case)."""
    return isinstance(part, str) and ("[" in part or part.startswith("constrained-") or part[:1].isupper())


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
