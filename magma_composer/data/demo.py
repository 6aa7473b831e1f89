"""The built-in demo data set: ten classes of procedurally drawn shapes, written as MDS shards.

Every image is a pure function of ``(seed, split, index)``: no download, the same bytes on every
machine. A class is a shape (disc, square, triangle, ring, cross, bars, stripes, checkerboard,
two dots, diamond); its colour, size, position, rotation, background colour and noise are random, so
the class is not readable from the mean colour alone: raw pixels and an untrained encoder do badly on
kNN, features that capture shape do well.

Usage::

    python -m magma_composer.data.demo --out data/demo          # train (5,000) and test (1,000) splits
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ["CLASSES", "render", "write_demo_dataset"]

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

    Idempotent: if ``out/manifest.json`` records the same options, nothing is rewritten.

    Returns:
        The output folder.
    """
    from streaming import MDSWriter

    out = Path(out)
    options = {
        "version": _VERSION,
        "num_train": num_train,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
        "classes": list(CLASSES),
    }
    manifest = out / "manifest.json"
    if manifest.exists() and not overwrite:
        try:
            if json.loads(manifest.read_text()) == options:
                if progress:
                    print(f"demo data set already at {out} (same options): kept")
                return out
        except json.JSONDecodeError:
            pass
    for split in ("train", "test"):
        if (out / split).exists():
            shutil.rmtree(out / split)
    if manifest.exists():
        manifest.unlink()
    for split_index, (split, count) in enumerate((("train", num_train), ("test", num_test))):
        with MDSWriter(out=str(out / split), columns={"x": "bytes", "y": "int"}, size_limit=1 << 24) as writer:
            for i in tqdm(range(count), desc=f"demo {split}", disable=not progress):
                rng = np.random.default_rng([seed, split_index, i])
                label = i % len(CLASSES)
                writer.write({"x": _jpeg(render(label, rng, image_size)), "y": label})
    manifest.write_text(json.dumps(options, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (gets train/, test/ and manifest.json)")
    parser.add_argument("--train", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite even if the same data set is there")
    args = parser.parse_args(argv)
    for name in ("train", "test", "image_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    write_demo_dataset(args.out, args.train, args.test, args.image_size, args.seed, args.overwrite)


if __name__ == "__main__":
    main()
