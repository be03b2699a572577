"""The HTTP contract, fuzzed: schemathesis generates requests from the app's own OpenAPI schema and
sends them to a real server. Bounded (fixed seed, derandomized, a few dozen examples per operation):
no 5xx, responses conform to the schema, and a request the schema accepts is not refused as invalid."""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema_rs  # schemathesis' own validator
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from tests.conftest import service_settings
from vqtok.service.server import serve_in_thread


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# JSON Schema cannot say "a decodable image": binary fields get real small PNGs here (the 415 for
# bytes that are no image is documented and tested in test_service_errors.py).
_PNGS = st.builds(
    lambda h, w, seed: _png(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)),
    st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**16),
)
schemathesis.openapi.format("binary", _PNGS)
schemathesis.openapi.format("byte", _PNGS.map(lambda data: base64.b64encode(data).decode("ascii")))


# A schema-valid request may still be refused for what only the loaded model decides (its K, its
# downsample factor f) or what depends on combinations of values (a grid over the token limit);
# README lists these 422s. Anything else the schema must refuse itself.
VALUE_DEPENDENT_REFUSALS = (
    "multiple of the downsample factor",  # sizes: f is the model's
    "is outside [",  # indices and tokens: [offset, offset + K) is the model's
    "tokens per grid", "tokens per request", "token grid",  # grid size x f against the limits
    "larger than the decoded image",  # crop_to against grid x f
    "pixels on a side",  # output format limits against grid x f
    "crop_to lists",  # one crop_to per grid: a count relation
    ", but grid [",  # a token sequence's length against its grid
    "ragged grid",  # rows of one grid must have one length
    "is not loaded",  # layout names: which layouts are loaded is the server's (presets for its K, layout files)
    "layout '",  # a token sequence or prefix against the named layout's structure (positions, ids, its grid)
)


EXAMPLES = 100  # per operation and mode


@pytest.fixture(scope="module")
def live_url(tiny_checkpoint: Path) -> Iterator[str]:
    with serve_in_thread(service_settings(tiny_checkpoint, port=0, log_level="warning")) as url:
        yield url


def _operations(url: str) -> list[object]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(operation: object, mode: GenerationMode, base_url: str) -> None:
    """Run derandomized ``mode`` cases of one operation against the server."""

    @given(case=operation.as_strategy(generation_mode=mode))  # type: ignore[attr-defined]
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call_and_validate(base_url=base_url, excluded_checks=[positive_data_acceptance])
        if response.status_code in (400, 413, 415, 422) and mode is GenerationMode.POSITIVE:
            message = response.json()["error"]
            assert any(reason in message for reason in VALUE_DEPENDENT_REFUSALS), (
                f"a schema-valid request refused for a reason the schema could state: {message}\n"
                f"{case.as_curl_command()}"
            )

    try:
        check()
    except Unsatisfiable:  # an operation without parameters or body has no invalid form
        assert mode is GenerationMode.NEGATIVE


def test_the_contract_holds_for_generated_requests(live_url: str) -> None:
    """Every operation, derandomized examples of valid and invalid requests (negative ones break the
    schema and must be refused with a 4xx): no 5xx, conforming answers, and valid requests refused
    only for what the schema cannot state."""
    operations = _operations(live_url)
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {  # type: ignore[attr-defined]
        "POST /encode", "POST /decode", "GET /codebook", "GET /info", "GET /health", "GET /ready"}
    for operation, mode in itertools.product(operations, GenerationMode):
        _fuzz(operation, mode, live_url)
    metrics = httpx.get(f"{live_url}/metrics", timeout=10).text
    seen = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("vqtok_requests_total{")}
    print(f"{sum(seen.values()):.0f} requests:", seen)
    assert sum(v for k, v in seen.items() if 'route="/encode"' in k) >= EXAMPLES
    assert sum(v for k, v in seen.items() if 'route="/decode"' in k) >= EXAMPLES
    assert not any('status="5' in k for k in seen), seen


@pytest.mark.parametrize(("model", "body"), [
    ("EncodeJSONRequest", {"images": []}),
    ("EncodeJSONRequest", {"images": [""]}),
    ("DecodeRequest", {"indices": [[1]], "tokens": [1], "grid": [1, 1]}),
    ("DecodeRequest", {"tokens": [1]}),
    ("DecodeRequest", {"indices": None}),
    ("DecodeRequest", {"indices": [[]]}),
    ("DecodeRequest", {"tokens": [1], "grid": [0, 1]}),
])
def test_the_schema_refuses_what_the_server_refuses(model: str, body: dict[str, object]) -> None:
    """Requests the server always refuses are invalid under the published schema too."""
    from vqtok.service import schemas

    schema = getattr(schemas, model).model_json_schema()
    assert not jsonschema_rs.validator_for(schema).is_valid(body), body


def test_the_schema_accepts_a_real_request() -> None:
    from vqtok.service.schemas import DecodeRequest, EncodeJSONRequest

    assert jsonschema_rs.validator_for(EncodeJSONRequest.model_json_schema()).is_valid({"images": ["iVBORw0KGgo="]})
    decode = jsonschema_rs.validator_for(DecodeRequest.model_json_schema())
    assert decode.is_valid({"indices": [[1, 2], [3, 4]]}) and decode.is_valid({"tokens": [1, 2], "grid": [1, 2]})
