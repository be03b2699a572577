"""Every refused input: the status, the ``error_type`` and the message text, and never a 500."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np
import pytest
import pytest_asyncio

from tests.errors import assert_error

pytestmark = pytest.mark.asyncio

PNG_HEADERS = {"content-type": "image/png"}


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (with a valid CRC) and holds one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


@pytest_asyncio.fixture
async def service(make_service):  # type: ignore[no-untyped-def]
    async with make_service(max_body_bytes=200_000, max_pixels=500_000, max_images_per_request=3,
                            max_tokens_per_grid=1024) as (_, client):
        yield client


async def test_bad_base64(service) -> None:
    response = await service.post("/encode", json={"images": ["not*base64!"]})
    assert_error(response, 400, "bad_request", "images[0]: not valid base64")


async def test_not_an_image(service) -> None:
    response = await service.post("/encode", content=b"hello, I am text pretending", headers=PNG_HEADERS)
    assert_error(response, 415, "unsupported_media_type", "body: not an image in a supported format")


async def test_not_an_image_in_multipart(service) -> None:
    response = await service.post("/encode", files=[("image", ("x.png", b"%PDF-1.4 ...", "image/png"))])
    assert_error(response, 415, "unsupported_media_type", "images[0]: not an image")


async def test_truncated_png(service, astronaut, image_bytes) -> None:
    png = image_bytes(astronaut, size=(64, 64))
    response = await service.post("/encode", content=png[: len(png) // 2], headers=PNG_HEADERS)
    assert_error(response, 400, "bad_request", "body: truncated or corrupt PNG image")


async def test_unsupported_content_type(service) -> None:
    response = await service.post("/encode", content=b"a,b,c", headers={"content-type": "text/csv"})
    assert_error(response, 415, "unsupported_media_type", "Content-Type 'text/csv' is not supported by /encode")
    decode = await service.post("/decode", content=b"indices=1", headers={"content-type": "text/plain"})
    assert_error(decode, 415, "unsupported_media_type", "send application/json")


async def test_body_over_limit_with_lying_content_length(service) -> None:
    async def body():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"\x89PNG" + b"\x00" * 49_996

    response = await service.post("/encode", content=body(), headers={**PNG_HEADERS, "content-length": "100"})
    assert_error(response, 413, "payload_too_large", "over the limit of 200000 bytes")


async def test_body_over_limit_by_content_length(service) -> None:
    response = await service.post("/decode", content=b"{" * 300_000, headers={"content-type": "application/json"})
    assert_error(response, 413, "payload_too_large", "of 300000 bytes (Content-Length)")


async def test_pixel_bomb(service) -> None:
    response = await service.post("/encode", content=huge_png_header(100_000, 100_000), headers=PNG_HEADERS)
    assert_error(response, 413, "payload_too_large", "body: ", "10000000000 pixels", "pixel limit of 500000")


async def test_image_over_pixel_limit(service) -> None:
    response = await service.post("/encode", content=huge_png_header(1000, 1000), headers=PNG_HEADERS)
    assert_error(response, 413, "payload_too_large", "1000x1000 = 1000000 pixels is over the limit of 500000")


async def test_too_many_images(service, astronaut, image_bytes) -> None:
    png = image_bytes(astronaut, size=(16, 16))
    response = await service.post("/encode", files=[("image", (f"{i}.png", png, "image/png")) for i in range(4)])
    assert_error(response, 422, "invalid_request", "4 images in one request, the limit is 3")


async def test_zero_images(service) -> None:
    response = await service.post("/encode", json={"images": []})
    assert_error(response, 422, "invalid_request", "no images in the request")
    form_only = b'--x\r\nContent-Disposition: form-data; name="fit"\r\n\r\npad\r\n--x--\r\n'
    multipart = await service.post("/encode", content=form_only,
                                   headers={"content-type": "multipart/form-data; boundary=x"})
    assert_error(multipart, 422, "invalid_request", "no images in the request")
    misnamed = await service.post("/encode", files=[("picture", ("x.png", b"x", "image/png"))])
    assert_error(misnamed, 422, "invalid_request", "unexpected file part 'picture'")
    no_grids = await service.post("/decode", json={"indices": []})
    assert_error(no_grids, 422, "invalid_request", "no grids in the request")


async def test_ragged_grid(service) -> None:
    response = await service.post("/decode", json={"indices": [[[1, 2, 3], [4, 5, 6]], [[1, 2], [3, 4], [5]]]})
    assert_error(response, 422, "invalid_request", "indices[1]: ragged grid: row 2 has 1 entries, row 0 has 2")


async def test_index_out_of_range_names_position(service) -> None:
    grid = np.zeros((4, 6), dtype=int)
    grid[3, 5] = 600
    response = await service.post("/decode", json={"indices": [grid.tolist()]})
    assert_error(response, 422, "invalid_request", "indices[0][3][5] = 600 is outside [0, 64)")
    negative = await service.post("/decode", json={"indices": [[0, -1]]})
    assert_error(negative, 422, "invalid_request", "indices[0][1] = -1 is outside [0, 64)")


async def test_token_out_of_range_with_offset_names_position(service) -> None:
    tokens = [7, *([1000] * 17), 999, *([1000] * 6), 8]  # bos, 17 ok, one below the offset, 6 ok, eos
    request = {"tokens": tokens, "grid": [4, 6], "offset": 1000, "bos": 7, "eos": 8}
    response = await service.post("/decode", json=request)
    assert_error(response, 422, "invalid_request", "tokens[18] = 999 is outside [1000, 1064)")


async def test_tokens_length_mismatch(service) -> None:
    response = await service.post("/decode", json={"tokens": [1, *range(10), 2], "grid": [4, 4], "bos": 1, "eos": 2})
    assert_error(response, 422, "invalid_request",
                 "tokens has 10 entries after stripping bos and eos, but grid [4, 4] needs 4 * 4 = 16")


async def test_tokens_without_grid_and_both_sources(service) -> None:
    response = await service.post("/decode", json={"tokens": [1, 2, 3]})
    assert_error(response, 422, "invalid_request", "'tokens' needs 'grid'")
    both = await service.post("/decode", json={"tokens": [1], "grid": [1, 1], "indices": [[1]]})
    assert_error(both, 422, "invalid_request", "exactly one of 'indices' or 'tokens'")


async def test_grid_over_token_limit(service, astronaut, image_bytes) -> None:
    response = await service.post("/decode", json={"tokens": [0] * 2048, "grid": [32, 64]})
    assert_error(response, 422, "invalid_request", "grid 32x64 = 2048 tokens is over the limit of 1024")
    encode = await service.post("/encode", params={"size": "256"}, content=image_bytes(astronaut, size=(64, 64)),
                                headers=PNG_HEADERS)
    assert_error(encode, 422, "invalid_request", "encodes to a 64x64 = 4096 token grid, over the limit of 1024")


@pytest.mark.parametrize("size", ["big", "12x", "0", "-4", "4x4x4"])
async def test_bad_size_string(service, astronaut, image_bytes, size: str) -> None:
    response = await service.post("/encode", params={"size": size}, content=image_bytes(astronaut, size=(16, 16)),
                                  headers=PNG_HEADERS)
    assert_error(response, 422, "invalid_request", f"size {size!r}")


async def test_bad_fit_value(service, astronaut, image_bytes) -> None:
    response = await service.post("/encode", params={"fit": "squash"}, content=image_bytes(astronaut, size=(16, 16)),
                                  headers=PNG_HEADERS)
    assert_error(response, 422, "invalid_request", "query.fit: Input should be 'pad', 'crop', 'resize' or 'none'")
    part = ("a.png", image_bytes(astronaut, size=(16, 16)), "image/png")
    form = await service.post("/encode", files=[("image", part)],
                              data={"fit": "squash"})
    assert_error(form, 422, "invalid_request", "form.fit: Input should be")


async def test_size_not_multiple(service, astronaut, image_bytes) -> None:
    none = await service.post("/encode", params={"fit": "none"}, content=image_bytes(astronaut, size=(30, 16)),
                              headers=PNG_HEADERS)
    assert_error(none, 422, "invalid_request", "body: 30x16 is not a multiple of the downsample factor 4",
                 "fit=none does not resize")
    target = await service.post("/encode", params={"size": "30"}, content=image_bytes(astronaut, size=(16, 16)),
                                headers=PNG_HEADERS)
    assert_error(target, 422, "invalid_request", "size 30x30 is not a multiple of the downsample factor 4; try 32x32")


async def test_npy_needs_one_grid_shape(service, astronaut, image_bytes) -> None:
    files = [("image", ("a.png", image_bytes(astronaut, size=(16, 16)), "image/png")),
             ("image", ("b.png", image_bytes(astronaut, size=(32, 16)), "image/png"))]
    response = await service.post("/encode", files=files, headers={"accept": "application/x-npy"})
    assert_error(response, 406, "not_acceptable", "needs every image to encode to the same grid", "16x16, 32x16")


async def test_malformed_json(service) -> None:
    json_headers = {"content-type": "application/json"}
    response = await service.post("/decode", content=b'{"indices": [[1, 2]', headers=json_headers)
    assert_error(response, 400, "bad_request", "request body is not valid JSON")
    encode = await service.post("/encode", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(encode, 400, "bad_request", "request body is not valid JSON")


async def test_wrong_json_types(service) -> None:
    response = await service.post("/decode", json={"indices": [[1, "x"]]})
    assert_error(response, 422, "invalid_request", "body.indices")
    unknown = await service.post("/decode", json={"indices": [[1]], "colour": "red"})
    assert_error(unknown, 422, "invalid_request", "body.colour: Extra inputs are not permitted")
    images = await service.post("/encode", json={"images": "abc"})
    assert_error(images, 422, "invalid_request", "body.images: Input should be a valid list")


async def test_a_wrong_value_in_a_grid_is_named_once_without_union_noise(service) -> None:
    response = await service.post("/decode", json={"indices": [[1, "x"]]})
    assert response.json()["error"] == (
        "body.indices[0][1]: Input should be a valid integer, unable to parse string as an integer"
    )


async def test_integers_beyond_int64_or_token_ids_are_422_not_500(service) -> None:
    huge = 10**30
    index = await service.post("/decode", json={"indices": [[huge, 1]]})
    assert_error(index, 422, "invalid_request", "body.indices[0][0]: Input should be less than 9223372036854775808")
    token = await service.post("/decode", json={"tokens": [1, 2, huge, 3], "grid": [2, 2]})
    assert_error(token, 422, "invalid_request", "body.tokens[2]: Input should be less than 9223372036854775808")
    offset = await service.post("/decode", json={"indices": [[1]], "offset": huge})
    assert_error(offset, 422, "invalid_request", "body.offset: Input should be less than 2147483648")
    bos = await service.post("/decode", json={"tokens": [1], "grid": [1, 1], "bos": huge})
    assert_error(bos, 422, "invalid_request", "body.bos: Input should be less than 2147483648")
    encode = await service.post(f"/encode?offset={huge}", content=b"\x89PNG", headers={"content-type": "image/png"})
    assert_error(encode, 422, "invalid_request", "query.offset: Input should be less than 2147483648")


async def test_crop_to_larger_than_image(service) -> None:
    response = await service.post("/decode", json={"indices": [[1, 2], [3, 4]], "crop_to": {"width": 9, "height": 8}})
    assert_error(response, 422, "invalid_request", "crop_to: 9x8 is larger than the decoded image 8x8")


async def test_unknown_route_and_wrong_method(service) -> None:
    assert_error(await service.get("/v1/encode"), 404, "not_found", "no route /v1/encode")
    assert_error(await service.get("/decode"), 405, "method_not_allowed", "method GET is not allowed on /decode")
    assert_error(await service.delete("/codebook"), 405, "method_not_allowed", "DELETE")


async def test_error_types_are_one_closed_set_each_with_its_status() -> None:
    """The README's list: every error_type the service sends, with its one status; 422 is only invalid_request."""
    from vqtok.service.errors import ErrorType, ServiceError

    assert {t.value: t.status for t in ErrorType} == {
        "bad_request": 400, "unauthorized": 401, "not_found": 404, "method_not_allowed": 405,
        "not_acceptable": 406, "request_timeout": 408, "payload_too_large": 413, "unsupported_media_type": 415,
        "invalid_request": 422, "queue_full": 429, "internal_error": 500, "not_ready": 503,
        "inference_failed": 503, "deadline_exceeded": 504,
    }
    for cls in ServiceError.__subclasses__():
        assert cls("x").status == cls.error_type.status, cls
    assert [t for t in ErrorType if t.status == 422] == [ErrorType.INVALID_REQUEST]


