"""``vqtok tokenize``: shards, formats, inputs, failures, resume, torchrun-style ranks, bad arguments."""

from __future__ import annotations

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
    assert manifest["complete"] and manifest["totals"] == {"shards_done": 3, "samples": 7, "failed": 0}
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
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["model"]["model_id"] == tokenizer.model_id and on_disk["num_shards"] == 3


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
    assert manifest["totals"]["samples"] == 2 and manifest["totals"]["failed"] == 2
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
    assert manifest["totals"]["samples"] == 7 and manifest["totals"]["failed"] == 1
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
    assert manifest["totals"]["samples"] == 3
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
    parts = [json.loads((out / f"manifest.rank-{r}.json").read_text()) for r in range(2)]
    assert [s["shard"] for s in parts[0]["shards"]] == [0, 2] and [s["shard"] for s in parts[1]["shards"]] == [1, 3]
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["complete"] and [s["shard"] for s in merged["shards"]] == [0, 1, 2, 3]
    assert merged["totals"]["samples"] == 7
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
    expected = {"checkpoint": "does not exist", "empty": "holds no image", "missing_input": "no-such-folder"}[case]
    assert expected in err


def test_parquet_output_matches_wds(tiny_checkpoint: Path, folder: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    run(_config(tiny_checkpoint, str(folder), tmp_path / "wds"), progress=False)
    manifest = run(_config(tiny_checkpoint, str(folder), tmp_path / "pq", format="parquet"), progress=False)
    assert sorted(p.name for p in (tmp_path / "pq").glob("shard-*")) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert not list((tmp_path / "pq").glob(".*tmp*"))  # written atomically: no temp file left
    assert set(manifest["shards"][0]["files"]) == {"shard-00000.parquet"}
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
    assert laid["totals"]["samples"] == 7
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
    assert manifest["totals"] == {"shards_done": 2, "samples": 3, "failed": 1}
    assert [f["key"] for f in manifest["failures"]] == ["rows/3"]
    out = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out").glob("*.parquet"))]).to_pylist()
    assert [r["key"] for r in out] == ["rows/0", "rows/1", "rows/2"]
    for i, row in enumerate(out):
        assert json.loads(row["metadata"]) == {"id": i, "caption": f"caption {i}"}
        expected = wds[paths[i].relative_to(folder).as_posix()][0]
        np.testing.assert_array_equal(np.asarray(row["tokens"]).reshape(row["grid"]), expected)
    again = run(_config(tiny_checkpoint, f"parquet:{tmp_path}#jpg", tmp_path / "again"), progress=False)
    assert again["totals"]["samples"] == 3


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
    some = json.loads((tmp_path / "some" / "manifest.json").read_text())
    assert some["complete"] and [f["index"] for f in some["failures"]] == [1, 3]
    capsys.readouterr()
    assert main([*common, "--input", str(listing), "--out", str(tmp_path / "stop"), "--max-failures", "0"]) == 4
    assert "more than --max-failures 0; stopped after shard 1" in capsys.readouterr().err
    stopped = json.loads((tmp_path / "stop" / "manifest.json").read_text())
    assert not stopped["complete"] and stopped["totals"]["shards_done"] == 2  # shards 0 and 1, then the stop
    assert main([*common, "--input", str(clean), "--out", str(tmp_path / "clean"), "--size", "64"]) == 2
    assert "--overwrite to replace it" in capsys.readouterr().err
    assert main([*common, "--input", str(clean), "--out", str(tmp_path / "clean"), "--size", "64",
                 "--overwrite"]) == 0
    replaced = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert replaced["config"]["size"] == "64" and replaced["totals"]["samples"] == 2


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
    assert not json.loads((killed / "manifest.json").read_text())["complete"]
    subprocess.run(command(killed), env=env, check=True, capture_output=True, timeout=300)
    assert _tree(killed) == _tree(tmp_path / "whole")
