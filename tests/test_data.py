"""Tests of model/data/: real images on disk, the bundled photos, a synthetic CIFAR-10 batch, the Source protocol."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vqtok.model import data
from vqtok.model.data import (
    HELDOUT_SEED,
    PHOTO_HELDOUT,
    BaseSource,
    Cifar10,
    Cifar10Source,
    FolderSource,
    ImageFolder,
    PhotoCrops,
    PhotoSource,
    Source,
    SourceCrops,
    SourceItem,
    UnreadableImage,
    build_dataset,
    data_variance,
    describe,
    ensure_min_side,
    is_heldout_path,
    iter_full_images,
    load_photos,
    open_source,
    photo_sources,
    to_pixels,
    to_rgb_array,
)


def _assert_image_tensor(x: torch.Tensor, height: int, width: int) -> None:
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (3, height, width)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- to_rgb_array


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "1", "I", "F", "La"])
def test_to_rgb_array_any_mode(mode: str) -> None:
    img = Image.fromarray(_noise(7, 9)).convert(mode)
    out = to_rgb_array(img)
    assert out.shape == (7, 9, 3) and out.dtype == np.uint8


def test_to_rgb_array_alpha_on_white_and_16_bit_rescaled() -> None:
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (to_rgb_array(transparent) == 255).all()
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert sixteen.mode == "I;16"
    assert (to_rgb_array(sixteen) == 255).all()  # rescaled, not clipped from the low byte


def test_ensure_min_side_upscales_keeping_aspect() -> None:
    out = ensure_min_side(_noise(10, 20), 30)
    assert out.shape == (30, 60, 3)
    big = _noise(40, 50)
    assert ensure_min_side(big, 30) is big


# --------------------------------------------------------------------------- bundled photos


def test_photo_split_is_disjoint_and_covers_every_photo() -> None:
    names = set(photo_sources())
    train = [name for name, _ in load_photos("train")]
    heldout = [name for name, _ in load_photos("heldout")]
    assert len(PHOTO_HELDOUT) == 3 and set(PHOTO_HELDOUT) <= names
    assert heldout == [n for n in photo_sources() if n in PHOTO_HELDOUT]
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == names
    assert [n for n, _ in load_photos("all")] == list(photo_sources())
    assert "cat" not in names  # same picture as chelsea: would leak a held-out image into training


def test_photos_are_rgb_uint8_and_distinct() -> None:
    photos = load_photos("all")
    fingerprints = set()
    for name, array in photos:
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, name
        assert min(array.shape[:2]) >= 256, name
        assert not array.flags.writeable, name
        fingerprints.add(array[::17, ::13].tobytes())
    assert len(fingerprints) == len(photos)
    assert load_photos("train") is not load_photos("train")  # fresh list, cached arrays
    assert load_photos("train")[0][1] is load_photos("train")[0][1]


def test_heldout_crops_never_come_from_a_train_image() -> None:
    heldout = PhotoCrops("heldout", 64, length=200, seed=3)
    train = PhotoCrops("train", 64, length=200, seed=3)
    assert {heldout.crop_info(i).name for i in range(len(heldout))} <= set(PHOTO_HELDOUT)
    train_sources = {train.crop_info(i).name for i in range(len(train))}
    assert not train_sources & set(PHOTO_HELDOUT)
    assert len(train_sources) > 3
    assert not any(heldout.crop_info(i).flipped for i in range(len(heldout)))  # flips: train only
    assert any(train.crop_info(i).flipped for i in range(len(train)))


def test_photo_crop_pixels_match_the_named_source() -> None:
    crops = PhotoCrops("train", 48, length=8, seed=1)
    arrays = dict(load_photos("train"))
    for i in range(len(crops)):
        info = crops.crop_info(i)
        region = arrays[info.name][info.top : info.top + 48, info.left : info.left + 48]
        if info.flipped:
            region = region[:, ::-1]
        expected = torch.from_numpy(region.transpose(2, 0, 1).copy()).float() / 255.0
        assert torch.equal(crops[i], expected)


def test_photo_crops_deterministic_and_epoch_dependent() -> None:
    a = PhotoCrops("train", 32, length=6, seed=7)
    b = PhotoCrops("train", 32, length=6, seed=7)
    for i in (0, 5, 3):  # order of access does not matter
        _assert_image_tensor(a[i], 32, 32)
        assert torch.equal(a[i], b[i])
    first = [a[i] for i in range(6)]
    a.set_epoch(1)
    assert not all(torch.equal(x, a[i]) for i, x in enumerate(first))
    a.set_epoch(0)
    assert all(torch.equal(x, a[i]) for i, x in enumerate(first))
    other_seed = PhotoCrops("train", 32, length=6, seed=8)
    assert not all(torch.equal(x, other_seed[i]) for i, x in enumerate(first))


def test_photo_crops_larger_than_a_photo_are_upscaled() -> None:
    crops = PhotoCrops("heldout", 320, length=4)  # chelsea is 300 pixels high
    for i in range(len(crops)):
        _assert_image_tensor(crops[i], 320, 320)


def test_iter_full_images_yields_heldout_photos_at_full_size() -> None:
    expected = {name: array.shape for name, array in load_photos("heldout")}
    seen = {}
    for name, image in iter_full_images("photos", "heldout"):
        h, w, _ = expected[name]
        _assert_image_tensor(image, h, w)
        seen[name] = image
    assert list(seen) == list(PHOTO_HELDOUT)
    chelsea = dict(load_photos("heldout"))["chelsea"]
    assert torch.equal(seen["chelsea"], torch.from_numpy(chelsea.transpose(2, 0, 1).copy()).float() / 255)


def test_build_dataset_photos_heldout_ignores_training_seed() -> None:
    a = build_dataset("photos", 32, "heldout", seed=0, length=5)
    b = build_dataset("photos", 32, "heldout", seed=99, length=5)
    assert isinstance(a, PhotoCrops) and a.seed == HELDOUT_SEED and len(a) == 5
    assert all(torch.equal(a[i], b[i]) for i in range(5))
    default = build_dataset("photos", 32, "heldout")
    assert len(default) == 512
    assert len(build_dataset("photos", 32, "train")) == 10_000


def test_describe_photos_is_json_able() -> None:
    record = describe("photos", "train")
    assert record["kind"] == "photos" and record["split"] == "train"
    assert record["heldout"] == list(PHOTO_HELDOUT)
    assert record["num_images"] == len(photo_sources()) - len(PHOTO_HELDOUT)
    assert json.loads(json.dumps(record)) == record


# --------------------------------------------------------------------------- image folder


def _write_images(root: Path) -> dict[str, str]:
    """Real images of several modes, a nested one, a corrupt and a text file, a hidden file."""
    (root / "nested" / "deeper").mkdir(parents=True)
    rgb = _noise(40, 50)
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(rgb).save(root / "photo.jpg", quality=90)
    Image.fromarray(rgb).convert("L").save(root / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "alpha.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.gif")
    Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30).save(root / "deep16.png")
    Image.fromarray(_noise(12, 20, seed=1)).save(root / "nested" / "deeper" / "tiny.png")
    Image.fromarray(rgb).save(root / "no_extension", format="PNG")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (root / "notes.txt").write_text("not an image\n")
    Image.fromarray(rgb).save(root / ".hidden.png")
    return {"corrupt": "corrupt.png", "text": "notes.txt"}


def test_image_folder_skips_unreadable_files_and_reads_every_mode(tmp_path: Path) -> None:
    bad = _write_images(tmp_path)
    ds = ImageFolder(tmp_path, 32, mode="crop", split="all")
    names = {ds.relative_name(i) for i in range(len(ds))}
    assert names == {
        "rgb.png",
        "photo.jpg",
        "grey.png",
        "alpha.png",
        "palette.gif",
        "deep16.png",
        "no_extension",
        "nested/deeper/tiny.png",
    }
    assert ds.skipped == 2
    assert sorted(p.name for p in ds.skipped_paths) == sorted(bad.values())
    for i in range(len(ds)):
        _assert_image_tensor(ds[i], 32, 32)


def test_image_folder_crop_upscales_tiny_images_and_resize_mode(tmp_path: Path) -> None:
    Image.fromarray(_noise(12, 20)).save(tmp_path / "tiny.png")
    crop = ImageFolder(tmp_path, 48, mode="crop", split="all")
    _assert_image_tensor(crop[0], 48, 48)
    resize = ImageFolder(tmp_path, 16, mode="resize", split="all")
    _assert_image_tensor(resize[0], 16, 16)
    with pytest.raises(ValueError, match="mode"):
        ImageFolder(tmp_path, 16, mode="stretch", split="all")


def test_image_folder_crops_are_deterministic_per_epoch(tmp_path: Path) -> None:
    Image.fromarray(_noise(64, 80)).save(tmp_path / "a.png")
    a = ImageFolder(tmp_path, 16, split="all", seed=5)
    b = ImageFolder(tmp_path, 16, split="all", seed=5)
    assert torch.equal(a[0], b[0])
    epoch0 = a[0]
    a.set_epoch(1)
    assert not torch.equal(epoch0, a[0])
    a.set_epoch(0)
    assert torch.equal(epoch0, a[0])


def test_image_folder_split_is_deterministic_disjoint_and_stable(tmp_path: Path) -> None:
    for i in range(30):
        Image.fromarray(_noise(8, 8, seed=i)).save(tmp_path / f"img_{i:02d}.png")
    kwargs = {"heldout_fraction": 0.3}
    train = ImageFolder(tmp_path, 8, split="train", **kwargs)
    heldout = ImageFolder(tmp_path, 8, split="heldout", **kwargs)
    every = ImageFolder(tmp_path, 8, split="all", **kwargs)
    assert len(heldout) > 0 and len(train) > 0
    assert not set(train.files) & set(heldout.files)
    assert set(train.files) | set(heldout.files) == set(every.files)
    assert ImageFolder(tmp_path, 8, split="heldout", **kwargs).files == heldout.files
    for path in heldout.files:
        assert is_heldout_path(path.relative_to(tmp_path).as_posix(), 0.3)
    for i in range(30, 40):  # new files never move old ones between splits
        Image.fromarray(_noise(8, 8, seed=i)).save(tmp_path / f"img_{i:02d}.png")
    grown = ImageFolder(tmp_path, 8, split="heldout", **kwargs)
    assert set(heldout.files) <= set(grown.files)
    assert not set(grown.files) & set(train.files)


def test_image_folder_falls_back_when_a_file_goes_bad(tmp_path: Path) -> None:
    Image.fromarray(_noise(20, 20, seed=0)).save(tmp_path / "a.png")
    Image.fromarray(_noise(20, 20, seed=1)).save(tmp_path / "b.png")
    ds = ImageFolder(tmp_path, 20, mode="resize", split="all")
    (tmp_path / "a.png").write_bytes(b"broken now")
    assert torch.equal(ds[0], ds[1])  # item 0 deterministically falls back to the next file
    (tmp_path / "b.png").unlink()
    with pytest.raises(RuntimeError, match="readable"):
        ds[0]


def test_image_folder_empty_or_unreadable_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImageFolder(tmp_path, 32)
    (tmp_path / "junk.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"no readable image \(1 file"):
        ImageFolder(tmp_path, 32, split="all")


def test_image_folder_empty_split_raises(tmp_path: Path) -> None:
    Image.fromarray(_noise(8, 8)).save(tmp_path / "only.png")
    split = "heldout" if not is_heldout_path("only.png", 0.05) else "train"
    with pytest.raises(ValueError, match=f"no image in the '{split}' split"):
        ImageFolder(tmp_path, 8, split=split)


def test_folder_specs_iter_full_images_and_describe(tmp_path: Path) -> None:
    _write_images(tmp_path)
    ds = build_dataset(f"folder:{tmp_path}", 24, "all")
    assert isinstance(ds, ImageFolder) and len(ds) == 8
    plain = build_dataset(str(tmp_path), 24, "all")
    assert torch.equal(ds[3], plain[3])
    capped = build_dataset(str(tmp_path), 24, "all", length=3)
    assert len(capped) == 3
    _assert_image_tensor(capped[2], 24, 24)
    full = dict(iter_full_images(f"folder:{tmp_path}", "all"))
    _assert_image_tensor(full["nested/deeper/tiny.png"], 12, 20)
    _assert_image_tensor(full["rgb.png"], 40, 50)
    record = describe(str(tmp_path), "all")
    assert record["kind"] == "folder" and record["num_images"] == 8 and record["skipped"] == 2


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(directory: Path, names: list[str], n: int = 4) -> np.ndarray:
    """Batches in the real format; protocols 2 (as the official files), 4 and 5 alternate."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    for k, name in enumerate(names):
        batch = {b"data": images.reshape(n, 3072), b"labels": list(range(n)), b"batch_label": b"x"}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=(2, 4, 5)[k % 3])
    return images


