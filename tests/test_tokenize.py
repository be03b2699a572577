"""``vqtok tokenize``: shards, formats, inputs, failures, resume, torchrun-style ranks, bad arguments."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqtok.tokenize import StopAfterShards, TokenizeConfig, main, run


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray, coffee: np.ndarray) -> Path:
    root = tmp_path_factory.mktemp("images")
    crops = [astronaut[:40, :40], astronaut[100:150, 200:260], coffee[:48, :32], coffee[200:236, 300:340],
             astronaut[300:364, 100:164], coffee[50:90, 50:90], astronaut[10:42, 400:470]]
    for i, pixels in enumerate(crops):
        _save(root / ("sub" if i % 2 else "") / f"img{i}.png", np.ascontiguousarray(pixels))
    return root


def _config(checkpoint: Path, input: str, out: Path, **overrides: object) -> TokenizeConfig:
    values: dict[str, object] = {"checkpoint": str(checkpoint), "input": input, "out": out, "size": "32",
                                 "fit": "crop", "batch_size": 3, "shard_size": 3, "device": "cpu"}
    values.update(overrides)
    return TokenizeConfig(**values)  # type: ignore[arg-type]


def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _read_wds(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    samples = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive}  # type: ignore[union-attr]
        for name in members:
            if name.endswith(".npy"):
                key = name[: -len(".npy")]
                meta = json.loads(members[f"{key}.json"])
                samples[meta["key"]] = (np.load(io.BytesIO(members[name])), meta)
    return samples


def test_folder_to_wds_matches_encode(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    from vqtok.tokenizer import Tokenizer

    manifest = run(_config(tiny_checkpoint, str(folder), tmp_path, layout="flat"), progress=False)
    assert manifest["complete"] and manifest["counts"] == {"shards_done": 3, "done": 7, "failed": 0, "skipped": 0}
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [f"shard-0000{i}.tar" for i in range(3)]
    samples = _read_wds(tmp_path)
    assert len(samples) == 7
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint, device="cpu")
    for key, (grid, meta) in samples.items():
        assert grid.dtype == np.uint16 and grid.shape == (8, 8)
        expected = tokenizer.encode(str(folder / key), size="32", fit="crop")
        np.testing.assert_array_equal(grid, expected)
        assert meta["grid"] == [8, 8] and meta["model_id"] == tokenizer.model_id
        assert meta["tokens"] == tokenizer.layout("flat").to_tokens(expected)
        height, width = Image.open(folder / key).size[::-1]
        assert meta["original_size"] == [height, width]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == manifest and on_disk["num_shards"] == 3 and on_disk["format_version"] == 2
    assert on_disk["model"]["model_id"] == tokenizer.model_id
    assert on_disk["model"]["weights_sha256"] == tokenizer.engine.checkpoint.weights_sha256
    assert on_disk["options"]["size"] == "32" and on_disk["run"]["batch_size"] == 3
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [line["shard"] for line in lines] == [0, 1, 2] and [line["samples"] for line in lines] == [3, 3, 1]
    for line in lines:
        (entry,) = line["files"]
        data = (tmp_path / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert not (tmp_path / "manifest.json").exists()


def test_npy_format_offsets_keys(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    run(_config(tiny_checkpoint, str(folder), tmp_path / "wds"), progress=False)
    run(_config(tiny_checkpoint, str(folder), tmp_path / "npy", format="npy"), progress=False)
    wds = _read_wds(tmp_path / "wds")
    seen = 0
    for shard in range(3):
        tokens = np.load(tmp_path / "npy" / f"shard-{shard:05d}.tokens.npy")
        offsets = np.load(tmp_path / "npy" / f"shard-{shard:05d}.offsets.npy")
        keys = json.loads((tmp_path / "npy" / f"shard-{shard:05d}.keys.json").read_text())
        assert tokens.dtype == np.uint16 and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert len(offsets) == len(keys) + 1
        for i, record in enumerate(keys):
            grid = tokens[offsets[i]:offsets[i + 1]].reshape(record["grid"])
            np.testing.assert_array_equal(grid, wds[record["key"]][0])
            seen += 1
    assert seen == 7


def test_jsonl_metadata_and_failures(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [{"path": str(folder / "img0.png"), "caption": "a face", "id": 7},
             {"path": "broken.png", "caption": "bad"},
             {"image": str(folder / "sub" / "img1.png"), "tags": ["x"]},
             {"path": "missing.png"}]
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = run(_config(tiny_checkpoint, str(listing), tmp_path / "out"), progress=False)
    assert manifest["counts"]["done"] == 2 and manifest["counts"]["failed"] == 2
    assert [f["key"] for f in manifest["failures"]] == ["broken.png", "missing.png"]
    assert all(f["reason"] for f in manifest["failures"])
    samples = _read_wds(tmp_path / "out")
    assert samples[str(folder / "img0.png")][1]["metadata"] == {"caption": "a face", "id": 7}
    assert samples[str(folder / "sub" / "img1.png")][1]["metadata"] == {"tags": ["x"]}


def test_folder_unreadable_file_is_a_failure(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "images"
    shutil.copytree(folder, root)
    (root / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    manifest = run(_config(tiny_checkpoint, str(root), tmp_path / "out"), progress=False)
    assert manifest["counts"] == {"shards_done": 3, "done": 7, "failed": 0, "skipped": 1}
    (failure,) = manifest["failures"]
    assert failure["key"].endswith("corrupt.png") and "unreadable" in failure["reason"]


def test_tar_input(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    shard = tmp_path / "in.tar"
    with tarfile.open(shard, "w") as archive:
        for i, path in enumerate(sorted(folder.rglob("*.png"))[:3]):
            archive.add(path, f"{i:06d}.png")
            data = json.dumps({"n": i}).encode()
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    manifest = run(_config(tiny_checkpoint, str(shard), tmp_path / "out", format="npy"), progress=False)
    assert manifest["counts"]["done"] == 3
    keys = json.loads((tmp_path / "out" / "shard-00000.keys.json").read_text())
    assert [(k["key"], k["metadata"]) for k in keys] == [(f"{i:06d}", {"n": i}) for i in range(3)]


def test_killed_run_resumes_to_identical_output(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    run(_config(tiny_checkpoint, str(folder), tmp_path / "whole"), progress=False)
    resumed = tmp_path / "resumed"
    with pytest.raises(StopAfterShards):
        run(_config(tiny_checkpoint, str(folder), resumed), stop_after_shards=1, progress=False)
    assert (resumed / "shard-00000.tar").exists() and not (resumed / "shard-00001.tar").exists()
    first = (resumed / "shard-00000.tar").stat().st_mtime_ns
    (resumed / ".shard-00001.tar.tmp-999").write_bytes(b"partial")  # a write cut short by the kill
    run(_config(tiny_checkpoint, str(folder), resumed), progress=False)
    assert (resumed / "shard-00000.tar").stat().st_mtime_ns == first  # skipped, not redone
    assert not (resumed / ".shard-00001.tar.tmp-999").exists()  # the resume removed the leftover
    assert _tree(resumed) == _tree(tmp_path / "whole")
    with pytest.raises(ValueError, match="other options"):
        run(_config(tiny_checkpoint, str(folder), resumed, size="64"), progress=False)


def test_two_ranks_disjoint_shards_and_merged_manifest(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    args = ["--checkpoint", str(tiny_checkpoint), "--input", str(folder), "--out", str(out), "--size", "32",
            "--fit", "crop", "--batch-size", "3", "--shard-size", "2", "--device", "cpu"]
    procs = [subprocess.Popen([sys.executable, "-m", "vqtok.tokenize", *args], stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    parts = [[json.loads(line)["shard"] for line in (out / f"manifest.rank-{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert parts == [[0, 2], [1, 3]]
    merged = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert merged["complete"] and [line["shard"] for line in lines] == [0, 1, 2, 3]
    assert merged["counts"]["done"] == 7
    single = tmp_path / "single"
    run(_config(tiny_checkpoint, str(folder), single, shard_size=2), progress=False)
    for shard in range(4):
        name = f"shard-{shard:05d}.tar"
        assert (out / name).read_bytes() == (single / name).read_bytes()


@pytest.mark.parametrize("case", ["checkpoint", "format", "empty", "missing_input"])
def test_bad_inputs_exit_2(tiny_checkpoint: Path, tmp_path: Path, case: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "list.txt").write_text("")
    args = {"checkpoint": str(tiny_checkpoint), "input": str(tmp_path / "list.txt"), "out": str(tmp_path / "out")}
    extra: list[str] = []
    if case == "checkpoint":
        args["checkpoint"] = str(tmp_path / "nope")
    elif case == "format":
        extra = ["--format", "xml"]
    elif case == "missing_input":
        args["input"] = str(tmp_path / "no-such-folder")
    argv = [x for name, value in args.items() for x in (f"--{name}", value)] + extra
    if case == "format":
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2
        assert "invalid choice: 'xml'" in capsys.readouterr().err
        return
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vqtok tokenize: error:"), err
    expected = {"checkpoint": "does not exist (or is not a directory); bundled ones: default",
                "empty": "holds no image", "missing_input": "no-such-folder"}[case]
    assert expected in err


def test_parquet_output_matches_wds(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    run(_config(tiny_checkpoint, str(folder), tmp_path / "wds"), progress=False)
    manifest = run(_config(tiny_checkpoint, str(folder), tmp_path / "pq", format="parquet"), progress=False)
    assert sorted(p.name for p in (tmp_path / "pq").glob("shard-*")) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert not list((tmp_path / "pq").glob(".*tmp*"))  # written atomically: no temp file left
    first = json.loads((tmp_path / "pq" / "manifest.jsonl").read_text().splitlines()[0])
    assert [f["file"] for f in first["files"]] == ["shard-00000.parquet"]
    wds = _read_wds(tmp_path / "wds")
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "pq").glob("shard-*.parquet"))])
    assert table.schema.field("tokens").type == pa.list_(pa.uint16())
    assert table.schema.field("grid").type == pa.list_(pa.int32(), 2)
    assert table.schema.field("index").type == pa.int64() and table.schema.field("key").type == pa.string()
    assert json.loads(table.schema.metadata[b"vqtok.model"])["model_id"] == manifest["model"]["model_id"]
    rows = table.to_pylist()
    assert len(rows) == 7 and [r["index"] for r in rows] == list(range(7))
    for row in rows:
        grid, meta = wds[row["key"]]
        np.testing.assert_array_equal(np.asarray(row["tokens"], dtype=np.uint16).reshape(row["grid"]), grid)
        assert row["original_size"] == meta["original_size"] and json.loads(row["metadata"]) == meta["metadata"]
    laid = run(_config(tiny_checkpoint, str(folder), tmp_path / "layout", format="parquet", layout="flat"),
               progress=False)
    assert laid["counts"]["done"] == 7
    table = pq.read_table(tmp_path / "layout" / "shard-00000.parquet")
    assert table.schema.field("tokens").type == pa.list_(pa.int64())


def test_parquet_input_carries_columns(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    paths = sorted(folder.rglob("*.png"))[:4]
    table = pa.table({"id": list(range(4)), "caption": [f"caption {i}" for i in range(4)],
                      "jpg": [p.read_bytes() for p in paths[:3]] + [b"not an image"]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=3)
    wds = _read_wds(_run_folder(tiny_checkpoint, folder, tmp_path / "reference"))
    manifest = run(_config(tiny_checkpoint, str(tmp_path / "rows.parquet"), tmp_path / "out", format="parquet"),
                   progress=False)
    assert manifest["counts"] == {"shards_done": 2, "done": 3, "failed": 1, "skipped": 0}
    assert [f["key"] for f in manifest["failures"]] == ["rows/3"]
    out = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))]).to_pylist()
    assert [r["key"] for r in out] == ["rows/0", "rows/1", "rows/2"]
    for i, row in enumerate(out):
        assert json.loads(row["metadata"]) == {"id": i, "caption": f"caption {i}"}
        expected = wds[paths[i].relative_to(folder).as_posix()][0]
        np.testing.assert_array_equal(np.asarray(row["tokens"]).reshape(row["grid"]), expected)
    again = run(_config(tiny_checkpoint, f"parquet:{tmp_path}#jpg", tmp_path / "again"), progress=False)
    assert again["counts"]["done"] == 3


def _run_folder(checkpoint: Path, folder: Path, out: Path) -> Path:
    run(_config(checkpoint, str(folder), out), progress=False)
    return out


def test_parquet_without_pyarrow_is_one_clear_line(tiny_checkpoint: Path, folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    base = ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    for extra in (["--input", str(folder), "--format", "parquet"], ["--input", str(tmp_path / "rows.parquet")]):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'vqtok[tokenize]'" in err, err


def test_exit_status_failures_max_failures_and_overwrite(tiny_checkpoint: Path, folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """0 when every image made it, 3 when some failed (listed), 4 when --max-failures stopped the run early;
    a rerun with other options is refused unless --overwrite."""
    from vqtok.tokenize import main

    good = sorted(str(p) for p in folder.rglob("*.png"))[:2]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([good[0], str(tmp_path / "missing-1.png"), good[1], str(tmp_path / "missing-2.png")]))
    common = ["--checkpoint", str(tiny_checkpoint), "--size", "32", "--fit", "crop", "--device", "cpu",
              "--shard-size", "1", "--batch-size", "2"]
    assert main([*common, "--input", good[0], "--out", str(tmp_path / "ok")]) == 2  # a file is no data spec
    clean = tmp_path / "clean.txt"
    clean.write_text("\n".join(good))
    assert main([*common, "--input", str(clean), "--out", str(tmp_path / "clean")]) == 0
    assert main([*common, "--input", str(listing), "--out", str(tmp_path / "some")]) == 3
    some = json.loads((tmp_path / "some" / "summary.json").read_text())
    assert some["complete"] and [f["index"] for f in some["failures"]] == [1, 3]
    capsys.readouterr()
    assert main([*common, "--input", str(listing), "--out", str(tmp_path / "stop"), "--max-failures", "0"]) == 4
    assert "more than --max-failures 0; stopped after shard 1" in capsys.readouterr().err
    stopped = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert not stopped["complete"] and stopped["counts"]["shards_done"] == 2  # shards 0 and 1, then the stop
    assert main([*common, "--input", str(clean), "--out", str(tmp_path / "clean"), "--size", "64"]) == 2
    assert "--overwrite to replace it" in capsys.readouterr().err
    assert main([*common, "--input", str(clean), "--out", str(tmp_path / "clean"), "--size", "64",
                 "--overwrite"]) == 0
    replaced = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert replaced["options"]["size"] == "64" and replaced["counts"]["done"] == 2


@pytest.mark.parametrize("fmt", ["wds", "npy", "parquet"])
def test_verify_passes_a_good_output_and_catches_a_tampered_shard(tiny_checkpoint: Path, folder: Path,
                                                                 tmp_path: Path, fmt: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from vqtok.tokenize import main

    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / "out"
    run(_config(tiny_checkpoint, str(folder), out, format=fmt, layout="flat" if fmt == "npy" else None),
        progress=False)
    assert main(["--verify", str(out), "--samples", "7"]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    first = sorted(out.glob("shard-00001*"))[0]
    data = bytearray(first.read_bytes())
    data[-20] ^= 0xFF  # one flipped byte
    first.write_bytes(bytes(data))
    assert main(["--verify", str(out)]) == 5
    assert f"shard 1: {first.name} is missing or differs from the manifest" in capsys.readouterr().err
    assert main(["--verify", str(tmp_path / "nowhere")]) == 2


def test_a_killed_process_resumes_to_identical_output(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    """A real `python -m vqtok.tokenize` killed (SIGKILL) after a few shards, rerun with the same command:
    the output folder ends byte-identical to an uninterrupted run's."""
    import time

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "vqtok.tokenize", "--checkpoint", str(tiny_checkpoint), "--input", str(folder),
                "--out", str(out), "--size", "32", "--fit", "crop", "--device", "cpu", "--shard-size", "1",
                "--batch-size", "1"]

    listing = tmp_path / "many.txt"  # 56 items, one shard each: plenty left to do at the kill
    listing.write_text("\n".join(sorted(str(p) for p in folder.rglob("*.png")) * 8))
    folder = listing
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "shard-00002.tar").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    assert process.wait(timeout=60) == -9  # killed mid-run, not finished
    assert not json.loads((killed / "summary.json").read_text())["complete"]
    subprocess.run(command(killed), env=env, check=True, capture_output=True, timeout=300)
    assert _tree(killed) == _tree(tmp_path / "whole")