async def test_garbage_inputs_never_500(service) -> None:
    """A sweep of odd bodies and content types: every answer is a 4xx in the error shape."""
    cases = [
        ("/encode", b"", "image/png"), ("/encode", b"\x89PNG\r\n\x1a\n", "image/png"),
        ("/encode", b"GIF89a\x00", "image/gif"), ("/encode", b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        ("/encode", b"--x\r\nbroken", "multipart/form-data; boundary=x"), ("/encode", b"[]", "application/json"),
        ("/encode", b'{"images": [""]}', "application/json"), ("/encode", b"\xff\xd8\xff\xe0", "image/jpeg"),
        ("/decode", b"null", "application/json"), ("/decode", b'{"indices": [[[]]]}', "application/json"),
        ("/decode", b'{"tokens": [], "grid": [0, 4]}', "application/json"),
        ("/decode", b'{"indices": [[1e30]]}', "application/json"),
        ("/decode", b'{"tokens": [1, 2], "grid": [1, 2], "format": "gif"}', "application/json"),
        ("/encode", b"BM" + b"\x00" * 30, "image/bmp"),
    ]
    for path, content, content_type in cases:
        response = await service.post(path, content=content, headers={"content-type": content_type})
        assert 400 <= response.status_code < 500, (path, content, response.status_code, response.text)
        assert set(response.json()) == {"error", "error_type"}
    encoded = base64.b64encode(huge_png_header(10, 10)).decode()
    response = await service.post("/encode", json={"images": [encoded]})
    assert response.status_code in (400, 415) and set(response.json()) == {"error", "error_type"}


# ------------------------------------------------------------------------------------------------
# The hostile corpus: every supported format truncated and corrupted, and multipart abuse. Each case
# asserts the status, the error shape and the message.
# ------------------------------------------------------------------------------------------------

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
           "BMP": "image/bmp", "TIFF": "image/tiff"}