def test_cifar10_reads_synthetic_batches(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    images = _write_cifar(batches, [*data.CIFAR_TRAIN_BATCHES, "test_batch"])
    train = Cifar10(tmp_path, "train")  # parent of cifar-10-batches-py
    heldout = Cifar10(batches, "heldout")  # the directory itself
    assert len(train) == 20 and len(heldout) == 4
    _assert_image_tensor(train[0], 32, 32)
    assert torch.equal(heldout[1], torch.from_numpy(images[1]).float() / 255)
    assert heldout.labels.tolist() == [0, 1, 2, 3]
    via_spec = build_dataset(f"cifar10:{tmp_path}", 32, "heldout")
    assert torch.equal(via_spec[2], heldout[2])
    names = [name for name, _ in iter_full_images(f"cifar10:{tmp_path}", "heldout")]
    assert names == ["heldout/0", "heldout/1", "heldout/2", "heldout/3"]
    assert describe(f"cifar10:{tmp_path}", "train")["num_images"] == 20
    with pytest.raises(ValueError, match="32x32"):
        build_dataset(f"cifar10:{tmp_path}", 64, "train")


def test_cifar10_missing_batch_is_named(tmp_path: Path) -> None:
    _write_cifar(tmp_path, ["data_batch_1", "data_batch_2"])
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        Cifar10(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        Cifar10(tmp_path, "heldout")


def test_cifar10_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Path("x")}, f)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        Cifar10(tmp_path, "heldout")


