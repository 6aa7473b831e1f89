"""The fast linear probe: L2-regularised multinomial logistic regression on frozen features, full batch, L-BFGS.

docs/algorithms.md §4. Features are standardised with the mean and standard deviation (at least 1e-6) of the
features the head is fitted on; the head ``(W, b)`` minimises

    L(W, b) = (1 / N) sum_i CE(W x_i + b, y_i) + (l2 / 2) ||W||_F^2        (the bias is not decayed)

from ``W = 0, b = 0`` with torch's L-BFGS (strong Wolfe line search) until the gradient or the change of the
loss falls below the tolerances, or ``max_iter`` iterations. The objective is convex, so the result does not
depend on the start. With several ``l2`` values, each is fitted on a seeded random ``1 - val_fraction`` of the
training features and scored (top-1) on the rest; the best (ties: the larger l2) is refitted on all of them.
With ``folds = F >= 2`` the choice is cross-validated instead: the training features are split (seeded) into
``F`` near-equal parts, each ``l2`` is fitted on every ``F - 1`` of them and scored on the one left out, and the
best by correct predictions over all ``F`` parts is refitted. Every training feature then votes once, so the
choice varies far less with the draw of the training set than one held-out tenth's (docs/results.md,
"Where the spread comes from"), at about ``F`` times the choosing fits.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from magma_composer.evaluate.knn import check_labelled
from magma_composer.options import OptionError, check_choice, check_int, check_list, check_number

__all__ = ["DEFAULT_L2", "FastLinearProbe", "fit_linear_probe", "fit_logistic", "topk_accuracy"]

#: the default regularisation grid (mean cross-entropy scale: l2 ~ 1 / (C N) of scikit-learn's C)
DEFAULT_L2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _standardise(fit_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = fit_x.mean(0)
    std = fit_x.std(0).clamp_min(1e-6) if len(fit_x) > 1 else torch.ones_like(mean)
    return [(x - mean) / std for x in (fit_x, *others)]


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 500,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    tolerance_grad: float = 1e-6,
    tolerance_change: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimises the module's objective on (already standardised) ``x``; returns ``(W, b, iterations)``.

    ``W`` is ``D x C``, ``b`` is ``C``, in ``x``'s dtype and device. ``init`` starts from a previous solution
    (a warm start along an l2 path; the optimum is the same).
    """
    d = x.shape[1]
    w = torch.zeros(d, num_classes, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    return w.detach(), b.detach(), iterations


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Top-k accuracies in % (k capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == y[:, None]
    return [100.0 * float(hits[:, : min(k, logits.shape[1])].any(1).double().mean()) for k in ks]


@torch.no_grad()
def check_probe_options(
    l2: float | Sequence[float], val_fraction: float | None, max_iter: int, seed: int, dtype: str, folds: int = 1
) -> tuple[list[float], float | None]:
    """The probe's options checked (one place for :func:`fit_linear_probe` and :class:`FastLinearProbe`); returns
    the ``l2`` values as a list and the held-out share in use (``None`` when ``folds >= 2`` cross-validates)."""
    check_int("folds", folds, 1)
    if folds >= 2:
        if val_fraction is not None:
            raise OptionError(
                "val_fraction",
                f"{val_fraction} holds out one share to choose l2, but folds={folds} cross-validates over all of "
                "them: give one of the two (val_fraction with folds: 1, or folds alone)",
            )
    else:
        val_fraction = 0.1 if val_fraction is None else val_fraction
        check_number("val_fraction", val_fraction, 0.0, 1.0, open_min=True, open_max=True)
    check_int("max_iter", max_iter, 1)
    check_int("seed", seed)
    check_choice("dtype", dtype, tuple(_DTYPES))
    return check_list("l2", l2, lambda key, v: check_number(key, v, 0.0)), val_fraction


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2: float | Sequence[float] = DEFAULT_L2,
    val_fraction: float | None = None,
    max_iter: int = 500,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: str = "float32",
    allow_unseen_classes: bool = False,
    folds: int = 1,
) -> dict:
    """Fits the fast linear probe on ``train`` features and scores it on ``test`` (module docstring).

    Args:
        train_x: ``N x D`` training features. train_y: ``N`` int labels (>= 0).
        test_x: ``M x D`` test features. test_y: ``M`` int labels (>= 0).
        l2: the weight decay ``l2`` of the objective, or a grid of them to choose from on held-out features.
        val_fraction: share of the training features held out to choose ``l2`` (only with several values;
            default 0.1). Refused with ``folds >= 2``.
        max_iter: L-BFGS iterations per fit.
        seed: the seed of the held-out split (or of the folds).
        device: where to fit (default: the features' device).
        dtype: ``'float32'`` or ``'float64'``.
        allow_unseen_classes: score test classes absent from training as errors instead of refusing them.
        folds: 1 chooses ``l2`` on one held-out share; ``F >= 2`` by ``F``-fold cross-validation.

    Returns:
        ``{"top1", "top5", "train_top1", "l2", "val": [{"l2", "top1", "iterations"}], "iterations", "converged",
        "num_classes", "warnings", "seconds"}`` (accuracies in %; ``val`` is empty with a single ``l2``; with
        folds, its ``top1`` is over all the folds' held-out parts and ``iterations`` their sum;
        ``warnings`` says when the chosen ``l2`` lies at the grid's edge or L-BFGS stopped at ``max_iter``).

    Raises:
        OptionError: a bad option. ValueError: bad features or labels, or too few training samples to hold out.
    """
    start = time.perf_counter()
    l2s, val_fraction = check_probe_options(l2, val_fraction, max_iter, seed, dtype, folds)
    check_labelled(train_x, train_y, test_x, test_y, allow_unseen_classes)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    device = torch.device(device) if device is not None else train_x.device
    cast = _DTYPES[dtype]
    train_x, test_x = train_x.to(device, cast), test_x.to(device, cast)
    train_y, test_y = train_y.to(device, torch.long), test_y.to(device, torch.long)

    val: list[dict] = []
    chosen = l2s[0]
    if len(l2s) > 1:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed)).to(device)
        if folds >= 2:
            if len(train_x) < folds:
                raise ValueError(f"folds {folds} need at least {folds} training samples, got {len(train_x)}")
            parts = order.chunk(folds)
            splits = [(torch.cat(parts[:k] + parts[k + 1 :]), part) for k, part in enumerate(parts)]
        else:
            n_val = int(round(val_fraction * len(train_x)))
            if n_val < 1 or n_val >= len(train_x):
                raise ValueError(
                    f"val_fraction {val_fraction} of {len(train_x)} training samples leaves {n_val} to choose l2 "
                    "with and the rest to fit: give one l2 value or more samples"
                )
            splits = [(order[n_val:], order[:n_val])]
        correct = {value: 0 for value in l2s}
        its_sum = {value: 0 for value in l2s}
        for fit_idx, val_idx in splits:
            fit_x, val_x = _standardise(train_x[fit_idx], train_x[val_idx])
            init = None
            for value in sorted(l2s, reverse=True):  # strong to weak decay: each fit warm-starts the next
                w, b, its = fit_logistic(fit_x, train_y[fit_idx], num_classes, value, max_iter, init)
                init = (w, b)
                correct[value] += int(((val_x @ w + b).argmax(1) == train_y[val_idx]).sum())
                its_sum[value] += its
        scored = sum(len(val_idx) for _, val_idx in splits)
        for value in sorted(l2s, reverse=True):
            val.append({"l2": value, "top1": 100.0 * correct[value] / scored, "iterations": its_sum[value]})
        chosen = max(val, key=lambda r: (r["top1"], r["l2"]))["l2"]
    fit_x, eval_x = _standardise(train_x, test_x)
    w, b, iterations = fit_logistic(fit_x, train_y, num_classes, chosen, max_iter)
    top1, top5 = topk_accuracy(eval_x @ w + b, test_y)
    (train_top1,) = topk_accuracy(fit_x @ w + b, train_y, (1,))
    warnings = []
    if len(l2s) > 1 and chosen == min(l2s) and chosen > 0:
        warnings.append(f"the chosen l2 {chosen:g} is the grid's smallest: a smaller one may fit better; extend l2")
    if len(l2s) > 1 and chosen == max(l2s):
        warnings.append(f"the chosen l2 {chosen:g} is the grid's largest: a larger one may fit better; extend l2")
    if iterations >= max_iter:
        warnings.append(f"L-BFGS stopped at max_iter {max_iter} before converging; raise max_iter")
    return {
        "top1": top1,
        "top5": top5,
        "train_top1": train_top1,
        "l2": chosen,
        "val": val,
        "iterations": iterations,
        "converged": iterations < max_iter,
        "num_classes": num_classes,
        "warnings": warnings,
        "seconds": time.perf_counter() - start,
    }