def _file(fmt: str, pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
async def test_damaged_images_of_every_format_are_400(service, astronaut, fmt: str, damage: str) -> None:
    data = _file(fmt, np.ascontiguousarray(astronaut[:64, :64]))
    if damage == "truncated":  # the header survives, the pixel data stops half way
        body = data[: len(data) // 2]
    else:  # the header survives, the rest is noise
        body = data[:32] + np.random.default_rng(0).integers(0, 256, len(data) - 32, dtype=np.uint8).tobytes()
    response = await service.post("/encode", content=body, headers={"content-type": FORMATS[fmt]})
    assert_error(response, 400, "bad_request", "body: ", "truncated or corrupt")


async def test_multipart_abuse(service, astronaut, image_bytes) -> None:
    png = image_bytes(astronaut, size=(16, 16))
    boundary = "b0undary"
    multipart = f"multipart/form-data; boundary={boundary}"

    def part(name: str, content: bytes, filename: str | None = None) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"

    end = f"--{boundary}--\r\n".encode()
    cases = [
        # no boundary parameter at all
        (b"whatever", "multipart/form-data", 400, "bad_request", "the Content-Type has no boundary parameter"),
        # a body that never reaches its closing boundary
        (part("image", png, "a.png")[:-40], multipart, 400, "bad_request",
         "does not end with its closing boundary '--b0undary--'"),
        # the image as a text field instead of a file
        (part("image", b"iVBORw0KGgo=") + end, multipart, 400, "bad_request", "part 'image' #0 must be a file"),
        # a file under another name
        (part("picture", png, "a.png") + end, multipart, 422, "invalid_request", "unexpected file part 'picture'"),
        # more files than the request may hold (limit 3 here)
        (b"".join(part("image", png, f"{i}.png") for i in range(6)) + end, multipart, 400, "bad_request",
         "unreadable multipart body", "Too many files"),
        # an unknown option field
        (part("image", png, "a.png") + part("colour", b"red") + end, multipart, 422, "invalid_request",
         "form.colour: Extra inputs are not permitted"),
        # an option with a bad value
        (part("image", png, "a.png") + part("fit", b"squash") + end, multipart, 422, "invalid_request", "form.fit"),
        # no image part at all
        (part("fit", b"pad") + end, multipart, 422, "invalid_request", "no images in the request"),
    ]
    for body, content_type, status, error_type, *fragments in cases:
        response = await service.post("/encode", content=body, headers={"content-type": content_type})
        assert_error(response, status, error_type, *fragments)


async def test_json_bodies_take_json_types_only(service, astronaut, image_bytes) -> None:
    """What JSON Schema's integer and boolean are not, the server refuses too (pydantic's lax mode would
    read false as 0 and "5" as 5); integral numbers such as 2.0 stay integers, as the schema says."""
    png = base64.b64encode(image_bytes(astronaut, size=(16, 16))).decode()
    cases = [
        ("/decode", {"bos": False, "indices": [[0]]}, "body.bos: Input should be a valid integer"),
        ("/decode", {"indices": [["5"]]}, "body.indices[0][0]: Input should be a valid integer"),
        ("/decode", {"tokens": [1], "grid": [True, 1]}, "body.grid[0]: Input should be a valid integer"),
        ("/decode", {"indices": [[1]], "crop_to": {"width": "4", "height": 4}}, "body.crop_to.width"),
        ("/encode", {"images": [png], "offset": "5"}, "body.offset: Input should be a valid integer"),
        ("/encode", {"images": [png], "tokens": 1}, "body.tokens: Input should be a valid boolean"),
    ]
    for path, body, fragment in cases:
        assert_error(await service.post(path, json=body), 422, "invalid_request", fragment)
    integral = await service.post("/decode", json={"indices": [[2.0, 1]], "quality": 90.0, "format": "jpeg"})
    assert integral.status_code == 200
