"""Evaluation of frozen encoders: weighted kNN (docs/algorithms.md §4) and a closed-form linear probe."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

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


@torch.no_grad()
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

    Returns:
        ``{k: accuracy}`` for each requested k.
    """
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be positive integers, got {ks}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    kmax = min(max(ks), len(train))
    correct = {kk: 0 for kk in ks}
    for start in range(0, len(test), chunk):
        sims = test[start : start + chunk] @ train.T
        top_sim, top_idx = sims.topk(kmax, dim=1)
        top_lab = train_labels[top_idx]
        weights = (top_sim / temperature).exp()
        truth = test_labels[start : start + chunk]
        for kk in ks:
            kk_ = min(kk, kmax)
            votes = torch.zeros(len(truth), num_classes)
            votes.scatter_add_(1, top_lab[:, :kk_], weights[:, :kk_])
            correct[kk] += int((votes.argmax(dim=1) == truth).sum())
    return {kk: 100.0 * c / len(test) for kk, c in correct.items()}


@torch.no_grad()
def linear_probe_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    l2: float = 1e-3,
) -> float:
    """Closed-form ridge-regression linear probe on standardised features (a fast monitor), top-1 in %."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x = torch.cat([(train_features - mean) / std, torch.ones(len(train_features), 1)], dim=1).double()
    xt = torch.cat([(test_features - mean) / std, torch.ones(len(test_features), 1)], dim=1).double()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    targets = F.one_hot(train_labels, num_classes).double()
    gram = x.T @ x + l2 * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, x.T @ targets)
    return 100.0 * float(((xt @ w).argmax(1) == test_labels).double().mean())
