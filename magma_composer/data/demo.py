"""The built-in demo data set: ten classes of procedurally drawn shapes, written as MDS shards.

Every image is a pure function of ``(seed, split, index)``: no download, the same bytes on every
machine. A class is a shape (disc, square, triangle, ring, cross, bars, stripes, checkerboard,
two dots, diamond); its colour, size, position, rotation, background colour and noise are random, so
the class is not readable from the mean colour alone: raw pixels and an untrained encoder do badly on
kNN, features that capture shape do well.

Usage::

    python -m magma_composer.data.demo --out data/demo          # train (5,000) and test (1,000) splits

The output folder gets ``train/``, ``test/`` and ``manifest.json`` (the options, and whether the data set is
complete). It must be empty or hold a demo data set written here: anything else is refused, never deleted.
Running the command again keeps a complete data set with the same options, and rewrites one that is unfinished
(interrupted) or was written with other options. Exit codes: 0 done, 1 a write failed, 2 bad input,
130 interrupted.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ["CLASSES", "DemoError", "MAX_IMAGE_SIZE", "render", "write_demo_dataset"]

CLASSES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "bars",
    "stripes",
    "checkerboard",
    "two_dots",
    "diamond",
)
_SUPERSAMPLE = 4
_VERSION = 1
_FORMAT = "magma_composer.demo/1"
_MANIFEST = "manifest.json"
_SPLITS = ("train", "test")
PROG = "python -m magma_composer.data.demo"
#: the largest image side: images are drawn at 4x this size, so 512 px already takes 64 MB per image
MAX_IMAGE_SIZE = 512


class DemoError(ValueError):
    """Bad options for the demo data set, or an output folder that holds something else."""


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _contrasting(rng: np.random.Generator, background: tuple[int, int, int]) -> tuple[int, int, int]:
    while True:
        colour = _colour(rng)
        if sum(abs(a - b) for a, b in zip(colour, background)) > 200:
            return colour


def _rotated(points: list[tuple[float, float]], centre: tuple[float, float], angle: float) -> list[tuple[float, float]]:
    cx, cy = centre
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def render(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Draws one image of class ``label`` with the randomness of ``rng``."""
    big = size * _SUPERSAMPLE
    background = _colour(rng)
    fg = _contrasting(rng, background)
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    r = big * rng.uniform(0.22, 0.38)
    cx, cy = big * rng.uniform(0.38, 0.62, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    name = CLASSES[label]
    box = [cx - r, cy - r, cx + r, cy + r]
    if name == "disc":
        draw.ellipse(box, fill=fg)
    elif name == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        draw.polygon(_rotated([(x * 0.85 + cx * 0.15, y * 0.85 + cy * 0.15) for x, y in pts], (cx, cy), angle), fill=fg)
    elif name == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (angle, angle + 2.094, angle + 4.189)]
        draw.polygon(pts, fill=fg)
    elif name == "ring":
        draw.ellipse(box, outline=fg, width=int(r * 0.35))
    elif name == "cross":
        w = r * 0.3
        for dx, dy in ((r, w), (w, r)):
            pts = [(cx - dx, cy - dy), (cx + dx, cy - dy), (cx + dx, cy + dy), (cx - dx, cy + dy)]
            draw.polygon(_rotated(pts, (cx, cy), angle), fill=fg)
    elif name == "bars":  # three thick parallel bars inside the object's box
        for k in (-1, 0, 1):
            off = k * r * 0.66
            pts = [
                (cx - r, cy + off - r * 0.18),
                (cx + r, cy + off - r * 0.18),
                (cx + r, cy + off + r * 0.18),
                (cx - r, cy + off + r * 0.18),
            ]
            draw.polygon(_rotated(pts, (cx, cy), angle), fill=fg)
    elif name == "stripes":  # thin full-image stripes
        period = big * rng.uniform(0.1, 0.16)
        for k in range(-12, 13):
            off = k * period
            pts = [
                (-big, big / 2 + off),
                (2 * big, big / 2 + off),
                (2 * big, big / 2 + off + period / 2),
                (-big, big / 2 + off + period / 2),
            ]
            draw.polygon(_rotated(pts, (big / 2, big / 2), angle), fill=fg)
    elif name == "checkerboard":
        cell = big * rng.uniform(0.14, 0.22)
        n = int(big / cell) + 2
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    draw.rectangle([i * cell, j * cell, (i + 1) * cell, (j + 1) * cell], fill=fg)
    elif name == "two_dots":
        d = r * 0.45
        for sgn in (-1, 1):
            x, y = cx + sgn * r * 0.6 * math.cos(angle), cy + sgn * r * 0.6 * math.sin(angle)
            draw.ellipse([x - d, y - d, x + d, y + d], fill=fg)
    elif name == "diamond":
        pts = [(cx, cy - r), (cx + r * 0.6, cy), (cx, cy + r), (cx - r * 0.6, cy)]
        draw.polygon(_rotated(pts, (cx, cy), angle * 0.25 - 0.4), fill=fg)
    img = img.resize((size, size), Image.LANCZOS)
    noise = rng.normal(0, rng.uniform(4, 16), size=(size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise DemoError(f"{name} must be an integer {bound}, got {value!r}")


def _read_manifest(out: Path) -> dict | None:
    """The demo manifest in ``out`` (older ones lack ``format`` and ``complete``); ``None`` if none is there."""
    try:
        manifest = json.loads((out / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("classes") != list(CLASSES):
        return None
    if "format" not in manifest and "version" in manifest:  # written before the format key existed: complete
        manifest = {**manifest, "format": _FORMAT, "complete": True}
    return manifest if manifest.get("format") == _FORMAT else None


def _check_out(out: str) -> Path:
    """Refuses an ``out`` that is empty, a URL, a file, not writable, or a folder holding anything but a demo set."""
    if not out:
        raise DemoError("--out is empty; give a folder")
    if urllib.parse.urlparse(out).scheme not in ("",) and not os.path.exists(out):
        raise DemoError(f"--out {out}: the demo data set is written to a local folder, not a URL")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DemoError(f"--out {out} is a file; give a folder")
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DemoError(f"--out {out} cannot be created: {probe} is a file")
    try:  # permission bits do not tell for root or read-only mounts: try it
        os.rmdir(tempfile.mkdtemp(prefix=".demo-probe-", dir=probe))
    except OSError as error:
        raise DemoError(f"cannot write --out {out}: {error.strerror or error}") from error
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        ours = set(_SPLITS) | {_MANIFEST, _MANIFEST + ".tmp"}
        foreign = [n for n in names if n not in ours]
        if foreign or (names and _read_manifest(path) is None):
            raise DemoError(
                f"--out {out} holds {', '.join(foreign or names)}, not a demo data set written by this command; "
                f"choose an empty or new folder (nothing there is deleted)"
            )
    return path


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_demo_dataset(
    out: str | Path,
    num_train: int = 5000,
    num_test: int = 1000,
    image_size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes ``out/train`` and ``out/test`` as MDS shards (columns ``x``: JPEG bytes, ``y``: int).

    Idempotent: if ``out/manifest.json`` records a complete data set with the same options, nothing is rewritten.

    Args:
        out: the output folder: new, empty, or holding a demo data set written here.
        num_train: training images (at least 1).
        num_test: test images (at least 1).
        image_size: image side in pixels, 1 to ``MAX_IMAGE_SIZE``.
        seed: a non-negative integer; every image is a function of ``(seed, split, index)``.
        overwrite: rewrite a complete demo data set with the same options.
        progress: show progress bars.

    Returns:
        The output folder.

    Raises:
        DemoError: a bad option, or an ``out`` that is a file, cannot be written, or holds anything else.
        OSError: a write fails part-way (a full disk); running again rewrites the data set.
    """
    _check_int("--train", num_train, 1)
    _check_int("--test", num_test, 1)
    _check_int("--image-size", image_size, 1, MAX_IMAGE_SIZE)
    _check_int("--seed", seed, 0)
    out = _check_out(os.fspath(out))
    options = {
        "version": _VERSION,
        "num_train": num_train,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
        "classes": list(CLASSES),
    }
    existing = _read_manifest(out) if out.is_dir() else None
    if existing is not None and existing.get("complete") and not overwrite:
        if {k: existing.get(k) for k in options} == options:
            if progress:
                print(f"demo data set already at {out} (same options): kept")
            return out
    from streaming import MDSWriter  # imports torch: after the checks

    out.mkdir(parents=True, exist_ok=True)
    manifest = out / _MANIFEST
    _write_json(manifest, {"format": _FORMAT, "complete": False, **options})  # the folder is ours from here on
    for split in _SPLITS:
        if (out / split).exists():
            shutil.rmtree(out / split)
    for split_index, (split, count) in enumerate(zip(_SPLITS, (num_train, num_test))):
        with MDSWriter(out=str(out / split), columns={"x": "bytes", "y": "int"}, size_limit=1 << 24) as writer:
            for i in tqdm(range(count), desc=f"demo {split}", disable=not progress):
                rng = np.random.default_rng([seed, split_index, i])
                label = i % len(CLASSES)
                writer.write({"x": _jpeg(render(label, rng, image_size)), "y": label})
    _write_json(manifest, {"format": _FORMAT, "complete": True, **options})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (bad input exits with 2 through argparse)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (gets train/, test/ and manifest.json)")
    parser.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument(
        "--image-size", type=int, default=32, help=f"image side in pixels, 1-{MAX_IMAGE_SIZE} (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="a non-negative seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite even if the same data set is there")
    args = parser.parse_args(argv)
    try:
        write_demo_dataset(args.out, args.train, args.test, args.image_size, args.seed, args.overwrite)
    except DemoError as error:
        parser.error(str(error))  # exits with code 2
    except OSError as error:
        where = f": {os.fsdecode(error.filename)}" if error.filename is not None else ""
        print(f"{PROG}: error: cannot write the demo data set: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to finish the data set", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
