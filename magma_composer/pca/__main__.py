"""``python -m magma_composer.pca fit|stats|info``: fit a PCA basis or pixel statistics from MDS shards, or
describe such a file.

Examples:
    python -m magma_composer.pca fit --data /data/cifar10-mds --split train --image-size 32 --out c10-32.pt
    python -m magma_composer.pca fit --data s3://bucket/imagenet --split train --image-size 224 \\
        --components 2048 --max-images 200000 --num-workers 8 --out in1k-224-k2048.pt
    python -m magma_composer.pca fit --data /data/in-4k --image-size 224 --components 1024 --out in4k-224.pt
    composer -n 8 -m magma_composer.pca fit ...      # each rank reads its own shards
    python -m magma_composer.pca stats --data /data/cifar10-mds --split train --image-size 32 --out c10-32-stats.pt
    python -m magma_composer.pca info c10-32.pt

At ``D > 16,384`` and one rank, ``--method auto`` fits exactly through the images' Gram matrix (one pass; the
images kept in memory, ``N x D`` bytes) when that costs less than the randomized method, e.g. 4,096 images at
224 px with ``--components 1024``; otherwise randomized (``2 + --power-iters`` passes, only the first decoding
the images when they fit ``--cache-gib``).

``stats`` computes only the per-pixel mean and standard deviation (one pass, the fit's first), for the data
sets' ``normalize: pixel``; it takes the fit's data options and runs on several ranks the same way.

Exit status: 0 on success; 2 for a bad command line (any option, ``--data``/``--split`` that do not name a
readable MDS data set, an ``--out`` that is a directory, cannot be written or exists without ``--overwrite``,
an ``info`` file that is missing, neither a basis nor statistics, or corrupted), found before any image is
read; 1 when the work fails (a shard cannot be read, the images are unusable, the file cannot be written).
Either way the error is one line, ``<prog>: error: ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from composer.devices import DeviceGPU
from composer.utils import dist

from magma_composer.options import OptionError, check_number
from magma_composer.pca.basis import describe_file
from magma_composer.pca.fit import METHODS, compute_pixel_stats, fit_basis, resolve_device

#: Seconds a rank waits in a collective for the others (ranks stream their own shards between collectives).
DIST_TIMEOUT = 1800.0


def _add_data_options(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The options ``fit`` and ``stats`` share: where the images are, how they are read, where the file goes."""
    parser.add_argument("--data", required=True, help="local folder or URI (s3://...) of MDS shards")
    parser.add_argument("--split", default=None, help="sub-folder of --data, e.g. train")
    parser.add_argument("--image-size", type=int, required=True, help="image side S in pixels (D = 3 S^2)")
    parser.add_argument("--out", required=True, help=f"{out_help}; an existing file needs --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="JPEG-decoding processes per rank (default: the rank's share of the cores; 0 below 1,024 images)",
    )
    parser.add_argument("--local", default=None, help="cache folder for remote shards")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--dist-timeout", type=float, default=DIST_TIMEOUT, help="seconds a rank waits for the others (several ranks)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m magma_composer.pca", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a basis from MDS image shards")
    _add_data_options(fit, "basis file to write (.pt)")
    fit.add_argument("--components", type=int, default=None, help="K (default min(N, D) for the exact method)")
    fit.add_argument(
        "--method",
        default="auto",
        help=f"one of {', '.join(METHODS)}; auto is exact up to D = 16,384, above it gram or randomized (cheaper)",
    )
    fit.add_argument("--oversample", type=int, default=None, help="randomized: extra directions (max(16, K/10))")
    fit.add_argument("--power-iters", type=int, default=2, help="randomized: power iterations (passes = 2 + this)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument(
        "--cache-gib",
        type=float,
        default=None,
        help="GiB for the decoded images kept between passes (default: a quarter of the memory, at most 8)",
    )
    stats = sub.add_parser("stats", help="per-pixel mean and std only (for normalize: pixel), one pass")
    _add_data_options(stats, "statistics file to write (.pt)")
    info = sub.add_parser("info", help="check a basis or statistics file and print what it holds")
    info.add_argument("basis", help="a file written by fit or stats")
    return parser


def _init_distributed(device: torch.device, timeout: float) -> bool:
    """Joins the process group when launched by ``composer -n N`` / ``torchrun`` (WORLD_SIZE > 1).

    Returns:
        bool: whether this call initialised it (and should tear it down).
    """
    check_number("dist_timeout", timeout, 0.0, open_min=True)
    if dist.get_world_size() <= 1 or dist.is_initialized():
        return False
    # TF32 would round the fit's float32 products to 10 mantissa bits
    dist.initialize_dist(DeviceGPU(allow_tf32=False) if device.type == "cuda" else "cpu", timeout=timeout)
    return True


def _data_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of the options :func:`_add_data_options` defines (all but ``--dist-timeout``)."""
    return {
        "image_size": args.image_size,
        "out": args.out,
        "split": args.split,
        "batch_size": args.batch_size,
        "max_images": args.max_images,
        "num_workers": args.num_workers,
        "local": args.local,
        "device": args.device,
        "progress": not args.no_progress,
        "overwrite": args.overwrite,
    }


def _run(args: argparse.Namespace) -> int:
    """``fit`` or ``stats``, on every rank of a launch (the process group joined and left here)."""
    started = _init_distributed(resolve_device(args.device), args.dist_timeout)
    try:
        if args.command == "fit":
            summary = fit_basis(
                args.data,
                components=args.components,
                method=args.method,
                oversample=args.oversample,
                power_iters=args.power_iters,
                seed=args.seed,
                cache_gib=args.cache_gib,
                **_data_options(args),
            ).summary()
        else:
            compute_pixel_stats(args.data, **_data_options(args))
            summary = describe_file(args.out) if dist.get_global_rank() == 0 else ""
    finally:
        if started:
            # torch 2.7's gloo group joins its threads holding the GIL, which a thread still releasing the last
            # collective's tensors needs (pytorch#154976): let it finish first, or the rank hangs at exit
            time.sleep(0.2)
            torch.distributed.destroy_process_group()
    if dist.get_global_rank() == 0:
        print(f"{args.out}: {summary}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (argparse itself exits with 2 on unparsable input)."""
    args = _parser().parse_args(argv)
    prog = f"python -m magma_composer.pca {args.command}"
    try:
        if args.command == "info":
            try:
                print(describe_file(args.basis))
            except (OSError, ValueError) as e:  # the file named on the command line is unusable
                raise OptionError("basis", str(e)) from e
            return 0
        return _run(args)
    except OptionError as e:
        if dist.get_global_rank() == 0:  # every rank refuses the same input; one line is enough
            flag = "" if e.key == "basis" else f"--{e.key.replace('_', '-')}: "
            print(f"{prog}: error: {flag}{e.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as e:  # the work failed: storage, data, the device
        where = f" (rank {dist.get_global_rank()})" if dist.get_world_size() > 1 else ""
        print(f"{prog}: error{where}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