# --------------------------------------------------------------------------- specs, variance


def test_build_dataset_error_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty dataset spec"):
        build_dataset("", 32, "train")
    with pytest.raises(ValueError, match="unknown dataset kind 'imagenet'"):
        build_dataset("imagenet:/data", 32, "train")
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"image folder .*nowhere.* does not exist"):
        build_dataset(str(missing), 32, "train")
    with pytest.raises(ValueError, match=r"CIFAR-10 directory .*nowhere.* does not exist"):
        build_dataset(f"cifar10:{missing}", 32, "train")
    with pytest.raises(ValueError, match="names no directory"):
        build_dataset("folder:", 32, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("photos", 32, "validation")
    with pytest.raises(ValueError, match="image_size"):
        build_dataset("photos", 0, "train")


def test_data_variance_matches_numpy() -> None:
    crops = PhotoCrops("train", 16, length=10, seed=2)
    stacked = torch.stack([crops[i] for i in range(10)]).double().numpy()
    assert data_variance(crops) == pytest.approx(float(stacked.var()), rel=1e-9)
    sub = data_variance(crops, max_items=3)
    assert 0.0 < sub < 0.25
    constant = [torch.full((3, 4, 4), 0.5)] * 5
    assert data_variance(constant) == pytest.approx(0.0, abs=1e-12)


def test_items_do_not_depend_on_worker_count() -> None:
    crops = PhotoCrops("train", 16, length=8, seed=4)
    crops.set_epoch(2)
    serial = torch.cat(list(torch.utils.data.DataLoader(crops, batch_size=3, num_workers=0)))
    parallel = torch.cat(list(torch.utils.data.DataLoader(crops, batch_size=3, num_workers=2)))
    assert torch.equal(serial, parallel)


# --------------------------------------------------------------------------- the Source protocol


def _check_source(source: Source, kind: str, split: str, n: int) -> list[str]:
    """The protocol's contract on one source; returns its keys."""
    assert isinstance(source, Source) and source.kind == kind and source.split == split and len(source) == n
    keys = []
    for item in source:
        assert isinstance(item, SourceItem)
        pixels = to_pixels(item.image)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        keys.append(item.key)
    assert len(set(keys)) == n
    assert source[-1].key == keys[-1] and source[0].key == keys[0]
    with pytest.raises(IndexError):
        source[n]
    reopened = open_source(source.name, split)  # the name is a spec that opens the same data
    assert type(reopened) is type(source) and [item.key for item in reopened] == keys
    record = source.describe()
    assert record["kind"] == kind and record["split"] == split and record["num_images"] == n
    assert json.loads(json.dumps(record)) == record
    record["num_images"] = -1  # a copy: the cached record cannot be edited from outside
    assert source.describe()["num_images"] == n
    return keys


def test_source_protocol_photos() -> None:
    source = open_source("photos", "heldout")
    assert isinstance(source, PhotoSource)
    assert _check_source(source, "photos", "heldout", 3) == list(PHOTO_HELDOUT)
    train = source.with_split("train")
    assert _check_source(train, "photos", "train", len(photo_sources()) - 3) == [n for n, _ in load_photos("train")]
    assert open_source(source, "heldout") is source  # a source is never re-parsed


def test_source_protocol_folder(tmp_path: Path) -> None:
    _write_images(tmp_path)
    source = open_source(str(tmp_path), "all")
    assert isinstance(source, FolderSource)
    keys = _check_source(source, "folder", "all", 8)
    assert "nested/deeper/tiny.png" in keys and "corrupt.png" not in keys
    assert source[keys.index("rgb.png")].metadata["path"] == str(tmp_path / "rgb.png")
    train, heldout = source.with_split("train"), source.with_split("heldout")
    assert train.index is source.index and heldout.index is source.index  # one scan for every split
    assert sorted([item.key for item in train] + [item.key for item in heldout]) == sorted(keys)
    assert source.describe()["skipped"] == 2


def test_source_protocol_cifar10(tmp_path: Path) -> None:
    images = _write_cifar(tmp_path, [*data.CIFAR_TRAIN_BATCHES, "test_batch"])
    source = open_source(f"cifar10:{tmp_path}", "heldout")
    assert isinstance(source, Cifar10Source)
    assert _check_source(source, "cifar10", "heldout", 4) == ["heldout/0", "heldout/1", "heldout/2", "heldout/3"]
    item = source[2]
    assert np.array_equal(item.image, images[2].transpose(1, 2, 0)) and item.metadata == {"label": 2}
    assert len(source.with_split("train")) == 20



def _keyed_inputs(root: Path) -> dict[str, str]:
    """The same six PNGs as a text list, a JSONL list, a tar shard (and a folder of them) and, with pyarrow,
    a Parquet file: spec -> expected kind."""
    import tarfile

    images = root / "images"
    images.mkdir()
    names = [f"im{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        Image.fromarray(_noise(12 + i, 16, seed=i)).save(images / name)
    (root / "list.txt").write_text("".join(f"images/{n}\n" for n in names))
    (root / "list.jsonl").write_text("".join(json.dumps({"path": f"images/{n}", "n": i}) + "\n"
                                             for i, n in enumerate(names)))
    (root / "shards").mkdir()
    with tarfile.open(root / "shards" / "a.tar", "w") as archive:
        for i, name in enumerate(names):
            archive.add(images / name, f"{i:04d}.png")
    specs = {str(root / "list.txt"): "list", f"list:{root / 'list.jsonl'}": "list",
             str(root / "shards" / "a.tar"): "tar", f"tar:{root / 'shards'}": "tar"}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return specs
    table = pa.table({"caption": [f"c{i}" for i in range(6)],
                      "png": [(images / n).read_bytes() for n in names]})
    pq.write_table(table, root / "rows.parquet", row_group_size=4)
    specs[str(root / "rows.parquet")] = "parquet"
    specs[f"parquet:{root}#png"] = "parquet"
    return specs


def test_open_source_opens_lists_tars_and_parquet(tmp_path: Path) -> None:
    from vqtok.model.data import ListSource, ParquetSource, TarSource, parse_spec

    classes = {"list": ListSource, "tar": TarSource, "parquet": ParquetSource}
    for spec, kind in _keyed_inputs(tmp_path).items():
        assert parse_spec(spec)[0] == kind, spec
        source = open_source(spec, "all")
        assert isinstance(source, classes[kind]), spec
        keys = _check_source(source, kind, "all", 6)
        reopened = open_source(source.name, "all")  # the name is a spec that opens the same data
        assert [item.key for item in reopened] == keys
        train, heldout = source.with_split("train"), source.with_split("heldout")
        assert len(train) >= 1 and len(heldout) >= 1
        assert sorted([item.key for item in train] + [item.key for item in heldout]) == sorted(keys)
        assert source.describe()["num_images"] == 6 and json.dumps(source.describe())
        if spec.endswith(".jsonl"):
            assert [source[i].metadata["n"] for i in range(6)] == list(range(6))
        if kind == "parquet":
            assert [source[i].metadata for i in range(6)] == [{"caption": f"c{i}"} for i in range(6)]
    assert parse_spec(str(tmp_path / "images"))[0] == "folder"
    with pytest.raises(ValueError, match="does not exist"):
        open_source(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="neither a tar file"):
        open_source(f"tar:{tmp_path / 'images'}")
    if (tmp_path / "rows.parquet").exists():
        with pytest.raises(ValueError, match="no column 'nope'"):
            len(open_source(f"{tmp_path / 'rows.parquet'}#nope"))


def _count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``PIL.Image.open`` from now on, by path."""
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp: Any, *args: Any, **kwargs: Any) -> Image.Image:
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return opened


def test_folder_describe_verifies_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_images(tmp_path)
    opened = _count_opens(monkeypatch)
    source = open_source(f"folder:{tmp_path}", "train")
    assert opened == []  # opening a spec reads nothing
    first = source.describe()
    assert len(opened) == 10  # every non-hidden file, once
    assert source.describe() == first and describe(source, "train") == first
    assert len(opened) == 10
    # A spec string opens a fresh source, yet the unchanged folder is not verified again; nor do the
    # training sets (both splits) and the full-image walk verify it.
    assert describe(str(tmp_path), "train") == first
    ImageFolder(tmp_path, 16, split="all")
    build_dataset(source, 16, "all")
    assert len(opened) == 10
    # A changed folder is scanned again: a new file, and a file rewritten in place.
    Image.fromarray(_noise(8, 8)).save(tmp_path / "new.png")
    assert describe(str(tmp_path), "all")["num_images"] == 9
    (tmp_path / "rgb.png").write_bytes(b"now broken")
    assert describe(str(tmp_path), "all")["skipped"] == 3


def test_training_sets_from_one_opened_source(tmp_path: Path) -> None:
    for i in range(64):  # img_50 and img_61 are held out at the default fraction
        Image.fromarray(_noise(20, 20, seed=i)).save(tmp_path / f"img_{i:02d}.png")
    source = open_source(str(tmp_path))
    train = build_dataset(source, 16, "train", seed=1)
    heldout = build_dataset(source, 16, "heldout", seed=1, length=2)
    assert isinstance(train, ImageFolder) and train.source.index is source.index
    assert torch.equal(train[3], build_dataset(str(tmp_path), 16, "train", seed=1)[3])
    assert len(heldout) == 2 and [f.name for f in source.with_split("heldout").files] == ["img_50.png", "img_61.png"]
    names = [train.relative_name(i) for i in range(len(train))]
    assert [name for name, _ in iter_full_images(source, "train")] == names


class _BytesSource(BaseSource):
    """A stand-in for tar shards / Parquet rows: encoded images with metadata, one of them broken."""

    kind = "memory"

    def __init__(self, blobs: list[bytes], split: str = "all") -> None:
        super().__init__(split)
        self.blobs = blobs

    @classmethod
    def check_argument(cls, spec: str, argument: str) -> None:  # pragma: no cover - not in the spec table
        raise ValueError(spec)

    @classmethod
    def from_spec(cls, argument: str, split: str) -> _BytesSource:  # pragma: no cover
        raise ValueError(argument)

    @property
    def name(self) -> str:
        return "memory:"

    def with_split(self, split: str) -> _BytesSource:
        return _BytesSource(self.blobs, split)

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> SourceItem:
        i = self.check_index(index)
        return SourceItem(f"blob-{i}", self.blobs[i], {"caption": f"image {i}"})

    def _describe(self) -> dict[str, Any]:
        return {"source": "memory", "num_images": len(self)}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_source_of_encoded_bytes_trains_and_evaluates_without_a_kind_switch() -> None:
    good = _noise(24, 30, seed=2)
    source = _BytesSource([_png(good), b"not an image", _png(_noise(16, 16, seed=3))])
    assert isinstance(source, Source)
    with pytest.raises(UnreadableImage):
        to_pixels(source[1].image)
    assert np.array_equal(to_pixels(source[0].image), good)
    full = dict(iter_full_images(source, "all"))  # the broken blob is skipped
    assert list(full) == ["blob-0", "blob-2"]
    assert torch.equal(full["blob-0"], torch.from_numpy(good.transpose(2, 0, 1).copy()).float() / 255)
    crops = build_dataset(source, 16, "all", seed=0)  # the generic crops: no registration needed
    assert isinstance(crops, SourceCrops) and len(crops) == 3
    assert torch.equal(crops[1], SourceCrops(source, 16, seed=0)[1])
    resized = build_dataset(source, 8, "all", mode="resize")
    assert torch.equal(resized[1], resized[2])  # item 1 falls back to the next readable item
    _assert_image_tensor(resized[0], 8, 8)


def test_heldout_rule_fraction_count_and_small_folders() -> None:
    from vqtok.model.data import heldout_files, parse_heldout

    files = tuple(f"img{i:02d}.png" for i in range(26))
    assert parse_heldout("5%") == (0.05, None) and parse_heldout("0.2") == (0.2, None)
    assert parse_heldout("3")[1] == 3 and parse_heldout("0") == (0.0, None)
    for bad in ("-1", "1.5", "100%", "three", ""):
        with pytest.raises(ValueError, match="--heldout"):
            parse_heldout(bad)
    assert len(heldout_files(files, 0.05)) >= 1  # 26 files at 5%: never an empty held-out split
    assert len(heldout_files(files, 0.0)) == 0  # asked for none
    assert len(heldout_files(files, 0.0, 3)) == 3
    assert heldout_files(files, 0.0, 3) <= heldout_files(files, 0.0, 4)  # the count takes the lowest hashes
    assert len(heldout_files(files[:2], 0.99)) == 1  # two files: one each way, never all held out
    assert len(heldout_files(files[:2], 0.0, 5)) == 1
    assert heldout_files(files[:1], 0.5, 1) == frozenset()  # one image trains
    assert heldout_files(files, 0.05) == heldout_files(tuple(reversed(files)), 0.05)  # order does not matter


def _small_folder(root: Path, count: int, astronaut: np.ndarray) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.ascontiguousarray(astronaut[i * 8 : i * 8 + 48, i * 8 : i * 8 + 48])).save(root / f"{i}.png")
    return root


def test_a_small_folder_trains_and_evaluate_picks_the_right_images(tmp_path: Path, astronaut: np.ndarray,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from vqtok.service.cli import main as vqtok

    folder = _small_folder(tmp_path / "mine", 12, astronaut)
    out = tmp_path / "run"
    flags = ["--num-hiddens", "16", "--num-residual-hiddens", "8", "--embedding-dim", "8", "--num-embeddings", "16",
             "--image-size", "16", "--batch-size", "4", "--heldout-crops", "4", "--steps", "3", "--eval-every", "0",
             "--device", "cpu", "--data", str(folder), "--heldout", "2", "--out", str(out)]
    assert vqtok(["train", *flags]) == 0
    capsys.readouterr()
    assert vqtok(["evaluate", "--checkpoint", str(out / "checkpoint"), "--data", str(folder), "--json"]) == 0
    trained_on = json.loads(capsys.readouterr().out)
    assert trained_on["images"] == 2 and trained_on["split"] == "heldout"  # the two it never saw
    other = _small_folder(tmp_path / "other", 5, astronaut)
    assert vqtok(["evaluate", "--checkpoint", str(out / "checkpoint"), "--data", str(other), "--json"]) == 0
    elsewhere = json.loads(capsys.readouterr().out)
    assert elsewhere["images"] == 5 and elsewhere["split"] == "all"  # none of them was trained on
    assert vqtok(["train", *flags[:-4], "--heldout", "half", "--out", str(tmp_path / "x")]) == 2
    assert "--heldout 'half': give a fraction" in capsys.readouterr().err


# --------------------------------------------------------------------------- fixed split, crops per image, augment


def test_a_train_and_heldout_folder_has_that_fixed_split_whatever_the_heldout_rule(tmp_path: Path) -> None:
    for split, names in (("train", ["a", "b", "c"]), ("heldout", ["d"])):
        (tmp_path / split).mkdir()
        for i, name in enumerate(names):
            Image.fromarray(_noise(16, 16, seed=i)).save(tmp_path / split / f"{name}.png")
    for rule in ("0.5", "3", "0"):
        source = data.FolderSource(tmp_path).with_heldout(rule)
        assert [p.name for p in source.with_split("heldout").files] == ["d.png"]
        assert [p.name for p in source.with_split("train").files] == ["a.png", "b.png", "c.png"]
    # one image outside the two folders: the layout is not a fixed split any more, the hash rule applies
    Image.fromarray(_noise(16, 16)).save(tmp_path / "loose.png")
    assert data.FolderSource(tmp_path, "heldout", 0.0).files == []


def test_crops_per_image_and_augmented_crops_are_deterministic_and_cover_every_image(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((40, 60, 3), 80 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    crops = data.ImageFolder.from_source(data.FolderSource(tmp_path, "all"), 16, crops_per_image=4, augment=True,
                                         cache_decoded=True)
    assert len(crops) == 12
    # item i is a crop of image i // 4: a flat image gives a flat crop of its own grey
    assert [round(float(crops[i].mean()) * 255) for i in (0, 4, 11)] == [0, 80, 160]
    assert torch.equal(crops[5], crops[5])
    Image.fromarray(_noise(40, 60)).save(tmp_path / "0.png")
    textured = data.ImageFolder.from_source(data.FolderSource(tmp_path, "all"), 16, augment=True)
    assert len(textured) == 3
    first_epoch = textured[0]
    textured.set_epoch(1)
    assert first_epoch.shape == (3, 16, 16) and not torch.equal(first_epoch, textured[0])  # new epoch, new crops
    with pytest.raises(ValueError, match="crops_per_image must be >= 1"):
        data.ImageFolder.from_source(data.FolderSource(tmp_path, "all"), 16, crops_per_image=0)


def test_augmented_crop_sees_up_to_twice_the_context_and_flips() -> None:
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))  # brightness grows to the right
    spans, flips = [], 0
    for seed in range(40):
        crop = data.augmented_crop(ramp, 16, np.random.default_rng(seed)).astype(int)
        spans.append(abs(crop[:, -1, 0].mean() - crop[:, 0, 0].mean()) / 4)  # source columns the crop spans
        flips += crop[:, -1, 0].mean() < crop[:, 0, 0].mean()
    assert min(spans) >= 13 and max(spans) > 24  # windows of 16 to 32 source pixels, resized to 16
    assert 8 <= flips <= 32
