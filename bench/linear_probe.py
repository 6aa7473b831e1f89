"""The fast linear probe against scikit-learn's LogisticRegression on the same features.

Features: an encoder's CLS tokens of real CIFAR-10 (the MDS folder ``--data`` with ``train``/``test`` splits, e.g.
made by ``python -m magma_composer.data.convert``), extracted once with
:func:`magma_composer.evaluate.features.extract_features`. Both probes then fit the same objective on the same
standardised features,

    min over W, b:  (1 / N) sum_i CE(W x_i + b, y_i) + (l2 / 2) ||W||^2     (scikit-learn: C = 1 / (l2 * N))

ours with :func:`magma_composer.evaluate.linear.fit_linear_probe` (torch L-BFGS, one ``l2``, no held-out split),
scikit-learn's with ``LogisticRegression(solver='lbfgs')`` (multinomial). They take turns ``--repeats`` times after
a warm-up; prints both top-1 figures (they should agree within a point) and the median time ratio
scikit-learn / ours, with the same thread count.

Usage::

    OMP_NUM_THREADS=2 python bench/linear_probe.py --encoder runs/cifar-mae/encoder.pt --data data/cifar10-mds \\
        --train 10000 --test 5000 --l2 1e-3 1e-4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def features(encoder_path: str, data: str, split: str, samples: int, batch: int = 250) -> tuple:
    from magma_composer.data.loader import build_image_dataloader
    from magma_composer.evaluate.encoders import load_encoder
    from magma_composer.evaluate.features import extract_features

    encoder = load_encoder(encoder_path)
    loader = build_image_dataloader(
        batch, num_workers=1, train=False, remote=data, split=split, image_size=encoder.arch["img_size"],
        max_samples=samples, return_index=True, shuffle_seed=0,
    )  # fmt: skip
    try:
        return extract_features(encoder, loader, progress=True, desc=split)
    finally:
        loader.dataset.release()


def ours(train_x, train_y, test_x, test_y, l2: float) -> tuple[float, float]:
    from magma_composer.evaluate.linear import fit_linear_probe

    start = time.perf_counter()
    result = fit_linear_probe(train_x, train_y, test_x, test_y, l2=l2, max_iter=1000)
    return result["top1"], time.perf_counter() - start


def sklearn(train_x, train_y, test_x, test_y, l2: float) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = ((train_x - mean) / std).numpy(), ((test_x - mean) / std).numpy()
    clf = LogisticRegression(C=1.0 / (l2 * len(a)), max_iter=1000, tol=1e-6)
    clf.fit(a, train_y.numpy())
    top1 = 100.0 * float((clf.predict(b) == test_y.numpy()).mean())
    return top1, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="an encoder file (any format load_encoder reads)")
    p.add_argument("--data", required=True, help="MDS folder with train/ and test/")
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--test", type=int, default=5000)
    p.add_argument("--l2", type=float, nargs="+", default=[1e-3])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    train = features(args.encoder, args.data, "train", args.train)
    test = features(args.encoder, args.data, "test", args.test)
    print(f"features: train {tuple(train[0].shape)}, test {tuple(test[0].shape)}; threads {torch.get_num_threads()}")
    print("| l2 | top-1 ours | top-1 scikit-learn | difference | median time ours | median time scikit-learn | ratio |")
    print("|---|---|---|---|---|---|---|")
    for l2 in args.l2:
        ours(*train, *test, l2)  # warm-up
        runs = {"ours": [], "sklearn": []}
        for _ in range(args.repeats):
            runs["ours"].append(ours(*train, *test, l2))
            runs["sklearn"].append(sklearn(*train, *test, l2))
        a, b = runs["ours"][-1][0], runs["sklearn"][-1][0]
        ta = statistics.median(t for _, t in runs["ours"])
        tb = statistics.median(t for _, t in runs["sklearn"])
        print(f"| {l2:g} | {a:.2f} | {b:.2f} | {a - b:+.2f} | {ta:.2f} s | {tb:.2f} s | {tb / ta:.2f} |", flush=True)


if __name__ == "__main__":
    main()
