"""Token layouts (vqtok.model.layouts): presets, round trips, strict errors, lenient repairs, constrained decoding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqtok.model.layouts import (
    Layout,
    LayoutError,
    ParsedImage,
    VocabularyMap,
    chameleon_like,
    emu3_like,
    flat,
    get_layout,
    hf_prefix_allowed_tokens_fn,
    lumina_like,
)

GRID = np.array([[0, 1, 2], [3, 4, 5]])
MAP = [50, 7, 33, 12, 90, 61, 5, 8]


def small_presets() -> dict[str, Layout]:
    """The four presets with small, readable ids (K = 8), as in their docstrings."""
    return {
        "flat": flat(codebook_size=8, offset=100, bos=1, eos=2),
        "chameleon-like": chameleon_like(vocabulary=MAP, boi=3, eoi=4, grid=(2, 3)),
        "emu3-like": emu3_like(codebook_size=8, offset=100, boi=1, eoi=2, img=3, eol=4, eof=5, max_side=8),
        "lumina-like": lumina_like(codebook_size=8, offset=100, boi=1, eoi=2, eol=3, size_base=10, size_max=8),
    }


WORKED = {
    "flat": [1, 100, 101, 102, 103, 104, 105, 2],
    "chameleon-like": [3, 50, 7, 33, 12, 90, 61, 4],
    "emu3-like": [1, 17, 9, 18, 3, 100, 101, 102, 4, 103, 104, 105, 4, 5, 2],
    "lumina-like": [1, 12, 13, 100, 101, 102, 3, 103, 104, 105, 3, 2],
}


# ------------------------------------------------------------------------------------------ encoding


@pytest.mark.parametrize("name", list(WORKED))
def test_worked_example_2x3(name: str) -> None:
    layout = small_presets()[name]
    assert layout.to_tokens(GRID) == WORKED[name]
    assert layout.name == name


@pytest.mark.parametrize("name", list(WORKED))
def test_round_trip_every_preset(name: str) -> None:
    layout = small_presets()[name]
    grid = None if name != "flat" else (2, 3)  # flat carries no shape
    parsed = layout.parse(WORKED[name], grid=grid)
    assert isinstance(parsed, ParsedImage)
    np.testing.assert_array_equal(parsed.grid, GRID)
    assert parsed.grid.dtype == np.int64
    assert parsed.repairs == []


def test_default_presets_build_and_round_trip() -> None:
    rng = np.random.default_rng(0)
    for name in ("flat", "chameleon-like", "emu3-like", "lumina-like"):
        layout = get_layout(name)
        codes = rng.integers(0, layout.num_codes, size=(4, 6))
        tokens = layout.to_tokens(codes)
        grid = (4, 6) if name in ("flat", "chameleon-like") else None
        np.testing.assert_array_equal(layout.parse(tokens, grid=grid).grid, codes)
    with pytest.raises(LayoutError, match="unknown layout 'nope'"):
        get_layout("nope")


def test_flat_bos_eos_optional_on_decode() -> None:
    layout = small_presets()["flat"]
    for tokens in ([100, 101, 102, 103, 104, 105], [1, 100, 101, 102, 103, 104, 105], WORKED["flat"]):
        np.testing.assert_array_equal(layout.parse(tokens, grid=(2, 3)).grid, GRID)


def test_to_tokens_rejects_bad_grids() -> None:
    layout = small_presets()["flat"]
    with pytest.raises(LayoutError, match=r"grid\[1\]\[2\] = 8 is outside \[0, 8\)"):
        layout.to_tokens([[0, 1, 2], [3, 4, 8]])
    with pytest.raises(LayoutError, match="non-empty"):
        layout.to_tokens(np.zeros(3, dtype=np.int64))
    with pytest.raises(LayoutError, match="no entry in size_table"):
        small_presets()["emu3-like"].to_tokens(np.zeros((9, 9), dtype=np.int64))
    with pytest.raises(LayoutError, match="size_unit"):
        lumina_like(codebook_size=8, offset=100, boi=1, eoi=2, eol=3, size_base=10, size_unit=2,
                    size_max=8).to_tokens(GRID)


# ------------------------------------------------------------------------------------------ strict


@pytest.mark.parametrize(("name", "tokens", "grid", "message"), [
    ("emu3-like", [1, 17, 9, 18, 3, 100, 101, 102, 103, 104, 105, 4, 5, 2], None,
     "position 8: expected end-of-row id 4 after row 0, got 103"),
    ("emu3-like", [1, 17, 9, 18, 3, 100, 999, 102, 4, 103, 104, 105, 4, 5, 2], None,
     r"position 6: expected an image id for row 0, column 1 \(offset 100 \+ codebook_size 8 = \[100, 108\)\), "
     "got 999"),
    ("emu3-like", [*WORKED["emu3-like"], 7], None, "position 15: expected the end of the sequence, got 7"),
    ("lumina-like", [1, 12, 13, 100, 101, 102, 3, 103, 104], None,
     "position 9: expected an image id for row 1, column 2 .*, got the end of the sequence"),
    ("lumina-like", WORKED["lumina-like"], (3, 3), r"position 1: expected the size prefix \[13, 13\] for grid "
     r"3x3 \(the sequence says 2x3\), got 12"),
    ("chameleon-like", [3, 50, 7, 33, 12, 90, 61], None, "position 7: expected end-of-image id 4, got the end"),
    ("chameleon-like", [50, 7, 33, 12, 90, 61, 4], None, "position 0: expected begin-of-image id 3, got 50"),
    ("flat", [1, 100, 101, 102, 103, 104, 2], (2, 3), "position 6: expected an image id for row 1, column 2"),
])
def test_strict_errors_name_the_position(name: str, tokens: list[int], grid: tuple[int, int] | None,
                                         message: str) -> None:
    with pytest.raises(LayoutError, match=message) as caught:
        small_presets()[name].parse(tokens, grid=grid)
    assert isinstance(caught.value, ValueError)


def test_grid_required_only_when_the_sequence_carries_none() -> None:
    with pytest.raises(LayoutError, match=r"carries no grid shape .*pass grid=\(h, w\)"):
        small_presets()["flat"].parse(WORKED["flat"])
    with pytest.raises(LayoutError, match="position 1: expected a size prefix, got 100"):
        small_presets()["lumina-like"].parse([1, 100, 101, 3, 2])
    eol_only = Layout(codebook_size=8, offset=100, eol=3)
    assert eol_only.to_tokens(GRID) == [100, 101, 102, 3, 103, 104, 105, 3]
    np.testing.assert_array_equal(eol_only.parse([100, 101, 102, 3, 103, 104, 105, 3]).grid, GRID)
    with pytest.raises(LayoutError, match="no end-of-row id"):
        eol_only.parse([100, 101, 102])


def test_bad_policy_and_pad() -> None:
    layout = small_presets()["flat"]
    with pytest.raises(LayoutError, match="repair must be"):
        layout.parse(WORKED["flat"], grid=(2, 3), repair="fix")  # type: ignore[arg-type]
    with pytest.raises(LayoutError, match="pad must be"):
        layout.parse(WORKED["flat"], grid=(2, 3), repair="lenient", pad=8)


# ------------------------------------------------------------------------------------------ lenient


def lenient(name: str, tokens: list[int], grid: tuple[int, int] | None = None, pad: int | str = "repeat_last_row"):
    return small_presets()[name].parse(tokens, grid=grid, repair="lenient", pad=pad)  # type: ignore[arg-type]


def kinds(parsed: ParsedImage) -> list[tuple[int, str]]:
    return [(r.position, r.kind) for r in parsed.repairs]


def test_lenient_missing_end_of_row() -> None:
    parsed = lenient("emu3-like", [1, 17, 9, 18, 3, 100, 101, 102, 103, 104, 105, 4, 5, 2])
    np.testing.assert_array_equal(parsed.grid, GRID)
    assert kinds(parsed) == [(8, "missing")]
    assert "end-of-row" in parsed.repairs[0].detail


def test_lenient_short_row_pads_with_a_code_or_the_row_above() -> None:
    tokens = [1, 12, 13, 100, 101, 102, 3, 103, 3, 2]  # row 1 has one cell
    parsed = lenient("lumina-like", tokens, pad="repeat_last_row")
    np.testing.assert_array_equal(parsed.grid, [[0, 1, 2], [3, 1, 2]])
    assert kinds(parsed) == [(8, "short_row")]
    assert parsed.repairs[0].filled == 2
    np.testing.assert_array_equal(lenient("lumina-like", tokens, pad=7).grid, [[0, 1, 2], [3, 7, 7]])


def test_lenient_cut_short() -> None:
    parsed = lenient("chameleon-like", [3, 50, 7, 33, 12])
    np.testing.assert_array_equal(parsed.grid, [[0, 1, 2], [3, 1, 2]])
    assert kinds(parsed) == [(5, "cut_short"), (5, "missing")]
    parsed = lenient("flat", [1, 100, 101], grid=(2, 3), pad=6)
    np.testing.assert_array_equal(parsed.grid, [[0, 1, 6], [6, 6, 6]])
    assert kinds(parsed) == [(3, "cut_short")]


def test_lenient_long_row_extra_tokens_replaced_unexpected_and_size() -> None:
    long_row = [1, 12, 13, 100, 101, 102, 107, 3, 103, 104, 105, 3, 2]
    parsed = lenient("lumina-like", long_row)
    np.testing.assert_array_equal(parsed.grid, GRID)
    assert kinds(parsed) == [(6, "long_row")]

    parsed = lenient("lumina-like", [*WORKED["lumina-like"], 42, 43])
    assert kinds(parsed) == [(12, "extra")]
    assert parsed.repairs[0].dropped == 2

    parsed = lenient("emu3-like", [1, 17, 9, 18, 3, 100, 999, 102, 4, 103, 104, 105, 4, 5, 2], pad=7)
    np.testing.assert_array_equal(parsed.grid, [[0, 7, 2], [3, 4, 5]])
    assert kinds(parsed) == [(6, "replaced")]

    parsed = lenient("chameleon-like", [3, 50, 7, 33, 12, 90, 61, 999, 4])
    np.testing.assert_array_equal(parsed.grid, GRID)
    assert kinds(parsed) == [(7, "unexpected")]

    parsed = lenient("lumina-like", WORKED["lumina-like"], grid=(2, 2))
    assert kinds(parsed) == [(1, "size"), (5, "long_row"), (9, "long_row")]
    np.testing.assert_array_equal(parsed.grid, [[0, 1], [3, 4]])


def test_every_repair_is_accounted_for() -> None:
    layout = small_presets()["emu3-like"]
    tokens = [1, 17, 9, 18, 100, 101, 999, 102, 103, 4, 104, 77]
    parsed = layout.parse(tokens, grid=(2, 3), repair="lenient")
    assert parsed.grid.shape == (2, 3)
    assert len(tokens) == parsed.consumed + sum(r.dropped for r in parsed.repairs)
    assert len(layout.to_tokens(GRID)) == parsed.consumed + sum(r.filled for r in parsed.repairs) + parsed.omitted


# ------------------------------------------------------------------------------------------ extraction


def test_extract_images_with_text_around_two_images() -> None:
    layout = small_presets()["emu3-like"]
    other = np.array([[7, 6, 5], [4, 3, 2]])
    first, second = layout.to_tokens(GRID), layout.to_tokens(other)
    tokens = [500, 501, *first, 502, *second, 503, 504]
    found = layout.extract_images(tokens)
    assert [(s, e) for s, e, _ in found] == [(2, 2 + len(first)), (3 + len(first), 3 + len(first) + len(second))]
    np.testing.assert_array_equal(found[0][2].grid, GRID)
    np.testing.assert_array_equal(found[1][2].grid, other)
    assert layout.extract_images([500, 501]) == []


def test_extract_images_positions_are_absolute() -> None:
    layout = small_presets()["lumina-like"]
    broken = [1, 12, 13, 100, 101, 102, 103, 104, 105, 3, 2]  # row 0 lost its end-of-row
    tokens = [500, *broken, 501, 1, 12, 13, 100]  # the second image is cut off
    with pytest.raises(LayoutError, match="position 7: expected end-of-row id 3 after row 0, got 103"):
        layout.extract_images(tokens)
    found = layout.extract_images(tokens, repair="lenient")
    assert [(s, e) for s, e, _ in found] == [(1, 12), (13, 17)]
    assert kinds(found[0][2]) == [(7, "missing")]
    np.testing.assert_array_equal(found[0][2].grid, GRID)
    assert [r.kind for r in found[1][2].repairs] == ["cut_short", "missing"]
    assert found[1][2].repairs[0].position == 17
    with pytest.raises(LayoutError, match="position 13: image has no end-of-image id 2 before the end"):
        layout.extract_images([*WORKED["lumina-like"], 501, 1, 12, 13, 100])
    with pytest.raises(LayoutError, match="no boi/eoi"):
        small_presets()["flat"].extract_images(tokens)


# ------------------------------------------------------------------------------------------ constrained generation


@pytest.mark.parametrize("name", list(WORKED))
def test_allowed_next_at_every_position(name: str) -> None:
    layout = small_presets()[name]
    tokens = WORKED[name]
    image = set(layout.image_ids.tolist())
    for k in range(len(tokens) + 1):
        allowed = set(layout.allowed_next(tokens[:k], grid=(2, 3)).tolist())
        if k == len(tokens):
            assert allowed == set()
        elif layout.is_image(tokens[k]):
            assert allowed == image
        else:
            assert allowed == {tokens[k]}
        mask = layout.logits_mask(tokens[:k], vocab_size=200, grid=(2, 3))
        assert mask.dtype == bool and mask.shape == (200,)
        assert set(np.flatnonzero(mask).tolist()) == allowed


def test_end_of_row_forced_after_each_row_and_eoi_after_the_last() -> None:
    layout = small_presets()["lumina-like"]
    tokens = WORKED["lumina-like"]
    assert layout.allowed_next(tokens[:6]).tolist() == [3]  # after row 0
    assert layout.allowed_next(tokens[:10]).tolist() == [3]  # after row 1, the last
    assert layout.allowed_next(tokens[:11]).tolist() == [2]  # eoi
    with pytest.raises(LayoutError, match="position 6: expected id 3, got 103"):
        layout.allowed_next([*tokens[:6], 103])
    with pytest.raises(LayoutError, match="pass the target grid"):
        layout.allowed_next([1])  # no size yet
    with pytest.raises(LayoutError, match="outside the vocabulary of size 50"):
        layout.logits_mask(tokens[:3], vocab_size=50)


def test_hf_prefix_allowed_tokens_fn_matches_allowed_next() -> None:
    layout = small_presets()["emu3-like"]
    tokens = WORKED["emu3-like"]
    primed = layout.template((2, 3)).index(-1)  # the prompt ends with boi "2*3" img
    prompt = [500, 501, *tokens[:primed]]
    fn = hf_prefix_allowed_tokens_fn(layout, (2, 3), prompt_length=len(prompt), primed=primed)
    for k in range(primed, len(tokens)):
        row = prompt + tokens[primed:k]
        expected = layout.allowed_next(tokens[:k]).tolist()
        assert fn(0, row) == expected
        assert fn(1, np.asarray(row)) == expected  # anything with .tolist(), like a torch tensor
    assert fn(0, prompt + tokens[primed:]) == [2]  # complete: eoi again by default (no eos)
    fn = hf_prefix_allowed_tokens_fn(layout, (2, 3), prompt_length=len(prompt), primed=primed, after_end=[0])
    assert fn(0, prompt + tokens[primed:]) == [0]


# ------------------------------------------------------------------------------------------ property tests


@st.composite
def layouts_and_grids(draw: st.DrawFn) -> tuple[Layout, np.ndarray]:
    k = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["flat", "chameleon", "emu3", "lumina", "eol"]))
    specials = draw(st.permutations(list(range(1, 10))))
    opt = draw(st.lists(st.booleans(), min_size=7, max_size=7))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if kind == "flat":
        layout = flat(codebook_size=k, offset=100, bos=specials[0] if opt[0] else None,
                      eos=specials[1] if opt[1] else None)
    elif kind == "chameleon":
        ids = draw(st.lists(st.integers(100, 400), min_size=k, max_size=k, unique=True))
        layout = chameleon_like(vocabulary=ids, boi=specials[0], eoi=specials[1], grid=(h, w))
    elif kind == "emu3":
        layout = emu3_like(codebook_size=k, offset=100, boi=specials[0], eoi=specials[1], img=specials[2],
                           eol=specials[3], eof=specials[4], max_side=5, digit_ids=range(60, 70), times_id=70)
    elif kind == "lumina":
        unit = draw(st.integers(1, 2))
        h, w = h * unit, w * unit
        layout = lumina_like(codebook_size=k, offset=100, boi=specials[0], eoi=specials[1], eol=specials[2],
                             size_base=20, size_unit=unit, size_max=10)
    else:
        names = ["bos", "eos", "boi", "eoi", "eof", "img"]
        chosen = {n: specials[i] for i, n in enumerate(names) if opt[i]}
        layout = Layout(codebook_size=k, offset=100, eol=specials[6], **chosen)
    codes = draw(st.lists(st.integers(0, k - 1), min_size=h * w, max_size=h * w))
    return layout, np.asarray(codes, dtype=np.int64).reshape(h, w)


FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(layouts_and_grids())
def test_property_round_trip(case: tuple[Layout, np.ndarray]) -> None:
    layout, codes = case
    tokens = layout.to_tokens(codes)
    carried = layout.size_base is not None or layout.size_table is not None or layout.eol is not None
    grid = None if carried or layout.grid is not None else codes.shape
    parsed = layout.parse(tokens, grid=grid)
    np.testing.assert_array_equal(parsed.grid, codes)
    assert parsed.repairs == []
    again = Layout.from_json(layout.model_dump_json())
    assert again.to_tokens(codes) == tokens


EDITS = st.lists(st.tuples(st.sampled_from(["delete", "insert", "truncate", "append"]), st.integers(0, 10_000),
                           st.sampled_from([0, 1, 3, 5, 9, 22, 65, 500, 101])), min_size=1, max_size=4)


@FAST
@given(layouts_and_grids(), EDITS)
def test_property_lenient_repair_accounts_for_every_change(case: tuple[Layout, np.ndarray],
                                                            edits: list[tuple[str, int, int]]) -> None:
    layout, codes = case
    tokens = layout.to_tokens(codes)
    corrupted = list(tokens)
    for op, where, token in edits:
        at = where % (len(corrupted) + 1)
        if op == "delete" and corrupted:
            del corrupted[min(at, len(corrupted) - 1)]
        elif op == "insert":
            corrupted.insert(at, token)
        elif op == "truncate":
            corrupted = corrupted[:at]
        else:
            corrupted.append(token)
    parsed = layout.parse(corrupted, grid=codes.shape, repair="lenient", pad=0)
    assert parsed.grid.shape == codes.shape
    assert ((parsed.grid >= 0) & (parsed.grid < layout.num_codes)).all()
    assert len(corrupted) == parsed.consumed + sum(r.dropped for r in parsed.repairs)
    assert len(tokens) == parsed.consumed + sum(r.filled for r in parsed.repairs) + parsed.omitted
    if corrupted == tokens:
        assert parsed.repairs == []
        np.testing.assert_array_equal(parsed.grid, codes)
    # strict fails exactly when lenient had to repair, and agrees with it otherwise
    try:
        strict = layout.parse(corrupted, grid=codes.shape)
    except LayoutError:
        assert parsed.repairs
    else:
        assert parsed.repairs == []
        np.testing.assert_array_equal(strict.grid, parsed.grid)


# ------------------------------------------------------------------------------------------ layout files


def write(tmp_path: Path, spec: object, name: str = "layout.json") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


def test_layout_file_with_map_from_json_object_and_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "map.npy", np.asarray(MAP, dtype=np.int64))
    layout = Layout.from_file(write(tmp_path, {"name": "mine", "vocabulary": "map.npy", "boi": 3, "eoi": 4,
                                               "grid": [2, 3]}))
    assert layout.to_tokens(GRID) == WORKED["chameleon-like"]
    as_object = {str(code): token for code, token in reversed(list(enumerate(MAP)))}
    write(tmp_path, as_object, "map.json")
    assert VocabularyMap.load(tmp_path / "map.json").root == MAP
    layout = Layout.from_file(write(tmp_path, {"vocabulary": "map.json", "codebook_size": 8}))
    assert layout.code_of(61) == 5
    with pytest.raises(LayoutError, match="not an image id"):
        layout.code_of(62)


@pytest.mark.parametrize(("spec", "message"), [
    ("{not json", "(?s)layout file .*layout.json: .*Invalid JSON"),
    ({"vocabulary": [5, 6, 5]}, "vocabulary\n.*duplicate id 5 \\(codes 0 and 2\\)"),
    ({"vocabulary": [5, 6, 7], "codebook_size": 4}, "vocabulary has 3 entries but codebook_size is 4"),
    ({"vocabulary": {"0": 5, "2": 6}}, "code 1 is missing"),
    ({"offset": 10}, "codebook_size is required"),
    ({"codebook_size": 8, "offset": 0, "vocabulary": [1]}, "offset and vocabulary"),
    ({"codebook_size": 8, "offset": 100, "eol": 103}, r"eol \(103\) collides with image ids"),
    ({"codebook_size": 8, "boi": 1, "eoi": 1, "offset": 100}, r"eoi \(1\) collides with boi \(1\)"),
    ({"codebook_size": 8, "offset": 100, "size_base": 90}, r"size_base: size ids \[90, 346\] collide with image"),
    ({"codebook_size": 8, "offset": 100, "size_base": 0, "size_max": 5, "eol": 3}, "size_base: .*collide with eol"),
    ({"codebook_size": 8, "offset": 100, "size_table": {"2x3": [101]}}, r"size_table\['2x3'\]: id 101 collides"),
    ({"codebook_size": 8, "offset": 100, "size_table": {"2x3": [7], "3x2": [7]}}, "have the same ids"),
    ({"codebook_size": 8, "offset": 100, "size_table": {"big": [7]}}, "not a grid like"),
    ({"codebook_size": 8, "colour": 1}, "colour\n.*Extra inputs are not permitted"),
    ({"vocabulary": "missing.npy"}, "vocabulary map .*missing.npy"),
])
def test_bad_layout_files_are_clear_errors(tmp_path: Path, spec: object, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        Layout.from_file(write(tmp_path, spec))


def test_model_copy_validates_and_refreshes_caches() -> None:
    layout = small_presets()["flat"]
    assert layout.is_image(100)
    moved = layout.model_copy(update={"offset": 200})
    assert moved.to_tokens(GRID)[1:-1] == [200, 201, 202, 203, 204, 205]
    assert not moved.is_image(100)
    with pytest.raises(ValueError, match="collides with image ids"):
        layout.model_copy(update={"bos": 101})


def test_presets_reject_colliding_overrides() -> None:
    with pytest.raises(ValueError, match=r"eol \(100\) collides with image ids"):
        emu3_like(codebook_size=8, offset=100, eol=100)


def test_import_loads_neither_torch_nor_fastapi() -> None:
    code = ("import sys, vqtok.model.layouts; "
            "print(sorted(m for m in ('torch', 'fastapi', 'starlette', 'vqtok.service') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
