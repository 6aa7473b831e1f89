"""Weighted kNN classification of frozen features: a grid over distances, k and temperatures in one pass.

docs/algorithms.md §4. For each query the ``max(k)`` nearest bank items are found once per distance; every
``(k, temperature)`` grid point then only re-weights and re-counts those neighbours' votes.

* ``cosine``: features are L2-normalised, similarity ``s_j = q . f_j``, neighbours the largest ``s_j``,
  vote weight ``exp(s_j / T)`` (one grid point per temperature).
* ``euclidean``: raw features, distance ``d_j = ||q - f_j||``, neighbours the smallest ``d_j``, vote weight
  ``1 / (d_j + 1e-8)`` (inverse distance; no temperature, so one grid point per k with ``temperature=None``,
  and scaling all features by a constant changes nothing).

``score(c)`` is the sum of the weights of the neighbours labelled ``c``; a query counts for top-``n`` when its
true class has a positive score and fewer than ``n`` classes rank above it (higher score, or an equal score
and a lower class index: the same tie rule as ``argmax``).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from magma_composer.options import check_choice, check_int, check_list, check_number

__all__ = ["DISTANCES", "KNNProtocol", "check_labelled", "knn_grid"]

DISTANCES = ("cosine", "euclidean")
_EPS = 1e-8  # inverse-distance weight: an exact duplicate of a bank item gets a finite, dominant weight


def check_knn_options(
    k: int | Sequence[int], temperature: float | Sequence[float], distance: str | Sequence[str], chunk: int
) -> tuple[list[int], list[float], list[str], int]:
    """The grid's options checked (one place for :func:`knn_grid` and :class:`KNNProtocol`): ``(ks, temperatures,
    distances, chunk)``; a single value stands for a list of one."""
    ks = check_list("k", k, lambda key, v: check_int(key, v, 1))
    temps = check_list("temperature", temperature, lambda key, v: check_number(key, v, 0.0, open_min=True))
    dists = check_list("distance", distance, lambda key, v: check_choice(key, v, DISTANCES))
    return ks, temps, dists, check_int("chunk", chunk, 1)


def check_labelled(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    allow_unseen_classes: bool = False,
) -> int:
    """Checks features and labels of a bank/query (or train/test) pair; returns the number of classes.

    Raises:
        ValueError: empty or mismatched inputs, labels below 0 (a data set without labels), or (unless
            ``allow_unseen_classes``) test classes that the training split never shows.
    """
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{name} features must be N x D with N labels, got features {tuple(x.shape)} "
                f"and labels {tuple(y.shape)}"
            )
        if len(x) == 0:
            raise ValueError(f"{name} split has no samples: nothing to evaluate")
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"{name} labels must be integers, got {y.dtype}")
        if int(y.min()) < 0:
            raise ValueError(
                f"{name} labels contain {int(y.min())}: the data set has no labels (label -1 means no 'y' column); "
                "classification needs labelled train and test splits"
            )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dimensions, test features {test_x.shape[1]}")
    if not allow_unseen_classes:
        unseen = sorted(set(test_y.unique().tolist()) - set(train_y.unique().tolist()))
        if unseen:
            shown = ", ".join(map(str, unseen[:20])) + (" ..." if len(unseen) > 20 else "")
            raise ValueError(
                f"classes differ between the splits: test labels {shown} never occur in the training split "
                f"({len(unseen)} classes); use splits of the same classes"
            )
    return int(max(train_y.max(), test_y.max())) + 1


def _ranks_of_truth(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Rank of the true class (0 = first) under 'higher score first, ties to the lower index'; -1 if no vote."""
    true_score = scores.gather(1, truth[:, None])
    classes = torch.arange(scores.shape[1], device=scores.device)
    above = (scores > true_score) | ((scores == true_score) & (classes[None, :] < truth[:, None]))
    rank = above.sum(1)
    return torch.where(true_score[:, 0] > 0, rank, torch.full_like(rank, -1))


