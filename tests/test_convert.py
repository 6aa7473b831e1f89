"""ImageFolder -> MDS conversion: real files in, real shards out, read back with streaming."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from streaming import StreamingDataset
from torchvision.datasets import ImageFolder

import magma_composer.data.convert as convert
from magma_composer.data.convert import (
    BadImageError,
    ConversionError,
    convert_image_folder,
    list_image_folder,
    main,
)
from magma_composer.data.dataset import StreamingImageDataset
from tests.conftest import REPO
from tests.s3_server import SYNTHETIC_KINDS, write_synthetic_tree

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _samples(folder) -> dict[int, dict]:
    """Every sample of an MDS folder, by its ``i`` column."""
    dataset = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    samples = [dataset[k] for k in range(dataset.num_samples)]
    by_id = {int(s["i"]): s for s in samples}
    assert len(by_id) == len(samples)
    return by_id


def _shard_hashes(folder) -> list:
    index = json.loads((folder / "index.json").read_text())
    return [(s["raw_data"]["basename"], s["raw_data"]["hashes"]["sha1"], s["samples"]) for s in index["shards"]]


def test_synthetic_tree_every_kind_of_image(tmp_path):
    listing = write_synthetic_tree(tmp_path / "src")
    manifest = convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)

    assert manifest["classes"] == ["ant", "bee", "cat"]
    assert manifest["class_counts"] == {"ant": 16, "bee": 16, "cat": 16}
    assert manifest["samples"] == 48 and manifest["ignored_files"] == 3 and manifest["num_skipped"] == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    folder = ImageFolder(str(tmp_path / "src"))  # the same classes, files and order as torchvision's
    assert folder.classes == manifest["classes"]
    assert [(os.path.relpath(p, tmp_path / "src"), y) for p, y in folder.samples] == [(r, y) for r, y, _ in listing]
    samples = _samples(tmp_path / "out")
    assert sorted(samples) == list(range(48))
    reencoded = 0
    for i, (rel, label, kind) in enumerate(listing):
        sample = samples[i]
        assert int(sample["y"]) == label, rel
        source_bytes = (tmp_path / "src" / rel).read_bytes()
        mode, fmt, _ = SYNTHETIC_KINDS[kind]
        if (mode, fmt) == ("RGB", "JPEG"):
            assert sample["x"] == source_bytes, f"{rel}: an RGB JPEG must be stored verbatim"
            continue
        reencoded += 1
        stored = Image.open(io.BytesIO(sample["x"]))
        assert stored.format == "JPEG" and stored.mode == "RGB", rel
        expected = np.asarray(Image.open(tmp_path / "src" / rel).convert("RGB"), dtype=np.float64)
        got = np.asarray(stored, dtype=np.float64)
        assert got.shape == expected.shape, rel
        tolerance = 10 if mode == "P" else 4  # JPEG at quality 90 of smooth waves (16-colour bands: sharper edges)
        assert np.abs(got - expected).mean() < tolerance, rel
    assert manifest["reencoded"] == reencoded == 30

    images = StreamingImageDataset(remote=str(tmp_path / "out"), image_size=16, train=False, batch_size=4)
    image, label = images[5]
    assert tuple(image.shape) == (3, 16, 16) and label == listing[5][1]


def test_cli_workers_resize_compression_deterministic(tmp_path):
    write_synthetic_tree(tmp_path / "src", per_class=10)
    in_process = convert_image_folder(
        tmp_path / "src",
        tmp_path / "one",
        resize=40,
        quality=80,
        shard_size="6kb",
        compression="zstd",
        progress=False,
    )
    cmd = [sys.executable, "-m", "magma_composer.data.convert", "--src", str(tmp_path / "src")]
    cmd += ["--out", str(tmp_path / "two"), "--workers", "2", "--resize", "40", "--quality", "80"]
    cmd += ["--shard-size", "6kb", "--compression", "zstd", "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 30 images in 3 classes" in proc.stdout

    # the same shards, byte for byte, whatever the number of workers
    assert _shard_hashes(tmp_path / "one") == _shard_hashes(tmp_path / "two")
    assert len(_shard_hashes(tmp_path / "one")) > 3
    index = json.loads((tmp_path / "two" / "index.json").read_text())
    assert {s["compression"] for s in index["shards"]} == {"zstd"}
    assert all(s["zip_data"]["basename"].endswith(".mds.zstd") for s in index["shards"])
    assert in_process["reencoded"] == 30 and in_process["options"]["resize"] == 40
    for sample in _samples(tmp_path / "two").values():
        assert min(Image.open(io.BytesIO(sample["x"])).size) == 40


def test_resume_after_interruption(tmp_path, monkeypatch):
    import magma_composer.data.convert as convert

    listing = write_synthetic_tree(tmp_path / "src", per_class=10)
    bad = tmp_path / "src" / listing[17][0]  # in the fourth chunk of 5 files
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated: an interrupted copy

    with pytest.raises(BadImageError, match=str(bad)):
        convert_image_folder(tmp_path / "src", tmp_path / "out", chunk_files=5, progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["chunk-00000", "chunk-00001", "chunk-00002", "conversion.json"]
    assert all((out / f"chunk-0000{k}" / "done.json").is_file() for k in range(3))
    assert not (out / "index.json").exists()  # nothing readable until the conversion is complete
    finished = {p: p.stat().st_mtime_ns for p in out.glob("chunk-*/shard.*")}

    bad.write_bytes(good_bytes)
    written = []
    original = convert._write_chunk
    monkeypatch.setattr(
        convert, "_write_chunk", lambda folder, *a, **k: written.append(folder.name) or original(folder, *a, **k)
    )
    manifest = convert_image_folder(tmp_path / "src", out, chunk_files=5, progress=False)
    assert written == [f"chunk-{k:05d}" for k in range(3, 6)]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished chunks were not rewritten
    assert manifest["samples"] == 30 and manifest["chunks"] == 6

    # a chunk killed half-way (no marker, a cut shard) is rewritten; the result equals a fresh conversion
    (out / "chunk-00004" / "done.json").unlink()
    shard = out / "chunk-00004" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "index.json").unlink()
    written.clear()
    convert_image_folder(tmp_path / "src", out, chunk_files=5, progress=False)
    assert written == ["chunk-00004"]
    convert_image_folder(tmp_path / "src", tmp_path / "fresh", chunk_files=5, progress=False)
    assert [h[1:] for h in _shard_hashes(out)] == [h[1:] for h in _shard_hashes(tmp_path / "fresh")]
    assert sorted(_samples(out)) == list(range(30))

    # rerunning with other options is refused rather than mixing two conversions
    with pytest.raises(ConversionError, match="different options"):
        convert_image_folder(tmp_path / "src", out, chunk_files=5, quality=70, resize=20, progress=False)


def test_bad_image_error_and_skip_bad(tmp_path, capsys):
    listing = write_synthetic_tree(tmp_path / "src", per_class=6)
    bad = tmp_path / "src" / listing[7][0]
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")

    argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "a"), "--chunk-files", "4", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot read image" in err and str(bad) in err and "--skip-bad" in err
    assert not (tmp_path / "a" / "index.json").exists()

    # the natural next step: the same command with --skip-bad
    assert (tmp_path / "a" / "chunk-00000" / "done.json").is_file()  # files 0-3 were done before the bad one
    assert main(argv + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert f"skipped: {listing[7][0]}" in captured.out and "skipped unreadable image" in captured.err
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["num_skipped"] == 1 and manifest["skipped"][0]["path"] == listing[7][0]
    assert manifest["samples"] == 17 and manifest["listed_files"] == 18 and manifest["chunks"] == 5
    assert sorted(_samples(tmp_path / "a")) == [i for i in range(18) if i != 7]  # ids keep the source order


def test_empty_class_folder(tmp_path, capsys):
    write_synthetic_tree(tmp_path / "src", per_class=4)
    (tmp_path / "src" / "bat").mkdir()
    (tmp_path / "src" / "bat" / "readme.txt").write_text("no images here")

    with pytest.raises(SystemExit) as exit_info:
        main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "a"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "src" / "bat") in err and "--allow-empty-classes" in err

    manifest = convert_image_folder(tmp_path / "src", tmp_path / "b", allow_empty_classes=True, progress=False)
    assert manifest["classes"] == ["ant", "bat", "bee", "cat"] and manifest["empty_classes"] == ["bat"]
    assert manifest["class_counts"] == {"ant": 4, "bat": 0, "bee": 4, "cat": 4}
    labels = sorted({int(s["y"]) for s in _samples(tmp_path / "b").values()})
    assert labels == [0, 2, 3]  # bee and cat keep the indices they have next to an empty 'bat'


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: --src, --out"),
        (["--src", "{tmp}/missing", "--out", "{tmp}/o"], "missing does not exist"),
        (["--src", "{tmp}/flat", "--out", "{tmp}/o"], "outside any class folder: a.jpg"),
        (["--src", "{tmp}/nothing", "--out", "{tmp}/o"], "has no class folders"),
        (["--src", "{tmp}/src", "--out", "{tmp}/o", "--shard-size", "lots"], "--shard-size 'lots' is not a size"),
        (["--src", "{tmp}/src", "--out", "{tmp}/o", "--compression", "zip9"], "--compression 'zip9' is not valid"),
        (["--src", "{tmp}/src", "--out", "{tmp}/o", "--quality", "0"], "--quality must be an integer from 1 to 95"),
        (["--src", "{tmp}/src", "--out", "{tmp}/o", "--workers", "0"], "--workers must be a positive integer"),
        (["--src", "{tmp}/src", "--out", "{tmp}/src"], "lies inside --src"),
        (["--src", "{tmp}/src", "--out", "{tmp}/flat"], "is not empty and was not written by this converter"),
        (["--src", "{tmp}/src", "--out", "{tmp}/o", "--staging", "{tmp}/s"], "only used with a remote --out"),
        (["--src", "{tmp}/src", "--out", "gs://bucket/x"], "local folders and s3:// URLs only"),
    ],
)
def test_bad_command_line_exits_2(tmp_path, capsys, argv, message):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    (tmp_path / "nothing").mkdir()
    write_synthetic_tree(tmp_path / "src", per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_missing_src_exits_2_as_a_process():
    proc = subprocess.run(
        [sys.executable, "-m", "magma_composer.data.convert", "--out", "x"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--src" in proc.stderr


def test_real_cifar_jpegs_stored_verbatim(cifar_jpegs, tmp_path):
    listing = list_image_folder(cifar_jpegs / "train")
    manifest = convert_image_folder(cifar_jpegs / "train", tmp_path / "out", workers=2, progress=False)
    assert manifest["samples"] == len(listing.files) == 200 and manifest["reencoded"] == 0
    assert manifest["classes"] == sorted(p.name for p in (cifar_jpegs / "train").iterdir())
    samples = _samples(tmp_path / "out")
    for i, (rel, label) in enumerate(listing.files):
        source = (cifar_jpegs / "train" / rel).read_bytes()
        assert hashlib.sha1(samples[i]["x"]).digest() == hashlib.sha1(source).digest(), rel
        assert int(samples[i]["y"]) == label == manifest["classes"].index(rel.split("/")[0])
    dataset = StreamingImageDataset(remote=str(tmp_path / "out"), image_size=32, batch_size=10, shuffle=True)
    images = [dataset[k] for k in range(10)]
    assert all(tuple(x.shape) == (3, 32, 32) for x, _ in images)


def _sigterm_and_sigint_handlers() -> tuple[str, str]:
    return str(signal.getsignal(signal.SIGTERM)), str(signal.getsignal(signal.SIGINT))


def test_pool_workers_do_not_inherit_the_parents_signal_handlers():
    """Pool.terminate must be able to kill a converter worker wherever it waits (Composer's SIGTERM handler is
    installed in this process by importing composer)."""
    import composer  # noqa: F401

    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # what a plain fork would inherit
    with multiprocessing.get_context("fork").Pool(1, convert._pool_worker_init) as pool:
        assert pool.apply(_sigterm_and_sigint_handlers) == (str(signal.SIG_DFL), str(signal.SIG_IGN))


def _png(path, seed: int, size: int = 16) -> None:
    """A smooth picture (a colour per seed and a ramp): JPEG keeps it within a few levels."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 60, size)[None, :, None]
    pixels = np.clip(rng.integers(40, 190, size=3)[None, None, :] + ramp, 0, 255).repeat(size, 0).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def test_unlabelled_folder(tmp_path, capsys):
    flat = tmp_path / "flat"
    for k in range(3):
        _png(flat / f"img_{k}.png", seed=k)
    argv = ["--src", str(flat), "--out", str(tmp_path / "a"), "--no-progress"]

    # a folder of images without sub-folders says what it found and how to use it
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "outside any class folder: img_0.png, img_1.png, img_2.png" in err
    assert "no sub-folders at all: to use these 3 images without labels" in err and "--unlabelled" in err

    assert main(argv + ["--unlabelled"]) == 0
    assert "wrote 3 images in no classes (unlabelled: no 'y' column" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["labelled"] is False and manifest["classes"] == [] and manifest["samples"] == 3
    assert manifest["columns"] == {"x": "bytes", "i": "int"} and manifest["options"]["unlabelled"] is True
    samples = _samples(tmp_path / "a")
    assert sorted(samples) == [0, 1, 2] and all("y" not in s for s in samples.values())
    for k, sample in samples.items():  # re-encoded as JPEG: close to the source's pixels, in the listing's order
        got = np.asarray(Image.open(io.BytesIO(sample["x"])), dtype=np.float64)
        expected = np.asarray(Image.open(flat / f"img_{k}.png"), dtype=np.float64)
        assert got.shape == expected.shape and np.abs(got - expected).mean() < 4
        others = [np.abs(got - np.asarray(Image.open(flat / f"img_{j}.png"))).mean() for j in range(3) if j != k]
        assert np.abs(got - expected).mean() < min(others)
    images = StreamingImageDataset(remote=str(tmp_path / "a"), image_size=8, train=False, batch_size=2)
    assert not images.has_labels and images[2][1] == -1

    # sub-folders too, when asked: their names are not used as classes
    nested = tmp_path / "nested"
    _png(nested / "top.png", seed=5)
    _png(nested / "b" / "c" / "deep.png", seed=6)
    _png(nested / "a" / "x.png", seed=7)
    listing = list_image_folder(nested, unlabelled=True)
    assert listing.files == [("top.png", -1), ("a/x.png", -1), ("b/c/deep.png", -1)] and not listing.labelled
    with pytest.raises(ConversionError, match="has no effect with --unlabelled"):
        convert_image_folder(nested, tmp_path / "b", unlabelled=True, allow_empty_classes=True, progress=False)
    assert convert_image_folder(nested, tmp_path / "b", unlabelled=True, progress=False)["samples"] == 3
