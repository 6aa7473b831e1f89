"""Evaluation of frozen encoders for the monitors: feature extraction, weighted kNN and the fast linear probe.

The protocols themselves live in :mod:`magma_composer.evaluate` (docs/algorithms.md §4); these are the thin forms
that :class:`~magma_composer.callbacks.KNNMonitor` uses.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from magma_composer.evaluate.knn import knn_grid
from magma_composer.evaluate.linear import DEFAULT_L2, fit_linear_probe

__all__ = ["extract_features", "knn_top1", "linear_probe_top1"]


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device | str = "cpu",
    max_samples: int | None = None,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``encode`` over ``(images, labels)`` batches; returns float32 CPU features and int64 labels."""
    feats, labels, seen = [], [], 0
    for images, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        out = encode(images.to(device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
        seen += len(out)
        if max_samples is not None and seen >= max_samples:
            break
    if not feats:
        raise ValueError("the loader yielded no batches: cannot extract features")
    f, y = torch.cat(feats), torch.cat(labels)
    if max_samples is not None:
        f, y = f[:max_samples], y[:max_samples]
    return f, y


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int | Sequence[int] = 10,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, float]:
    """Weighted kNN top-1 accuracy in % (cosine similarity, votes weighted by ``exp(sim / T)``).

    The cosine, single-temperature case of :func:`magma_composer.evaluate.knn.knn_grid`; a query of a class that
    the bank lacks counts as an error (a monitor's capped bank may miss a class).

    Returns:
        ``{k: accuracy}`` for each requested k.
    """
    grid = knn_grid(
        train_features,
        train_labels,
        test_features,
        test_labels,
        k=k,
        temperature=(temperature,),
        distance=("cosine",),
        chunk=chunk,
        allow_unseen_classes=True,
    )
    return {record["k"]: record["top1"] for record in grid}


def linear_probe_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    l2: float | Sequence[float] = DEFAULT_L2,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 in % of the fast linear probe (:func:`magma_composer.evaluate.linear.fit_linear_probe`: logistic
    regression on standardised features by L-BFGS, ``l2`` chosen on held-out training features).

    A monitor's figure: queries of classes absent from training count as errors. ``device``: where to fit
    (default: the features' device).
    """
    result = fit_linear_probe(
        train_features, train_labels, test_features, test_labels, l2=l2, device=device, allow_unseen_classes=True
    )
    return result["top1"]
