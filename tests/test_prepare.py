"""Data set preparers on small files the tests write in each data set's own distributed format.

CIFAR-100 pickles are written opcode by opcode as Python 2's cPickle wrote the real files (str keys, NumPy arrays
through numpy.core.multiarray._reconstruct); STL-10 binaries byte by byte from the format's description (each
channel column by column); Tiny-ImageNet and ImageNet folders with real JPEG files and a tab-separated
val_annotations.txt; MedMNIST .npz files with their keys and N x 1 labels. Each decoded image is compared with the
planted pixels, with an asymmetric image where a transposition would show.
"""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from streaming import StreamingDataset

from magma_composer.data.dataset import StreamingImageDataset
from magma_composer.data.prepare import (
    MEDMNIST_CLASSES,
    PrepareError,
    imagenet100_classes,
    main,
    prepare_dataset,
)
from tests.conftest import tiny_recipe


def _raw(folder: Path) -> dict[int, dict]:
    """Every sample of an MDS split by its ``i`` column, as stored (no transform)."""
    dataset = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    return {int(s["i"]): s for s in (dataset[k] for k in range(dataset.num_samples))}


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def _error(capsys, argv: list[str]) -> str:
    """Runs the command line; asserts exit 2 and one error line; returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m magma_composer.data.prepare: error: "), err
    return err[0]


def _asymmetric(side: int) -> np.ndarray:
    """``side x side x 3``: red grows down the rows, green across the columns, blue constant."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    step = 255 // (side - 1)
    return np.stack([rows * step, cols * step, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ CIFAR-100


def _py2_pickle(value) -> bytes:
    """``value`` as Python 2's cPickle wrote it at protocol 2: str as BINSTRING, ints as BININT, uint8 arrays
    through ``numpy.core.multiarray._reconstruct`` and ``numpy.dtype`` with their states."""
    out = bytearray(b"\x80\x02")

    def string(data: bytes) -> None:
        out.extend((b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data)

    def put(v) -> None:
        if isinstance(v, dict):
            out.extend(b"}(")
            for key, item in v.items():
                put(key)
                put(item)
            out.extend(b"u")
        elif isinstance(v, (list, tuple)):
            out.extend(b"](" if isinstance(v, list) else b"(")
            for item in v:
                put(item)
            out.extend(b"e" if isinstance(v, list) else b"t")
        elif isinstance(v, bytes):
            string(v)
        elif isinstance(v, bool):
            out.extend(b"\x88" if v else b"\x89")
        elif isinstance(v, (int, np.integer)):
            out.extend(b"J" + struct.pack("<i", int(v)))
        elif v is None:
            out.extend(b"N")
        elif isinstance(v, np.ndarray):
            assert v.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            put((0,))
            string(b"b")
            out.extend(b"\x87R(")  # TUPLE3, REDUCE; then the state tuple
            put(1)
            put(tuple(v.shape))
            out.extend(b"cnumpy\ndtype\n")
            string(b"u1")
            out.extend(b"\x89\x88\x87R")
            put((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b")  # BUILD the dtype
            put(False)
            string(v.tobytes())
            out.extend(b"tb")  # the state tuple, BUILD the array
        else:
            raise TypeError(type(v))

    put(value)
    out.extend(b".")
    return bytes(out)


def _write_cifar100(downloads: Path, counts=(("train", 10), ("test", 4)), seed=0) -> dict:
    """``downloads/cifar-100-python/{train,test,meta}``; returns the planted ``{split: (images, fine, coarse)}``."""
    rng = np.random.default_rng(seed)
    folder = downloads / "cifar-100-python"
    folder.mkdir(parents=True)
    planted = {}
    for split, n in counts:
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        images[0] = _asymmetric(32)
        fine, coarse = rng.integers(0, 100, n), rng.integers(0, 20, n)
        # the documented layout: 1024 red values row by row, then 1024 green, then 1024 blue
        data = np.stack([np.concatenate([img[:, :, c].reshape(-1) for c in range(3)]) for img in images])
        batch = {
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"coarse_labels": [int(c) for c in coarse],
            b"data": data,
            b"filenames": [f"img_{k:05d}.png".encode() for k in range(n)],
            b"fine_labels": [int(f) for f in fine],
        }
        (folder / split).write_bytes(_py2_pickle(batch))
        planted[split] = (images, fine, coarse)
    meta = {
        b"coarse_label_names": [f"superclass_{k:02d}".encode() for k in range(20)],
        b"fine_label_names": [f"class_{k:03d}".encode() for k in range(100)],
    }
    (folder / "meta").write_bytes(_py2_pickle(meta))
    return planted


def test_cifar100_fine_and_coarse_pixel_exact(tmp_path):
    planted = _write_cifar100(tmp_path / "dl")
    manifest = prepare_dataset("cifar100", tmp_path / "dl", tmp_path / "out", progress=False)

    assert manifest["classes"] == [f"class_{k:03d}" for k in range(100)] == manifest["class_names"]
    assert manifest["num_classes"] == 100 and manifest["image_size"] == 32
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 10, "test": 4}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    for split, (images, fine, _) in planted.items():
        samples = _raw(tmp_path / "out" / split)
        assert sorted(samples) == list(range(len(images)))
        for k, sample in samples.items():
            assert np.array_equal(_pixels(sample["x"]), images[k]), (split, k)
            assert int(sample["y"]) == fine[k]
        counts = manifest["splits"][split]["class_counts"]
        assert sum(counts.values()) == len(images) and counts[f"class_{fine[0]:03d}"] >= 1
    first = _pixels(_raw(tmp_path / "out" / "train")[0]["x"])
    assert tuple(first[31, 0]) == (248, 0, 7) and tuple(first[0, 31]) == (0, 248, 7)  # rows down, columns across

    coarse = prepare_dataset("cifar100", tmp_path / "dl" / "cifar-100-python", tmp_path / "c", labels="coarse")
    assert coarse["classes"] == [f"superclass_{k:02d}" for k in range(20)]
    assert [int(s["y"]) for _, s in sorted(_raw(tmp_path / "c" / "train").items())] == list(planted["train"][2])

    data = StreamingImageDataset(remote=str(tmp_path / "out"), split="test", image_size=32, train=False, batch_size=2)
    assert data.has_labels and data[1][1] == planted["test"][1][1]


def test_cifar100_bad_files(tmp_path, capsys):
    _write_cifar100(tmp_path / "dl")
    folder = tmp_path / "dl" / "cifar-100-python"
    out = ["--out", str(tmp_path / "out"), "--no-progress"]

    (folder / "test").rename(folder / "test.bak")
    assert f"missing from --src: {folder / 'test'}" in _error(capsys, ["cifar100", "--src", str(folder)] + out)
    (folder / "test.bak").rename(folder / "test")

    good = (folder / "train").read_bytes()
    (folder / "train").write_bytes(good[: len(good) // 2])  # an interrupted download
    line = _error(capsys, ["cifar100", "--src", str(tmp_path / "dl")] + out)
    assert f"{folder / 'train'} is not a readable CIFAR-100 pickle" in line
    # a pickle that would run code when loaded is refused, not run
    (folder / "train").write_bytes(b"cos\nsystem\n(S'echo hacked'\ntR.")
    assert "os.system" in _error(capsys, ["cifar100", "--src", str(tmp_path / "dl")] + out)
    (folder / "train").write_bytes(_py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [1, 2]}))
    assert "expected uint8 N x 3072" in _error(capsys, ["cifar100", "--src", str(folder)] + out)
    (folder / "train").write_bytes(good)

    assert "choose fine (100 classes) or coarse" in _error(
        capsys, ["cifar100", "--src", str(folder), "--labels", "x"] + out
    )
    assert "PNG is lossless" in _error(capsys, ["cifar100", "--src", str(folder), "--quality", "80"] + out)
    assert "cifar100 has the splits train, test" in _error(
        capsys, ["cifar100", "--src", str(folder), "--splits", "val"] + out
    )
    assert "does not hold the CIFAR-100 python version" in _error(capsys, ["cifar100", "--src", str(tmp_path)] + out)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------ STL-10

STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _stl_bytes(images: np.ndarray) -> bytes:
    """STL-10's layout as documented: per image, the red channel, then green, then blue, each in column-major order
    (down the first column, then the second ...)."""
    return b"".join(img[:, :, c].flatten(order="F").tobytes() for img in images for c in range(3))


def _write_stl10(downloads: Path, counts=(("train", 3), ("test", 2), ("unlabeled", 4)), seed=1) -> dict:
    rng = np.random.default_rng(seed)
    folder = downloads / "stl10_binary"
    folder.mkdir(parents=True)
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    planted = {}
    for split, n in counts:
        images = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
        images[-1] = _asymmetric(96)
        (folder / f"{split}_X.bin").write_bytes(_stl_bytes(images))
        labels = None
        if split != "unlabeled":
            labels = rng.integers(1, 11, n).astype(np.uint8)  # the files' labels run 1..10
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        planted[split] = (images, labels)
    return planted


def test_stl10_splits_orientation_and_unlabelled(tmp_path):
    planted = _write_stl10(tmp_path / "dl")
    manifest = prepare_dataset("stl10", tmp_path / "dl", tmp_path / "out", progress=False)

    assert manifest["classes"] == STL_CLASSES and manifest["image_size"] == 96
    assert manifest["splits"]["unlabeled"] == {"samples": 4, "labelled": False, "class_counts": {}, "num_skipped": 0}
    assert manifest["splits"]["train"]["labelled"] and manifest["splits"]["test"]["samples"] == 2
    for split, (images, labels) in planted.items():
        samples = _raw(tmp_path / "out" / split)
        assert sorted(samples) == list(range(len(images)))
        for k, sample in samples.items():
            assert np.array_equal(_pixels(sample["x"]), images[k]), (split, k)
            if labels is None:
                assert "y" not in sample
            else:
                assert int(sample["y"]) == labels[k] - 1  # 1..10 -> 0..9
    last = _pixels(_raw(tmp_path / "out" / "train")[2]["x"])
    assert tuple(last[5, 40]) == (10, 80, 7)  # row 5, column 40: not transposed

    # encoded in 2 processes (the pool reads the memory-mapped file image by image): the same shards; and on
    # request torchvision's 'train+unlabeled' split: train's images, then unlabeled's, without labels
    splits = ["train", "test", "unlabeled", "train+unlabeled"]
    two = prepare_dataset("stl10", tmp_path / "dl", tmp_path / "two", splits=splits, workers=2, chunk_files=2)
    for split in planted:
        one, other = _raw(tmp_path / "out" / split), _raw(tmp_path / "two" / split)
        assert [s["x"] for _, s in sorted(one.items())] == [s["x"] for _, s in sorted(other.items())]
    both = _raw(tmp_path / "two" / "train+unlabeled")
    expected = np.concatenate([planted["train"][0], planted["unlabeled"][0]])
    assert two["splits"]["train+unlabeled"]["labelled"] is False and sorted(both) == list(range(7))
    assert all(np.array_equal(_pixels(both[k]["x"]), expected[k]) and "y" not in both[k] for k in range(7))

    unlabelled = StreamingImageDataset(remote=str(tmp_path / "out"), split="unlabeled", image_size=32, batch_size=2)
    assert not unlabelled.has_labels and unlabelled[0][1] == -1
    labelled = StreamingImageDataset(remote=str(tmp_path / "out"), split="train", image_size=32, batch_size=2)
    assert labelled.has_labels and labelled[0][1] == planted["train"][1][0] - 1


def test_stl10_bad_files(tmp_path, capsys):
    _write_stl10(tmp_path / "dl", counts=(("train", 2), ("test", 1)))
    folder = tmp_path / "dl" / "stl10_binary"
    out = ["--out", str(tmp_path / "out"), "--no-progress"]

    line = _error(capsys, ["stl10", "--src", str(folder)] + out)  # the unlabelled split was not written
    assert f"missing from --src: {folder / 'unlabeled_X.bin'}" in line
    argv = ["stl10", "--src", str(folder), "--splits", "train,test"] + out
    x = folder / "train_X.bin"
    good = x.read_bytes()
    x.write_bytes(good[:-100])
    assert f"{x} has {len(good) - 100} bytes, not a multiple of 27648" in _error(capsys, argv)
    x.write_bytes(good)
    (folder / "test_y.bin").write_bytes(bytes([11]))
    assert f"{folder / 'test_y.bin'}: label 11 at position 0 is outside 1..10" in _error(capsys, argv)
    (folder / "test_y.bin").write_bytes(bytes([3, 4]))
    assert "holds 2 labels but" in _error(capsys, argv)
    (folder / "test_y.bin").write_bytes(bytes([3]))
    assert main(argv) == 0
    assert "train: 2 images, 10 classes" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ Tiny-ImageNet

TINY_WNIDS = ["n03444034", "n01443537", "n02124075"]  # wnids.txt's order is not sorted


def _jpeg(path: Path, seed: int, side: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(0, 20, size=(side, side, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path.read_bytes()


def _write_tiny(downloads: Path) -> tuple[Path, dict[bytes, str]]:
    """A tiny-imagenet-200 tree: 2 training images per class, 5 validation images; returns the folder and
    ``{JPEG bytes: wnid}`` of every image."""
    root = downloads / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    words = {"n01443537": "goldfish, Carassius auratus", "n02124075": "Egyptian cat", "n03444034": "go-kart"}
    (root / "words.txt").write_text("n00001740\tentity\n" + "".join(f"{w}\t{n}\n" for w, n in words.items()))
    owner = {}
    for c, wnid in enumerate(TINY_WNIDS):
        for k in range(2):
            owner[_jpeg(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", 10 * c + k)] = wnid
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    val = [("val_0.JPEG", "n02124075"), ("val_1.JPEG", "n03444034"), ("val_2.JPEG", "n02124075")]
    val += [("val_3.JPEG", "n01443537"), ("val_4.JPEG", "n03444034")]
    for k, (name, wnid) in enumerate(val):
        owner[_jpeg(root / "val" / "images" / name, 100 + k)] = wnid
    lines = [f"{name}\t{wnid}\t{k}\t{2 * k}\t{40 + k}\t{50 + k}" for k, (name, wnid) in enumerate(val)]
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _jpeg(root / "test" / "images" / "test_0.JPEG", 999)  # no labels published: not prepared
    return root, owner


def test_tiny_imagenet_train_and_val_share_class_indices(tmp_path):
    root, owner = _write_tiny(tmp_path / "dl")
    manifest = prepare_dataset("tiny-imagenet", tmp_path / "dl", tmp_path / "out", progress=False)

    classes = sorted(TINY_WNIDS)
    assert manifest["classes"] == classes
    assert manifest["class_names"] == ["goldfish, Carassius auratus", "Egyptian cat", "go-kart"]
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 6, "val": 5}
    assert manifest["splits"]["val"]["class_counts"] == {"n01443537": 1, "n02124075": 2, "n03444034": 2}
    for split in ("train", "val"):
        split_manifest = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        assert split_manifest["classes"] == classes
        for sample in _raw(tmp_path / "out" / split).values():
            wnid = owner[sample["x"]]  # stored byte for byte: the source file's pixels exactly
            assert classes[int(sample["y"])] == wnid, split


def test_tiny_imagenet_bad_layouts(tmp_path, capsys):
    root, _ = _write_tiny(tmp_path / "dl")
    argv = ["tiny-imagenet", "--src", str(root), "--out", str(tmp_path / "out"), "--no-progress"]
    images, annotations = root / "val" / "images", root / "val" / "val_annotations.txt"

    (images / "val_3.JPEG").rename(tmp_path / "val_3.JPEG")
    assert f"{annotations} names image(s) missing from {images}: val_3.JPEG" in _error(capsys, argv)
    (tmp_path / "val_3.JPEG").rename(images / "val_3.JPEG")
    _jpeg(images / "val_9.JPEG", 5)
    assert f"image(s) in {images} without a line in {annotations}: val_9.JPEG" in _error(capsys, argv)
    (images / "val_9.JPEG").unlink()
    good = annotations.read_text()
    annotations.write_text(good.replace("val_2.JPEG\tn02124075", "val_2.JPEG\tn09999999"))
    assert f"{annotations}, line 3: WordNet id 'n09999999' is not in wnids.txt" in _error(capsys, argv)
    annotations.write_text(good)
    (root / "train" / "n02124075").rename(tmp_path / "n02124075")
    assert "lacks 1 of the 3 class folders it must hold: n02124075" in _error(capsys, argv)
    (tmp_path / "n02124075").rename(root / "train" / "n02124075")
    (root / "train" / "n00000001").mkdir()
    assert "holds folder(s) not in wnids.txt: n00000001" in _error(capsys, argv)
    (root / "train" / "n00000001").rmdir()
    assert "applies to data sets of pixel arrays" in _error(capsys, argv + ["--format", "png"])
    assert main(argv) == 0


# ------------------------------------------------------------------------------------------------ ImageNet-100


def test_imagenet100_class_list_is_cmcs():
    ids = imagenet100_classes()
    assert len(ids) == 100 == len(set(ids))
    assert all(re.fullmatch(r"n\d{8}", i) for i in ids)
    assert ids[0] == "n02869837" and ids[-1] == "n02090622"  # first and last line of CMC's imagenet100.txt
    from timm.data import ImageNetInfo

    assert set(ids) <= set(ImageNetInfo().label_names())  # all ImageNet-1k synsets


def _write_imagenet(root: Path, classes: list[str], splits=("train", "val")) -> dict[bytes, str]:
    owner = {}
    for s, split in enumerate(splits):
        for c, wnid in enumerate(classes):
            owner[_jpeg(root / split / wnid / f"{wnid}_{s}.JPEG", 1000 * s + c, side=8)] = wnid
    return owner


def test_imagenet100_takes_only_the_100_classes(tmp_path, capsys):
    wnids = imagenet100_classes()
    owner = _write_imagenet(tmp_path / "imagenet", wnids + ["n01440764"])  # tench: an ImageNet-1k class not in it
    manifest = prepare_dataset("imagenet100", tmp_path / "imagenet", tmp_path / "out", progress=False)

    assert manifest["classes"] == sorted(wnids) and manifest["num_classes"] == 100
    assert manifest["class_names"][manifest["classes"].index("n02869837")] == "bonnet, poke bonnet"
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 100, "val": 100}
    for split in ("train", "val"):
        labels = {owner[s["x"]]: int(s["y"]) for s in _raw(tmp_path / "out" / split).values()}
        assert labels == {w: k for k, w in enumerate(sorted(wnids))}  # tench is not there

    (tmp_path / "bad").mkdir()
    _write_imagenet(tmp_path / "bad", sorted(wnids)[3:], splits=("val",))
    _write_imagenet(tmp_path / "bad", wnids, splits=("train",))
    argv = ["imagenet100", "--src", str(tmp_path / "bad"), "--out", str(tmp_path / "o"), "--no-progress"]
    line = _error(capsys, argv)
    missing = ", ".join(sorted(wnids)[:3])
    assert f"{tmp_path / 'bad' / 'val'} lacks 3 of the 100 ImageNet-100 class folders: {missing}" in line

    flat = tmp_path / "flat"
    _write_imagenet(flat, wnids[:1], splits=("train", "val"))
    (flat / "val" / wnids[0] / f"{wnids[0]}_1.JPEG").rename(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    (flat / "val" / wnids[0]).rmdir()
    argv = ["imagenet100", "--src", str(flat), "--out", str(tmp_path / "o"), "--splits", "val", "--no-progress"]
    assert "no class folders (ILSVRC2012's raw validation layout)" in _error(capsys, argv)


# ------------------------------------------------------------------------------------------------ MedMNIST


def _write_medmnist(path: Path, side: int, n_classes: int, seed: int = 2, **drop) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
        images[0] = _asymmetric(side)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = rng.integers(0, n_classes, size=(n, 1)).astype(np.uint8)
    for key in drop:
        arrays.pop(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


@pytest.mark.parametrize(
    "name, side, file", [("bloodmnist", 28, "bloodmnist.npz"), ("pathmnist", 64, "pathmnist_64.npz")]
)
def test_medmnist_native_size_and_labels(tmp_path, name, side, file):
    arrays = _write_medmnist(tmp_path / "dl" / file, side, len(MEDMNIST_CLASSES[name]))
    manifest = prepare_dataset(name, tmp_path / "dl", tmp_path / "out", progress=False)  # the folder holding it

    assert manifest["image_size"] == side and f"native {side} x {side} px" in manifest["notes"][0]
    assert manifest["classes"] == list(MEDMNIST_CLASSES[name])
    assert {s: v["samples"] for s, v in manifest["splits"].items()} == {"train": 6, "val": 3, "test": 4}
    for split in ("train", "val", "test"):
        for k, sample in _raw(tmp_path / "out" / split).items():
            assert np.array_equal(_pixels(sample["x"]), arrays[f"{split}_images"][k])
            assert int(sample["y"]) == arrays[f"{split}_labels"][k, 0]
    first = _pixels(_raw(tmp_path / "out" / "train")[0]["x"])
    step = 255 // (side - 1)
    assert tuple(first[side - 1, 0]) == ((side - 1) * step, 0, 7)


def test_medmnist_bad_files(tmp_path, capsys):
    folder = tmp_path / "dl"
    _write_medmnist(folder / "dermamnist.npz", 28, 7)
    _write_medmnist(folder / "dermamnist_64.npz", 64, 7)
    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    assert "holds 2 sizes (dermamnist.npz, dermamnist_64.npz)" in _error(
        capsys, ["dermamnist", "--src", str(folder)] + out
    )

    bad = folder / "labels.npz"
    _write_medmnist(bad, 28, 9)  # a PathMNIST-like file: labels up to 8, DermaMNIST has 7 classes
    arrays = dict(np.load(bad))
    arrays["train_labels"][0, 0] = 7
    np.savez_compressed(bad, **arrays)
    assert f"{bad} (train_labels): label 7 at position 0 is outside 0..6" in _error(
        capsys, ["dermamnist", "--src", str(bad)] + out
    )
    _write_medmnist(folder / "nokey.npz", 28, 7, val_labels=True)
    line = _error(capsys, ["dermamnist", "--src", str(folder / "nokey.npz")] + out)
    assert "has no val_labels" in line and "not a MedMNIST file" in line
    (folder / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip file")
    assert f"{folder / 'broken.npz'} is not a readable .npz file" in _error(
        capsys, ["dermamnist", "--src", str(folder / "broken.npz")] + out
    )


# ------------------------------------------------------------------------------------------------ output folder


def test_rerun_keeps_adds_splits_refuses_and_overwrites(tmp_path, capsys):
    _write_medmnist(tmp_path / "dl" / "bloodmnist.npz", 28, 8)
    argv = ["bloodmnist", "--src", str(tmp_path / "dl" / "bloodmnist.npz"), "--out", str(tmp_path / "out")]
    assert main(argv + ["--splits", "train"]) == 0
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("shard.*")}
    assert main(argv + ["--splits", "test,train"]) == 0  # adds test; train's chunks are reused
    assert {p: p.stat().st_mtime_ns for p in shards} == shards
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["test", "train"]
    capsys.readouterr()
    assert main(argv + ["--splits", "test"]) == 0
    assert "already prepared" in capsys.readouterr().out

    line = _error(capsys, argv + ["--format", "jpeg", "--no-progress"])
    assert "holds a preparation with other settings (image_format: 'png' there, 'jpeg' now" in line
    assert main(argv + ["--format", "jpeg", "--quality", "80", "--overwrite", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["splits"]) == ["test", "train", "val"] and manifest["options"]["image_format"] == "jpeg"
    stored = next(iter(_raw(tmp_path / "out" / "val").values()))["x"]
    assert Image.open(io.BytesIO(stored)).format == "JPEG"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    argv[-1] = str(tmp_path / "other")
    assert "holds notes.txt: not a data set prepared by this command" in _error(capsys, argv)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(PrepareError, match="unknown data set 'mnist'"):
        prepare_dataset("mnist", tmp_path / "dl", tmp_path / "x")


# ------------------------------------------------------------------------------------------------ unlabelled training


@pytest.fixture
def stl_mds(tmp_path) -> Path:
    _write_stl10(tmp_path / "dl", counts=(("train", 24), ("test", 16), ("unlabeled", 32)))
    prepare_dataset("stl10", tmp_path / "dl", tmp_path / "stl", progress=False)
    return tmp_path / "stl"


def _recipe(tmp_path: Path, stl: Path, **overrides) -> str:
    recipe = tiny_recipe(stl, max_duration="2ba", **overrides)
    recipe["train_data"]["split"] = "unlabeled"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_unlabelled_split_trains_and_label_needing_callbacks_refuse_it(stl_mds, tmp_path, capsys):
    from magma_composer.callbacks.knn_monitor import KNNMonitor
    from magma_composer.callbacks.online_probe import OnlineLinearProbe
    from magma_composer.data.loader import build_image_dataloader
    from magma_composer.train import main as train

    trainer = train([_recipe(tmp_path, stl_mds)])  # pre-training needs no labels
    assert int(trainer.state.timestamp.batch) == 2

    test_data = {"remote": str(stl_mds), "split": "test", "batch_size": 8, "num_workers": 0}
    with pytest.raises(SystemExit) as exit_info:
        train([_recipe(tmp_path, stl_mds, eval_data=test_data, callbacks={"knn_monitor": {"k": [5]}})])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "callbacks.knn_monitor needs labelled images, but its memory bank (the recipe's train_data)" in err
    assert f"{stl_mds} (split unlabeled), has no labels" in err and "set train_data.split to a labelled split" in err

    with pytest.raises(SystemExit):
        train([_recipe(tmp_path, stl_mds, callbacks={"online_probe": {"num_classes": 10}})])
    err = capsys.readouterr().err
    assert "callbacks.online_probe needs labelled images, but the training data (the recipe's train_data)" in err
    assert "(split unlabeled)" in err

    unlabelled = build_image_dataloader(
        remote=str(stl_mds), split="unlabeled", image_size=32, train=False, batch_size=8, num_workers=0
    )
    labelled = build_image_dataloader(
        remote=str(stl_mds), split="test", image_size=32, train=False, batch_size=8, num_workers=0
    )
    with pytest.raises(ValueError, match=r"its queries \(the recipe's eval_data\), .*set eval_data.split"):
        KNNMonitor(labelled, unlabelled)
    with pytest.raises(ValueError, match=r"online_probe needs labelled images, but its test data"):
        OnlineLinearProbe(num_classes=10, test_loader=unlabelled)
    KNNMonitor(labelled, labelled)  # labelled data: accepted
