"""Frozen features for two poolings: one forward pass for both against one pass per pooling.

The evidence matrix evaluates every encoder on the CLS token and on the mean of the patch tokens. Both come
from the same forward pass; this benchmark measures what extracting them together
(:func:`magma_composer.evaluate.features.extract_pooled_features`) saves against one
:func:`~magma_composer.evaluate.features.extract_features` call per pooling, on real MDS shards read as the
evaluation reads them (``build_image_dataloader(train=False, return_index=True)``), with a ViT-T/4 encoder at
32 px in the evaluation's default precision. The two ways take turns (the order alternating; one warm-up turn
discarded); printed: the median time of each and the median of the per-turn ratios. The features of the two
ways are compared too: they must be equal bit for bit.

Usage::

    python bench/eval_pools.py --data data/cifar10-mds --samples 2000 --repeats 3 --json runs/bench-eval-pools.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from magma_composer.checkpoints import export_encoder  # noqa: E402
from magma_composer.data.loader import build_image_dataloader  # noqa: E402
from magma_composer.evaluate.encoders import load_encoder  # noqa: E402
from magma_composer.evaluate.features import extract_features, extract_pooled_features  # noqa: E402
from magma_composer.models import ComposerMAE  # noqa: E402

POOLS = ("cls", "mean")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/cifar10-mds", help="MDS data set with a test split")
    parser.add_argument("--samples", type=int, default=2000, help="test images per pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed turns per way (after one warm-up turn)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "test" / "index.json").is_file():
        parser.error(f"--data: {args.data} has no MDS split 'test'")
    torch.manual_seed(0)
    vit_t = {"embed_dim": 192, "depth": 12, "num_heads": 3}
    model = ComposerMAE(encoder=vit_t, img_size=32, patch_size=4, decoder_dim=128, decoder_depth=2, decoder_heads=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder.pt"
        export_encoder(model, str(path))
        encoder = load_encoder(str(path))
    loader = build_image_dataloader(
        250, num_workers=0, train=False, return_index=True, remote=args.data, split="test", image_size=32,
        max_samples=args.samples, shuffle=False,
    )  # fmt: skip

    def separate() -> dict:
        return {pool: extract_features(encoder, loader, pool) for pool in POOLS}

    def together() -> dict:
        return extract_pooled_features(encoder, loader, POOLS)

    ways = {"one pass per pooling": separate, "one pass for both": together}
    times: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, dict] = {}
    try:
        for turn in range(args.repeats + 1):
            order = list(ways) if turn % 2 == 0 else list(reversed(ways))
            for name in order:
                start = time.perf_counter()
                outputs[name] = ways[name]()
                if turn > 0:  # the first turn warms up
                    times[name].append(time.perf_counter() - start)
    finally:
        loader.dataset.release()
    a, b = outputs["one pass per pooling"], outputs["one pass for both"]
    equal = all(torch.equal(a[p][0], b[p][0]) and torch.equal(a[p][1], b[p][1]) for p in POOLS)
    ratios = [s / t for s, t in zip(times["one pass per pooling"], times["one pass for both"])]
    result = {
        "samples": args.samples,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "all_seconds": times,
        "ratio_median": statistics.median(ratios),
        "features_equal": equal,
    }
    for name, t in result["seconds"].items():
        print(f"{name:22} {t:7.2f} s for {args.samples} images, two poolings")
    print(f"ratio (per-pooling / together, median of {len(ratios)} turns): {result['ratio_median']:.2f}x; "
          f"features equal bit for bit: {equal}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
