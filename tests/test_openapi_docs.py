"""The page and the offline docs without a browser, over real HTTP to a served app: the page and every asset
answer 200 with the right media type and stay public with an API key on; /docs and /redoc load only local
assets; the OpenAPI document has an example per input form (each accepted by the server as it stands), a
description for every field, /metrics, and every accepted image type."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import service_settings
from vqtok.service.server import serve_in_thread
from vqtok.service.web.router import STATIC

KEY = "docs-test-key"
SAMPLES = sorted(p.name for p in (STATIC / "samples").iterdir())
ASSETS = {  # path -> media type
    "/": "text/html",
    "/web/explorer.js": "text/javascript",
    "/web/explorer.css": "text/css",
    "/web/favicon.svg": "image/svg+xml",
    **{f"/web/samples/{name}": "image/jpeg" for name in SAMPLES},
    "/web/vendor/swagger-ui-bundle.js": "text/javascript",
    "/web/vendor/swagger-ui.css": "text/css",
    "/web/vendor/redoc.standalone.js": "text/javascript",
    "/docs": "text/html",
    "/redoc": "text/html",
}


@pytest.fixture(scope="module")
def keyed_url(tiny_checkpoint: Path) -> Iterator[str]:
    """A served app with an API key: the page and docs must stay public."""
    with serve_in_thread(service_settings(tiny_checkpoint, port=0, api_key=KEY, log_level="warning")) as url:
        yield url


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def _links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


def _remote(url: str) -> bool:
    return bool(re.match(r"^(?:[a-z][a-z0-9+.-]*:)?//", url, re.IGNORECASE))


def test_the_page_and_its_assets_are_public_with_the_right_types(keyed_url: str) -> None:
    assert len(SAMPLES) >= 3
    assert sum((STATIC / "samples" / name).stat().st_size for name in SAMPLES) < 100_000  # small
    for path, media in ASSETS.items():
        answer = httpx.get(keyed_url + path, timeout=30)
        assert answer.status_code == 200, (path, answer.text[:200])
        assert answer.headers["content-type"].split(";")[0] == media, path
    assert httpx.head(keyed_url + "/", timeout=30).status_code == 200
    for name in SAMPLES:  # real photos
        image = Image.open(io.BytesIO(httpx.get(f"{keyed_url}/web/samples/{name}", timeout=30).content))
        assert image.format == "JPEG" and max(image.size) == 256
    # the API itself still needs the key; an unknown asset is the service's 404
    assert httpx.get(f"{keyed_url}/info", timeout=30).status_code == 401
    assert httpx.get(f"{keyed_url}/info", headers={"authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200
    missing = httpx.get(f"{keyed_url}/web/nope.js", timeout=30)
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    # the public prefix does not open a way around the key
    assert httpx.get(f"{keyed_url}/web/../info", timeout=30).status_code in (401, 404)


def test_the_page_and_docs_reference_only_local_assets(keyed_url: str) -> None:
    for page in ("/", "/docs", "/redoc"):
        html = httpx.get(keyed_url + page, timeout=30).text
        urls = _links(html)
        assert urls, page
        assert not [u for u in urls if _remote(u)], (page, urls)
        assert "fonts.googleapis" not in html and "cdn." not in html, page
        for url in urls:  # and every one of them is served
            absolute = httpx.URL(keyed_url + page).join(url)
            assert httpx.get(absolute, timeout=30).status_code == 200, (page, url)
    # the page's own script and style name no other host; the served ReDoc bundle loads no remote image
    for asset in ("/web/explorer.js", "/web/explorer.css"):
        text = httpx.get(keyed_url + asset, timeout=30).text
        assert not re.search(r"https?://", text), asset
    redoc = httpx.get(f"{keyed_url}/web/vendor/redoc.standalone.js", timeout=60).text
    assert "cdn.redoc.ly" not in redoc
    swagger = httpx.get(f"{keyed_url}/docs", timeout=30).text
    assert '"validatorUrl": null' in swagger  # no badge from validator.swagger.io


def _walk_properties(schemas: dict[str, Any]) -> list[str]:
    """``Schema.field`` of every property without a description."""
    missing = []
    for name, schema in schemas.items():
        for field, prop in schema.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{name}.{field}")
    return missing


def test_openapi_has_examples_descriptions_metrics_and_every_image_type(keyed_url: str) -> None:
    openapi = httpx.get(f"{keyed_url}/openapi.json", timeout=30).json()
    paths = openapi["paths"]
    assert "get" in paths["/metrics"] and "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    encode_body = paths["/encode"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff"} <= set(encode_body)
    assert {"base64", "data_url", "several"} <= set(encode_body["application/json"]["examples"])
    decode_body = paths["/decode"]["post"]["requestBody"]["content"]["application/json"]
    assert {"indices", "several_grids", "flat_tokens", "layout", "lenient"} <= set(decode_body["examples"])
    schemas = openapi["components"]["schemas"]
    assert _walk_properties(schemas) == []
    for field in ("offset", "bos", "eos"):
        assert schemas["DecodeRequest"]["properties"][field]["description"]
    for field in ("model", "fit", "offset", "bos", "eos", "images"):
        assert schemas["EncodeResponse"]["properties"][field]["description"]
    assert "null when not asked for" in schemas["EncodedImage"]["properties"]["tokens"]["description"]
    json_body = encode_body["application/json"]["schema"]
    assert "GIF" in json_body["properties"]["images"]["description"]
    assert _walk_properties({"EncodeJSONRequest": json_body}) == []
    assert _walk_properties({"multipart": encode_body["multipart/form-data"]["schema"]}) == []


def test_every_published_example_is_accepted_by_the_server(keyed_url: str) -> None:
    openapi = httpx.get(f"{keyed_url}/openapi.json", timeout=30).json()
    auth = {"authorization": f"Bearer {KEY}"}
    for path in ("/encode", "/decode"):
        examples = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"]
        for name, example in examples.items():
            answer = httpx.post(keyed_url + path, json=example["value"], headers=auth, timeout=60)
            assert answer.status_code == 200, (path, name, answer.text)
            if name == "lenient":
                assert int(answer.headers["x-vqtok-repairs"]) >= 1
            if path == "/encode":
                assert len(answer.json()["images"]) == len(example["value"]["images"])


def test_every_listed_image_type_is_accepted_as_a_raw_body(keyed_url: str, astronaut: np.ndarray) -> None:
    image = Image.fromarray(astronaut).resize((32, 32))
    formats = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
               "image/gif": "GIF", "image/bmp": "BMP", "image/tiff": "TIFF"}
    listed = set(httpx.get(f"{keyed_url}/openapi.json", timeout=30).json()["paths"]["/encode"]["post"]
                 ["requestBody"]["content"]) - {"multipart/form-data", "application/json"}
    assert listed == set(formats)
    for media, fmt in formats.items():
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        answer = httpx.post(f"{keyed_url}/encode", content=buffer.getvalue(), timeout=60,
                            headers={"content-type": media, "authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200, (media, answer.text)
        assert answer.json()["images"][0]["grid"] == [8, 8]
