"""Shaping answers: the ``.npy`` media type, timing and model-identity headers, and the error answers
every protected endpoint documents in the OpenAPI document."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from vqtok.service.batching import BatchResult
from vqtok.service.engine import Engine
from vqtok.service.schemas import ErrorResponse

NPY = "application/x-npy"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "malformed request"), (401, "missing or wrong API key"), (406, "Accept cannot be met"),
        (413, "body or image over the limit"), (415, "not an image / unsupported content type"),
        (422, "well-formed but invalid"), (429, "queue full, retry"), (503, "not ready"),
    )
}


def timing_headers(result: BatchResult) -> dict[str, str]:
    """``x-queue-time-ms``, ``x-inference-time-ms`` and ``x-batch-size`` of one request's batched work."""
    return {
        "x-queue-time-ms": f"{result.queue_seconds * 1000.0:.2f}",
        "x-inference-time-ms": f"{result.inference_seconds * 1000.0:.2f}",
        "x-batch-size": ",".join(str(size) for size in result.batch_sizes),
    }


def model_headers(engine: Engine) -> dict[str, str]:
    """``x-vqtok-model``, ``x-vqtok-weights-sha256`` and ``x-vqtok-model-id`` (built once by the engine)."""
    return dict(engine.identity_headers)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
