"""Token layouts over HTTP: /encode tokens in each preset, /decode reading them back (grid inferred, strict and
lenient, extraction from mixed sequences), GET /layouts, POST /layouts/{name}/allowed, layout files and the
startup errors of bad ones. Real HTTP through the app (make_service: tiny checkpoint, K=64, f=4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vqtok.model.layouts import PRESETS, get_layout

K = 64
PRESET_SIZES = {"flat": "32", "chameleon-like": "128", "emu3-like": "32", "lumina-like": "32"}  # chameleon: 32x32


def preset(name: str):  # the service's preset for the tiny checkpoint's K
    return get_layout(name, codebook_size=K)


async def encode(client, png: bytes, **params: object) -> dict:
    response = await client.post("/encode", params=params, files=[("image", ("a.png", png, "image/png"))])
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def png(astronaut, image_bytes) -> bytes:
    return image_bytes(astronaut, size=(64, 64))


@pytest.mark.asyncio
async def test_encode_lays_tokens_out_in_each_preset(make_service, png) -> None:
    async with make_service() as (_, client):
        plain = await encode(client, png, size="32")
        assert plain.get("layout") is None and plain["images"][0]["tokens"] is None  # today's answer
        for name in PRESETS:
            body = await encode(client, png, size=PRESET_SIZES[name], layout=name)
            assert body["layout"] == name
            image = body["images"][0]
            assert image["tokens"] == preset(name).to_tokens(np.asarray(image["indices"])), name
        # JSON body and form field carry the option too
        form = await client.post("/encode", data={"layout": "lumina-like", "size": "32"},
                                 files=[("image", ("a.png", png, "image/png"))])
        assert form.json()["layout"] == "lumina-like"


@pytest.mark.asyncio
async def test_flat_offset_bos_eos_keep_working_and_conflict_with_other_layouts(make_service, png) -> None:
    async with make_service() as (_, client):
        today = await encode(client, png, size="32", offset=100, bos=1, eos=2)
        named = await encode(client, png, size="32", offset=100, bos=1, eos=2, layout="flat")
        assert today.get("layout") is None and named["layout"] == "flat"
        grid = np.asarray(today["images"][0]["indices"])
        expected = [1, *(grid.reshape(-1) + 100).tolist(), 2]
        assert today["images"][0]["tokens"] == expected == named["images"][0]["tokens"]
        conflict = await client.post("/encode", params={"layout": "emu3-like", "offset": 5},
                                     files=[("image", ("a.png", png, "image/png"))])
        assert conflict.status_code == 422 and "conflicts with offset/bos/eos" in conflict.json()["error"]
        unknown = await client.post("/encode", params={"layout": "nope"},
                                    files=[("image", ("a.png", png, "image/png"))])
        assert unknown.status_code == 422 and "'nope' is not loaded" in unknown.json()["error"]
        tokens = preset("emu3-like").to_tokens(grid)
        decode_conflict = await client.post("/decode", json={"tokens": tokens, "layout": "emu3-like", "bos": 3})
        assert decode_conflict.status_code == 422 and "conflicts" in decode_conflict.json()["error"]
        indices_with_layout = await client.post("/decode", json={"indices": grid.tolist(), "layout": "emu3-like"})
        assert indices_with_layout.status_code == 422
        # today's flat tokens + grid + offset + bos + eos decode as before
        flat = await client.post("/decode", json={"tokens": expected, "grid": [8, 8], "offset": 100, "bos": 1,
                                                  "eos": 2})
        assert flat.status_code == 200 and flat.headers["x-grid"] == "8,8" and "x-vqtok-repairs" not in flat.headers


@pytest.mark.asyncio
async def test_decode_round_trips_each_preset_with_the_grid_inferred(make_service, png) -> None:
    async with make_service() as (_, client):
        for name in PRESETS:
            body = await encode(client, png, size=PRESET_SIZES[name], layout=name)
            image = body["images"][0]
            request = {"tokens": image["tokens"], "layout": name}
            if name == "flat":
                request["grid"] = image["grid"]  # flat carries no shape
            from_tokens = await client.post("/decode", json=request)
            from_indices = await client.post("/decode", json={"indices": image["indices"]})
            assert from_tokens.status_code == 200, (name, from_tokens.text)
            assert from_tokens.headers["x-grid"] == ",".join(map(str, image["grid"]))
            if name != "flat":  # flat, strict: today's offset/bos/eos path, no repairs to report
                assert from_tokens.headers["x-vqtok-repairs"] == "0"
                assert from_tokens.headers["x-vqtok-layout"] == name
            assert from_tokens.content == from_indices.content, name
            as_json = await client.post("/decode", json=request, headers={"accept": "application/json"})
            answer = as_json.json()
            if name != "flat":
                assert answer["layout"] == name and answer["images"][0]["repairs"] == []
            assert answer["images"][0]["grid"] == image["grid"]


@pytest.mark.asyncio
async def test_strict_names_the_position_and_lenient_reports_the_repairs(make_service, png) -> None:
    layout = preset("emu3-like")
    async with make_service() as (_, client):
        image = (await encode(client, png, size="32", layout="emu3-like"))["images"][0]
        tokens = image["tokens"]
        eol_at = tokens.index(layout.eol)  # after row 0
        broken = tokens[:eol_at] + tokens[eol_at + 1:]
        strict = await client.post("/decode", json={"tokens": broken, "layout": "emu3-like"})
        assert strict.status_code == 422 and strict.json()["error_type"] == "invalid_request"
        assert f"position {eol_at}" in strict.json()["error"] and "end-of-row" in strict.json()["error"]
        lenient = {"tokens": broken, "layout": "emu3-like", "repair": "lenient"}
        answer = await client.post("/decode", json=lenient, headers={"accept": "application/json"})
        assert answer.status_code == 200, answer.text
        repairs = answer.json()["images"][0]["repairs"]
        assert [(r["position"], r["kind"]) for r in repairs] == [(eol_at, "missing")]
        assert answer.json()["images"][0]["grid"] == image["grid"]
        binary = await client.post("/decode", json=lenient)
        assert binary.headers["content-type"] == "image/png"
        assert binary.headers["x-vqtok-repairs"] == "1"
        assert json.loads(binary.headers["x-vqtok-repairs-detail"]) == repairs
        # a sequence cut short, padded with a code
        cut = await client.post("/decode", json={**lenient, "tokens": tokens[:-10], "pad": 3},
                                headers={"accept": "application/json"})
        assert cut.status_code == 200 and cut.json()["images"][0]["repairs"]
        # many repairs: the detail header stays bounded, the count is exact
        many = list(tokens)
        for k in range(len(many)):
            if many[k] == layout.eol:
                many[k] = 5  # a text id where end-of-row belongs
        noisy = await client.post("/decode", json={**lenient, "tokens": many})
        assert noisy.status_code == 200 and int(noisy.headers["x-vqtok-repairs"]) >= 8
        assert len(noisy.headers["x-vqtok-repairs-detail"]) <= 2048


@pytest.mark.asyncio
async def test_extract_decodes_every_image_of_a_mixed_sequence(make_service, png, astronaut, image_bytes) -> None:
    async with make_service() as (_, client):
        first = (await encode(client, png, size="32", layout="lumina-like"))["images"][0]
        other = image_bytes(astronaut[::-1].copy(), size=(48, 32))
        second = (await encode(client, other, size="48x32", layout="lumina-like"))["images"][0]
        text = [9000, 9001, 9002]
        mixed = text + first["tokens"] + text[:2] + second["tokens"] + text[:1]
        response = await client.post("/decode", json={"tokens": mixed, "layout": "lumina-like", "extract": True})
        assert response.status_code == 200, response.text
        images = response.json()["images"]
        start2 = 3 + len(first["tokens"]) + 2
        assert [img["span"] for img in images] == [[3, 3 + len(first["tokens"])],
                                                  [start2, start2 + len(second["tokens"])]]
        assert [img["grid"] for img in images] == [first["grid"], second["grid"]]
        assert [img["sequence"] for img in images] == [0, 0]
        none = await client.post("/decode", json={"tokens": text, "layout": "lumina-like", "extract": True})
        assert none.status_code == 422 and "no image" in none.json()["error"]


@pytest.mark.asyncio
async def test_layouts_listing_info_and_allowed(make_service) -> None:
    layout = preset("lumina-like")
    async with make_service() as (_, client):
        listing = (await client.get("/layouts")).json()
        assert listing["default"] == "flat" and set(listing["layouts"]) == set(PRESETS)
        assert listing["layouts"]["lumina-like"]["eol"] == layout.eol
        assert listing["layouts"]["flat"]["codebook_size"] == K
        info = (await client.get("/info")).json()
        assert info["layout"] == "flat" and set(info["layouts"]) == set(PRESETS)

        async def allowed(prefix: list[int], grid: tuple[int, int] | None = (2, 3)) -> list[int]:
            body = {"prefix": prefix, "grid": list(grid) if grid else None}
            response = await client.post("/layouts/lumina-like/allowed", json=body)
            assert response.status_code == 200, response.text
            return response.json()["allowed"]

        sequence = layout.to_tokens(np.arange(6).reshape(2, 3))
        assert await allowed([]) == [layout.boi]
        assert await allowed(sequence[:1]) == [layout.size_base + 2]
        assert await allowed(sequence[:3]) == sorted(layout.image_ids.tolist())
        assert await allowed(sequence[:6]) == [layout.eol]  # after the first row
        assert await allowed(sequence[:-1]) == [layout.eoi]
        assert await allowed(sequence) == []
        assert await allowed(sequence[:4], grid=None) == sorted(layout.image_ids.tolist())  # grid from the prefix
        bad = await client.post("/layouts/lumina-like/allowed", json={"prefix": [layout.boi, 1], "grid": [2, 3]})
        assert bad.status_code == 422 and "position 1" in bad.json()["error"]
        missing = await client.post("/layouts/nope/allowed", json={"prefix": []})
        assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"


@pytest.mark.asyncio
async def test_layouts_need_the_api_key(make_service) -> None:
    async with make_service(api_key="secret") as (_, client):
        assert (await client.get("/layouts")).status_code == 401
        assert (await client.post("/layouts/flat/allowed", json={"prefix": []})).status_code == 401
        ok = await client.get("/layouts", headers={"authorization": "Bearer secret"})
        assert ok.status_code == 200


def _write(path: Path, spec: dict) -> Path:
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.asyncio
async def test_a_layout_file_loads_and_can_be_the_default(make_service, png, tmp_path: Path) -> None:
    spec = {"name": "mine", "codebook_size": K, "offset": 1000, "boi": 5, "eoi": 6, "eol": 7}
    path = _write(tmp_path / "mine.json", spec)
    async with make_service(layout_files=[path], layout="mine") as (_, client):
        listing = (await client.get("/layouts")).json()
        assert listing["default"] == "mine" and listing["layouts"]["mine"]["offset"] == 1000
        body = await encode(client, png, size="32")  # the server's default layout
        assert body["layout"] == "mine"
        tokens = body["images"][0]["tokens"]
        assert tokens[0] == 5 and tokens[-1] == 6 and tokens.count(7) == 8
        back = await client.post("/decode", json={"tokens": tokens, "layout": "mine"})
        assert back.status_code == 200 and back.headers["x-grid"] == "8,8"
        default = await client.post("/decode", json={"tokens": tokens})  # no layout: the server's default
        assert default.status_code == 200 and default.headers["x-vqtok-layout"] == "mine"


@pytest.mark.parametrize(("files", "extra", "needle"), [
    ([{"name": "bad", "codebook_size": K, "offset": 0, "boi": 3}], [], "collides with image ids"),
    ([{"name": "big", "codebook_size": 512, "offset": 0}], [], "K = 64"),
    ([], ["--layout", "nope"], "'nope' is not loaded"),
    (["{not json"], [], "layout file"),
])
def test_bad_layouts_stop_serve_with_one_line(tiny_checkpoint: Path, tmp_path: Path, capsys, files, extra,
                                              needle) -> None:
    from vqtok.service.__main__ import main

    argv = ["--checkpoint", str(tiny_checkpoint), "--device", "cpu", *extra]
    for i, spec in enumerate(files):
        path = tmp_path / f"layout{i}.json"
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        argv += ["--layout-file", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vqtok serve: ") and needle in err, err


def test_layout_files_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vqtok.service.settings import Settings

    monkeypatch.setenv("VQTOK_LAYOUT_FILES", f"{tmp_path}/a.json,{tmp_path}/b.json")
    assert Settings().layout_files == [tmp_path / "a.json", tmp_path / "b.json"]
    monkeypatch.setenv("VQTOK_LAYOUT_FILES", json.dumps([str(tmp_path / "c.json")]))
    assert Settings().layout_files == [tmp_path / "c.json"]


@pytest.mark.asyncio
async def test_the_python_client_passes_the_layout_options(make_service, png) -> None:
    import httpx

    from vqtok.service.client import AsyncVQTokClient

    async with make_service() as (app, _):
        client = AsyncVQTokClient("http://vqtok.test", transport=httpx.ASGITransport(app=app))
        async with client:
            result = await client.encode([png], size="32", layout="emu3-like")
            assert result["layout"] == "emu3-like"
            tokens = result["images"][0]["tokens"]
            image = await client.decode(tokens=tokens[:-3], layout="emu3-like", repair="lenient", output="numpy")
            assert image.shape == (32, 32, 3)
            assert (await client.layouts())["default"] == "flat"
            assert await client.allowed("emu3-like", tokens[:-1]) == [tokens[-1]]