def _read_tokens(out: Path, fmt: str) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Every stored sample of an output folder in any format: key -> ((h, w) grid, original [H, W])."""
    if fmt == "wds":
        return {key: (grid, meta["original_size"]) for key, (grid, meta) in _read_wds(out).items()}
    found = {}
    if fmt == "npy":
        for keys_file in sorted(out.glob("shard-*.keys.json")):
            stem = keys_file.name[: -len(".keys.json")]
            tokens, offsets = np.load(out / f"{stem}.tokens.npy"), np.load(out / f"{stem}.offsets.npy")
            for i, entry in enumerate(json.loads(keys_file.read_text())):
                found[entry["key"]] = (tokens[offsets[i]:offsets[i + 1]].reshape(entry["grid"]), entry["original_size"])
        return found
    pq = pytest.importorskip("pyarrow.parquet")
    for shard in sorted(out.glob("shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            found[row["key"]] = (np.asarray(row["tokens"]).reshape(row["grid"]), row["original_size"])
    return found


@pytest.mark.parametrize("fmt", ["wds", "npy"])
def test_workers_give_byte_identical_output(tiny_checkpoint: Path, folder: Path, tmp_path: Path, fmt: str) -> None:
    """Decoding in 2 DataLoader worker processes writes the same bytes, in the same order, as decoding in the
    main process (failures included); only the summary's record of the worker count differs."""
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([paths[0], "broken.png", *paths[1:], "missing.png", *paths[:3]]))
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        summary = run(_config(tiny_checkpoint, str(listing), out, format=fmt, shard_size=4, workers=workers),
                      progress=False)
        assert summary["counts"] == {"shards_done": 3, "done": 10, "failed": 2, "skipped": 0}
        assert summary["run"]["workers"] == workers
        outputs[workers] = _tree(out)
    summaries = [json.loads(outputs[w].pop("summary.json")) for w in (0, 2)]
    assert outputs[0] == outputs[2]
    for summary in summaries:
        summary["run"].pop("workers")
    assert summaries[0] == summaries[1]
    assert [f["key"] for f in summaries[0]["failures"]] == ["broken.png", "missing.png"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data (a decompression bomb's
    header): it must be refused from the header, never decoded."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    """A file list of odd images: what each becomes is checked by the test using it."""
    root = tmp_path_factory.mktemp("odd")
    rgb = np.ascontiguousarray(astronaut[100:148, 180:228])  # 48 x 48

    def save(name: str, image: Image.Image, **options: object) -> None:
        image.save(root / name, **options)

    save("gray16.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))  # mode I;16
    assert Image.open(root / "gray16.png").mode.startswith("I")
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 48, dtype=np.uint8), (48, 1))])
    save("rgba.png", Image.fromarray(rgba))
    save("palette.png", Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32))
    save("gray.png", Image.fromarray(rgb).convert("L"))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 48 wide x 32 high, shown 32 wide x 48 high
    save("rotated.jpg", Image.fromarray(np.ascontiguousarray(rgb[:32])), exif=exif, quality=95)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    (root / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))  # 10^10 pixels: Pillow's own guard
    (root / "bomb-small.png").write_bytes(_png_claiming(8_000, 8_000))  # 64M pixels: over --max-pixels
    (root / "notes.txt").write_text("not an image")
    names = ["gray16.png", "rgba.png", "palette.png", "gray.png", "cmyk.jpg", "rotated.jpg", "truncated.png",
             "truncated.jpg", "bomb.png", "bomb-small.png", "notes.txt"]
    (root / "list.txt").write_text("\n".join(names))
    return root


GOOD_ODD = {"gray16.png": [48, 48], "rgba.png": [48, 48], "palette.png": [48, 48], "gray.png": [48, 48],
            "cmyk.jpg": [48, 48], "rotated.jpg": [48, 32]}
BAD_ODD = {"truncated.png": "truncated or corrupt PNG", "truncated.jpg": "truncated or corrupt JPEG",
           "bomb.png": "over the pixel limit", "bomb-small.png": "is over the limit of 40000000",
           "notes.txt": "not an image in a supported format"}


@pytest.mark.parametrize("fmt", ["wds", "npy", "parquet"])
def test_odd_images_through_every_format(tiny_checkpoint: Path, odd_images: Path, tmp_path: Path, fmt: str) -> None:
    """16-bit, RGBA, palette, grey, CMYK and EXIF-rotated images are tokenized as /encode would (the service's
    preprocessing: same grids); truncated files, bombs (a header claiming 10^10 or 6.4e7 pixels) and a non-image
    are failures with a clear reason, in every output format, with no crash and no large allocation."""
    import resource

    from vqtok.tokenizer import Tokenizer

    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = run(_config(tiny_checkpoint, str(odd_images / "list.txt"), tmp_path, format=fmt, shard_size=4,
                          workers=1 if fmt == "npy" else 0), progress=False)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing bomb-sized
    assert summary["counts"] == {"shards_done": 3, "done": len(GOOD_ODD), "failed": len(BAD_ODD), "skipped": 0}
    reasons = {f["key"]: f["reason"] for f in summary["failures"]}
    assert set(reasons) == set(BAD_ODD)
    for name, expected in BAD_ODD.items():
        assert expected in reasons[name], (name, reasons[name])
    stored = _read_tokens(tmp_path, fmt)
    assert set(stored) == set(GOOD_ODD)
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint, device="cpu")
    for name, original in GOOD_ODD.items():
        grid, stored_original = stored[name]
        expected = tokenizer.encode((odd_images / name).read_bytes(), size="32", fit="crop")
        np.testing.assert_array_equal(grid, expected)
        assert stored_original == original, name


def test_a_format_1_output_is_verified_and_resumed(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    """An output folder of the first format (one manifest.json: shards with a files mapping, failures, config
    without max_pixels) still passes --verify, and a rerun resumes it, ending as a fresh run of this format."""
    fresh = tmp_path / "fresh"
    run(_config(tiny_checkpoint, str(folder), fresh), progress=False)
    old = tmp_path / "old"
    old.mkdir()
    summary = json.loads((fresh / "summary.json").read_text())
    lines = [json.loads(line) for line in (fresh / "manifest.jsonl").read_text().splitlines()]
    config = {k: v for k, v in summary["options"].items() if k != "max_pixels"}
    shards = [{"shard": r["shard"], "samples": r["samples"], "failed": r["failed"], "first_index": r["first_index"],
               "stop_index": r["stop_index"], "files": {f["file"]: {"bytes": f["bytes"], "sha256": f["sha256"]}
                                                         for f in r["files"]}} for r in lines]
    legacy = {"format_version": 1, "model": summary["model"], "config": config, "shards": shards, "failures": [],
              "num_shards": 3, "complete": True, "totals": {"shards_done": 3, "samples": 7, "failed": 0}}
    for record in lines:
        for entry in record["files"]:
            (old / entry["file"]).write_bytes((fresh / entry["file"]).read_bytes())
    (old / "manifest.json").write_text(json.dumps(legacy))
    assert main(["--verify", str(old), "--samples", "3"]) == 0
    legacy["shards"], legacy["complete"] = shards[:1], False  # a format-1 run killed after its first shard
    (old / "manifest.json").write_text(json.dumps(legacy))
    run(_config(tiny_checkpoint, str(folder), old), progress=False)
    assert _tree(old) == _tree(fresh)


def test_torchrun_two_ranks_equal_one_process(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    """The command under real ``torchrun --standalone --nproc_per_node 2`` (2 CPU ranks, c10d rendezvous on
    localhost): the ranks split the shards, the merged manifest.jsonl and every shard are byte-identical to a
    one-process run's, and the merged summary counts the same samples and failures."""
    import shutil

    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    command = [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*sorted(str(p) for p in folder.rglob("*.png")), "broken.png"]))
    args = ["--checkpoint", str(tiny_checkpoint), "--input", str(listing), "--size", "32", "--fit", "crop",
            "--batch-size", "3", "--shard-size", "2", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([*command, "--standalone", "--nproc_per_node", "2", "-m", "vqtok.tokenize", *args,
                           "--out", str(tmp_path / "ranks")], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]  # one image failed: 0 under torchrun (counted in the summary)
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 3
    ranks = tmp_path / "ranks"
    assert {p.name for p in ranks.glob("manifest.rank-*.jsonl")} == {"manifest.rank-0.jsonl", "manifest.rank-1.jsonl"}
    shards = sorted(p.name for p in single.glob("shard-*"))
    assert len(shards) == 4 and shards == sorted(p.name for p in ranks.glob("shard-*"))
    for name in [*shards, "manifest.jsonl"]:
        assert (ranks / name).read_bytes() == (single / name).read_bytes(), name
    merged, alone = (json.loads((d / "summary.json").read_text()) for d in (ranks, single))
    assert merged["complete"] and merged["world_size"] == 2 and "exit status 0 under torchrun" in done.stderr
    assert merged["counts"] == alone["counts"] == {"shards_done": 4, "done": 7, "failed": 1, "skipped": 0}
    assert merged["failures"] == alone["failures"]


@pytest.mark.parametrize("kind", ["folder", "tar", "parquet"])
def test_odd_images_through_every_input(tiny_checkpoint: Path, odd_images: Path, tmp_path: Path, kind: str) -> None:
    """The same odd files as a folder, a tar shard and a Parquet file: the good ones tokenized as /encode would,
    every other one listed (a folder's scan skips what Pillow cannot even open: counted as skipped)."""
    from vqtok.tokenizer import Tokenizer

    names = (odd_images / "list.txt").read_text().split()
    name_of: dict[str, str] = {}
    if kind == "folder":
        spec = str(odd_images)
        name_of = {name: name for name in [*names, "list.txt"]}
    elif kind == "tar":
        spec = str(tmp_path / "odd.tar")
        with tarfile.open(spec, "w") as archive:
            for i, name in enumerate(n for n in names if n != "notes.txt"):  # .txt: no image member in a tar
                archive.add(odd_images / name, f"{i:04d}{Path(name).suffix}")
                name_of[f"{i:04d}"] = name
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        spec = str(tmp_path / "odd.parquet")
        pq.write_table(pa.table({"key": names, "image": [(odd_images / n).read_bytes() for n in names]}), spec)
        name_of = {name: name for name in names}
    summary = run(_config(tiny_checkpoint, spec, tmp_path / "out", shard_size=4), progress=False)
    stored = {name_of[key]: value for key, value in _read_tokens(tmp_path / "out", "wds").items()}
    assert set(stored) == set(GOOD_ODD)
    listed = {name_of[f["key"]] for f in summary["failures"]}
    expected = set(BAD_ODD) - {"notes.txt"} if kind == "tar" else set(BAD_ODD)
    assert listed == (expected | {"list.txt"} if kind == "folder" else expected)
    assert summary["counts"]["done"] + summary["counts"]["failed"] + summary["counts"]["skipped"] == len(name_of)
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint, device="cpu")
    for name, (grid, original) in stored.items():
        np.testing.assert_array_equal(grid, tokenizer.encode((odd_images / name).read_bytes(), size="32", fit="crop"))
        assert original == GOOD_ODD[name]


def test_folder_jpeg_takes_the_service_path(tiny_checkpoint: Path, astronaut: np.ndarray, tmp_path: Path) -> None:
    """A folder's JPEG goes through /encode's path (header first, draft decoding at a reduced DCT scale when the
    target is small), not the training decoder: its grid equals Tokenizer.encode's of the file."""
    from vqtok.tokenizer import Tokenizer

    root = tmp_path / "jpegs"
    root.mkdir()
    Image.fromarray(astronaut).save(root / "big.jpg", quality=90)  # 512 x 512 -> 64: decoded at 1/4
    run(_config(tiny_checkpoint, str(root), tmp_path / "out", size="64"), progress=False)
    ((grid, _),) = _read_tokens(tmp_path / "out", "wds").values()
    tokenizer = Tokenizer.from_checkpoint(tiny_checkpoint, device="cpu")
    np.testing.assert_array_equal(grid, tokenizer.encode(str(root / "big.jpg"), size="64", fit="crop"))
    # (the training decoder's full-size pixels give another grid here: 3% of positions differ)
    from vqtok.model.data.pixels import load_image

    assert (tokenizer.encode(load_image(root / "big.jpg"), size="64", fit="crop") != grid).any()
