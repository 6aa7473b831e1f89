"""``python -m magma_composer.pca fit|info``: fit a PCA basis from MDS shards, or describe a basis file.

Examples:
    python -m magma_composer.pca fit --data /data/cifar10-mds --split train --image-size 32 --out c10-32.pt
    python -m magma_composer.pca fit --data s3://bucket/imagenet --split train --image-size 224 \\
        --components 2048 --max-images 200000 --num-workers 8 --out in1k-224-k2048.pt
    composer -n 8 -m magma_composer.pca fit ...      # each rank reads its own shards
    python -m magma_composer.pca info c10-32.pt
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from magma_composer.pca.basis import load_basis
from magma_composer.pca.fit import METHODS, fit_basis


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m magma_composer.pca", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a basis from MDS image shards")
    fit.add_argument("--data", required=True, help="local folder or URI (s3://...) of MDS shards")
    fit.add_argument("--split", default=None, help="sub-folder of --data, e.g. train")
    fit.add_argument("--image-size", type=int, required=True, help="image side S in pixels (D = 3 S^2)")
    fit.add_argument("--components", type=int, default=None, help="K (default min(N, D) for the exact method)")
    fit.add_argument("--out", required=True, help="basis file to write (.pt)")
    fit.add_argument("--method", choices=METHODS, default="auto", help="exact up to D = 16,384 with auto")
    fit.add_argument("--batch-size", type=int, default=256)
    fit.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    fit.add_argument("--oversample", type=int, default=None, help="randomized: extra directions (max(16, K/10))")
    fit.add_argument("--power-iters", type=int, default=2, help="randomized: power iterations (passes = 2 + this)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--num-workers", type=int, default=0, help="JPEG-decoding processes per rank")
    fit.add_argument("--local", default=None, help="cache folder for remote shards")
    fit.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    fit.add_argument("--no-progress", action="store_true", help="no progress bars")
    info = sub.add_parser("info", help="check a basis file and print what it holds")
    info.add_argument("basis")
    return parser


def _init_distributed() -> bool:
    """Joins the process group when launched by ``composer -n N`` / ``torchrun`` (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        print(load_basis(args.basis).summary())
        return 0
    started = _init_distributed()
    try:
        basis = fit_basis(
            args.data,
            image_size=args.image_size,
            components=args.components,
            out=args.out,
            split=args.split,
            method=args.method,
            batch_size=args.batch_size,
            max_images=args.max_images,
            oversample=args.oversample,
            power_iters=args.power_iters,
            seed=args.seed,
            num_workers=args.num_workers,
            local=args.local,
            device=args.device,
            progress=not args.no_progress,
        )
    finally:
        if started:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{args.out}: {basis.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