class FastLinearProbe:
    """The fast linear probe (the evaluation recipe's ``linear_fast:`` section); see :func:`fit_linear_probe`.

    Args:
        l2: weight decay values; with several, the best on a held-out share of the training features is refitted.
        val_fraction: the held-out share used to choose ``l2`` (default 0.1; refused with ``folds >= 2``).
        max_iter: L-BFGS iterations per fit.
        seed: the seed of the held-out split (or of the folds).
        dtype: ``float32`` or ``float64``.
        folds: 1 chooses ``l2`` on one held-out share; ``F >= 2`` by ``F``-fold cross-validation.
    """

    def __init__(
        self,
        l2: float | Sequence[float] = DEFAULT_L2,
        val_fraction: float | None = None,
        max_iter: int = 500,
        seed: int = 0,
        dtype: str = "float32",
        folds: int = 1,
    ) -> None:
        self.l2, self.val_fraction = check_probe_options(l2, val_fraction, max_iter, seed, dtype, folds)
        self.max_iter, self.seed, self.dtype, self.folds = max_iter, seed, dtype, folds

    def settings(self) -> dict:
        """The protocol's settings, for the result record."""
        return {
            "l2": self.l2,
            "val_fraction": self.val_fraction,
            "folds": self.folds,
            "max_iter": self.max_iter,
            "dtype": self.dtype,
        }

    def run(
        self,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        device: torch.device | str | None = None,
    ) -> dict:
        """Fits and scores the probe; returns :func:`fit_linear_probe`'s record."""
        return fit_linear_probe(
            train_x,
            train_y,
            test_x,
            test_y,
            l2=self.l2,
            val_fraction=self.val_fraction,
            max_iter=self.max_iter,
            seed=self.seed,
            device=device,
            dtype=self.dtype,
            folds=self.folds,
        )
