"""How much of an encoder's gain over its initialisation is the evaluation's own noise?

    python experiments/eval_noise.py --init runs/evidence/encoders/mae-s0-init.pt \\
        --trained runs/evidence/encoders/mae-s0.pt --data data/cifar10-mds \\
        [--protocol heldout --protocol l2=1e-4 --protocol folds=5 ...] [--test-samples 5000 --test-samples 0] \\
        [--pool mean --pool cls] [--draws 10] [--train-samples 10000] [--basis FILE] [--cache DIR]

Features of both encoders are extracted once for every training and test image (cached in ``--cache``), then each
draw ``d`` (``torch.Generator`` seeded ``1000 + d``) takes ``--train-samples`` random training images (the kNN bank
and the probe's training set) and ``--test-samples`` random test images (0: all of them), and every protocol scores
both encoders on those images. Printed per pooling, protocol and test size: the gain (trained - init, top-1 points)
on each draw, its mean and standard deviation over the draws. The draws change only which images evaluate the
encoders, so that standard deviation is the evaluation's share of a gain's spread over seeds.

Protocols: ``heldout`` (the fast linear probe, l2 chosen from ``--l2`` on a held-out tenth), ``folds=F`` (l2
chosen by F-fold cross-validation), ``l2=V`` (one l2), ``knn`` (kNN@10, cosine, T = 0.07).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

DEFAULT_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class NoiseError(ValueError):
    """A user's mistake: printed as one line, exit status 2."""


def parse_protocol(text: str, grid: list[float]) -> tuple[str, object]:
    """``'heldout'``, ``'knn'``, ``'folds=F'`` or ``'l2=V'`` -> ``(name, runner)`` with ``runner.run(...)``."""
    from magma_composer.evaluate.knn import KNNProtocol
    from magma_composer.evaluate.linear import FastLinearProbe
    from magma_composer.options import OptionError

    key, _, value = text.partition("=")
    try:
        if text == "heldout":
            return text, FastLinearProbe(l2=grid, val_fraction=0.1)
        if text == "knn":
            return "knn@10", KNNProtocol(k=[10], temperature=[0.07], distance=["cosine"])
        if key == "folds" and value.isdigit():
            return text, FastLinearProbe(l2=grid, folds=int(value))
        if key == "l2":
            return text, FastLinearProbe(l2=float(value))
    except (OptionError, ValueError) as exc:
        raise NoiseError(f"--protocol {text}: {getattr(exc, 'message', exc)}") from None
    raise NoiseError(f"--protocol: {text!r} is not a protocol; give heldout, knn, folds=F or l2=V")


def top1(runner: object, train: tuple, test: tuple) -> float:
    result = runner.run(train[0], train[1], test[0], test[1])
    if "grid" in result:  # kNN: the one (k, T, distance) asked for
        return result["grid"][0]["top1"]
    return result["top1"]


def features(path: str, basis: str | None, data: str, pools: list[str], cache: str) -> dict:
    """``{(split, pool): (features, labels)}`` of every image of both splits."""
    import torch

    from magma_composer.data.loader import build_image_dataloader
    from magma_composer.evaluate.encoders import load_encoder
    from magma_composer.evaluate.features import cached_pooled_features

    if not Path(path).is_file():
        raise NoiseError(f"{path} does not exist")
    encoder = load_encoder(path, basis=basis)
    out = {}
    for split in ("train", "test"):
        options = {"remote": data, "split": split, "image_size": encoder.arch["img_size"]}
        if basis is not None:
            options["normalize"] = "none"
        loader = build_image_dataloader(batch_size=250, num_workers=0, train=False, return_index=True,
                                        cache_tag=f"eval-noise-{split}", **options)  # fmt: skip
        try:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            pooled = cached_pooled_features(encoder, loader, options, pools, cache, device, desc=f"{path} {split}")
        finally:
            loader.dataset.release()
        for pool in pools:
            out[split, pool] = pooled[pool]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="experiments/eval_noise.py", description=__doc__.splitlines()[0])
    parser.add_argument("--init", required=True, help="the initial encoder (an evidence cell's <name>-init.pt)")
    parser.add_argument("--trained", required=True, help="the trained encoder")
    parser.add_argument("--data", required=True, help="an image data set as MDS with splits train and test")
    parser.add_argument("--protocol", action="append", default=None, help="heldout | knn | folds=F | l2=V (repeat)")
    parser.add_argument("--pool", action="append", default=None, help="cls | mean (repeat; default mean)")
    parser.add_argument("--test-samples", action="append", type=int, default=None, help="per draw; 0: all (repeat)")
    parser.add_argument("--train-samples", type=int, default=10000, help="training images per draw")
    parser.add_argument("--draws", type=int, default=10, help="random draws of the evaluation images")
    parser.add_argument("--l2", type=float, nargs="+", default=list(DEFAULT_GRID), help="grid of heldout / folds")
    parser.add_argument("--basis", default=None, help="the PCA basis of PMAE encoders (raw-pixel inputs)")
    parser.add_argument("--cache", default="runs/eval-noise-features", help="the feature cache")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except NoiseError as exc:
        print(f"eval_noise.py: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    pools = args.pool or ["mean"]
    for pool in pools:
        if pool not in ("cls", "mean"):
            raise NoiseError(f"--pool: {pool!r}; choose cls or mean")
    protocols = [parse_protocol(p, args.l2) for p in (args.protocol or ["heldout"])]
    sizes = args.test_samples or [0]
    if args.draws < 2:
        raise NoiseError(f"--draws: {args.draws}; a standard deviation needs at least 2 draws")
    feats = {tag: features(path, args.basis, args.data, pools, args.cache)
             for tag, path in (("init", args.init), ("trained", args.trained))}  # fmt: skip
    n_train, n_test = len(feats["init"]["train", pools[0]][1]), len(feats["init"]["test", pools[0]][1])
    if not 0 < args.train_samples <= n_train:
        raise NoiseError(f"--train-samples: {args.train_samples}; the training split has {n_train} images")
    for size in sizes:
        if not 0 <= size <= n_test:
            raise NoiseError(f"--test-samples: {size}; give 0 (all) to {n_test}")
    gains: dict[tuple, list[float]] = {}
    for d in range(args.draws):
        g = torch.Generator().manual_seed(1000 + d)
        train_idx = torch.randperm(n_train, generator=g)[: args.train_samples]
        test_perm = torch.randperm(n_test, generator=g)
        for size in sizes:
            test_idx = test_perm[:size] if size else torch.arange(n_test)
            for pool in pools:
                for name, runner in protocols:
                    scores = {}
                    for tag in ("init", "trained"):
                        (tx, ty), (ex, ey) = feats[tag]["train", pool], feats[tag]["test", pool]
                        scores[tag] = top1(runner, (tx[train_idx], ty[train_idx]), (ex[test_idx], ey[test_idx]))
                    gains.setdefault((pool, name, size or n_test), []).append(scores["trained"] - scores["init"])
        print(f"[eval-noise] draw {d + 1}/{args.draws} done", flush=True)
    print(
        f"gain over the initialisation, top-1 points, over {args.draws} draws of {args.train_samples} training images"
    )
    for (pool, name, size), values in gains.items():
        print(f"{pool:5} {name:10} {size:>6} test images: {statistics.fmean(values):6.2f} +- "
              f"{statistics.stdev(values):.2f}   [{', '.join(f'{v:.2f}' for v in values)}]")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