@torch.no_grad()
def knn_grid(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    k: int | Sequence[int] = (10, 20),
    temperature: float | Sequence[float] = (0.07,),
    distance: str | Sequence[str] = ("cosine",),
    chunk: int = 1024,
    device: torch.device | str | None = None,
    allow_unseen_classes: bool = False,
) -> list[dict]:
    """Weighted kNN top-1 and top-5 accuracy (%) for every grid point, from one pass over the queries.

    Args:
        train_x: ``N x D`` bank features. train_y: ``N`` int labels (>= 0).
        test_x: ``M x D`` query features. test_y: ``M`` int labels (>= 0).
        k: numbers of neighbours (each capped at the bank size).
        temperature: cosine vote temperatures ``T`` (weight ``exp(s / T)``), > 0.
        distance: ``'cosine'`` and/or ``'euclidean'`` (module docstring).
        chunk: queries per block (memory ``chunk x N``; the result does not depend on it).
        device: where to compute (default: the features' device).
        allow_unseen_classes: count queries of classes the bank lacks as errors instead of refusing them.

    Returns:
        One record per grid point, in the order distance, then k, then temperature:
        ``{"distance", "k", "temperature", "top1", "top5"}`` (``temperature`` is None for euclidean).

    Raises:
        OptionError: a bad ``k`` / ``temperature`` / ``distance`` / ``chunk``.
        ValueError: bad features or labels (:func:`check_labelled`).
    """
    ks, temps, dists, chunk = check_knn_options(k, temperature, distance, chunk)
    num_classes = check_labelled(train_x, train_y, test_x, test_y, allow_unseen_classes)
    device = torch.device(device) if device is not None else train_x.device
    train_x, test_x = train_x.to(device, torch.float32), test_x.to(device, torch.float32)
    train_y, test_y = train_y.to(device, torch.long), test_y.to(device, torch.long)
    kmax = min(max(ks), len(train_x))

    # grid points per distance: (k, temperature) pairs; euclidean has no temperature
    points = {d: [(kk, t) for kk in ks for t in (temps if d == "cosine" else [None])] for d in dict.fromkeys(dists)}
    top1 = {(d, kk, t): 0 for d, pts in points.items() for kk, t in pts}
    top5 = dict.fromkeys(top1, 0)
    banks = {}
    if "cosine" in points:
        banks["cosine"] = F.normalize(train_x, dim=1)
    if "euclidean" in points:
        banks["euclidean"] = (train_x, (train_x * train_x).sum(1))

    for start in range(0, len(test_x), chunk):
        query, truth = test_x[start : start + chunk], test_y[start : start + chunk]
        for d, pts in points.items():
            if d == "cosine":
                sims = F.normalize(query, dim=1) @ banks[d].T
                near, idx = sims.topk(kmax, dim=1)
            else:
                bank, bank_sq = banks[d]
                sq = (query * query).sum(1, keepdim=True) - 2.0 * query @ bank.T + bank_sq[None, :]
                near, idx = sq.topk(kmax, dim=1, largest=False)
                near = near.clamp_min(0.0).sqrt()
            labels = train_y[idx]
            for kk, t in pts:
                n = min(kk, kmax)
                weights = (near[:, :n] / t).exp() if d == "cosine" else 1.0 / (near[:, :n] + _EPS)
                scores = torch.zeros(len(truth), num_classes, device=device)
                scores.scatter_add_(1, labels[:, :n], weights)
                rank = _ranks_of_truth(scores, truth)
                top1[(d, kk, t)] += int((rank == 0).sum())
                top5[(d, kk, t)] += int(((rank >= 0) & (rank < 5)).sum())
    m = len(test_x)
    return [
        {"distance": d, "k": kk, "temperature": t, "top1": 100.0 * top1[key] / m, "top5": 100.0 * top5[key] / m}
        for key in top1
        for d, kk, t in [key]
    ]


class KNNProtocol:
    """The offline kNN protocol (the evaluation recipe's ``knn:`` section).

    The grid is evaluated in one pass (:func:`knn_grid`); the headline figure is its first point: the first
    distance, first k and first temperature.

    Args:
        k: numbers of neighbours, e.g. ``[10, 20, 200]``.
        temperature: cosine vote temperatures, e.g. ``[0.07]``.
        distance: ``cosine`` and/or ``euclidean``.
        chunk: queries per block (memory ``chunk x bank size`` floats).
    """

    def __init__(
        self,
        k: int | Sequence[int] = (10, 20),
        temperature: float | Sequence[float] = (0.07,),
        distance: str | Sequence[str] = ("cosine",),
        chunk: int = 1024,
    ) -> None:
        self.k, self.temperature, self.distance, self.chunk = check_knn_options(k, temperature, distance, chunk)

    def settings(self) -> dict:
        """The protocol's settings, for the result record."""
        return {"k": self.k, "temperature": self.temperature, "distance": self.distance}

    def run(
        self,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        device: torch.device | str | None = None,
    ) -> dict:
        """Evaluates the grid; returns ``{"top1", "top5", "distance", "k", "temperature", "grid", "seconds"}``.

        ``top1``/``top5`` and their settings are the headline (first) grid point; ``grid`` holds every point.
        """
        start = time.perf_counter()
        grid = knn_grid(
            train_x,
            train_y,
            test_x,
            test_y,
            k=self.k,
            temperature=self.temperature,
            distance=self.distance,
            chunk=self.chunk,
            device=device,
        )
        return {**grid[0], "grid": grid, "seconds": time.perf_counter() - start}
