"""The one assertion for refused requests: status, the error shape and the message fragments."""

from __future__ import annotations

import httpx


def assert_error(response: httpx.Response, status: int, error_type: str, *fragments: str) -> None:
    """``response`` is ``status`` with exactly ``{"error", "error_type"}``, the type, and every fragment."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == error_type, body
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])
