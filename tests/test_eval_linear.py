"""The fast linear probe: separable data, shuffled labels, and an independent float64 Newton solver."""

import math

import pytest
import torch
import torch.nn.functional as F

from magma_composer.evaluate.linear import FastLinearProbe, fit_linear_probe
from magma_composer.options import OptionError


def gaussian_classes(seed, n, classes, dim, separation, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = separation * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, dim, generator=g), y


def newton_probe(train_x, train_y, test_x, test_y, l2, steps=30):
    """The same objective minimised independently: float64, exact Hessian, Newton's method."""
    x, xt = train_x.double(), test_x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    d, c = x.shape[1], int(train_y.max()) + 1

    def objective(theta):
        w, b = theta[: d * c].view(d, c), theta[d * c :]
        return F.cross_entropy(x @ w + b, train_y) + 0.5 * l2 * (w * w).sum()

    theta = torch.zeros(d * c + c, dtype=torch.float64)
    for _ in range(steps):
        grad = torch.autograd.functional.jacobian(objective, theta)
        hess = torch.autograd.functional.hessian(objective, theta)
        # the bias directions are flat along (1, ..., 1): a tiny ridge keeps the system solvable
        theta = theta - torch.linalg.solve(hess + 1e-10 * torch.eye(len(theta), dtype=theta.dtype), grad)
    w, b = theta[: d * c].view(d, c), theta[d * c :]
    return (
        100.0 * float(((xt @ w + b).argmax(1) == test_y).double().mean()),
        float(objective(theta)),
        float(grad.norm()),
    )


def test_separable_features_reach_100_percent():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (600,), generator=g)
    x = 0.2 * torch.randn(600, 12, generator=g)
    x[torch.arange(600), y] += 3.0
    result = fit_linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result["top1"] == 100.0 and result["top5"] == 100.0 and result["train_top1"] == 100.0


def test_shuffled_labels_give_chance():
    x, y = gaussian_classes(1, 3000, 10, 16, separation=3.0)
    y_shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
    n_test = 1500
    result = fit_linear_probe(x[:1500], y_shuffled[:1500], x[1500:], y_shuffled[1500:], l2=1e-2)
    chance = 100.0 * float(torch.bincount(y_shuffled[1500:]).max()) / n_test  # at most the largest class
    sigma = 100.0 * math.sqrt(0.1 * 0.9 / n_test)
    assert abs(result["top1"] - 10.0) < 4 * sigma, result["top1"]
    assert result["top1"] <= chance + 4 * sigma
    # the same features with their real labels are far above chance: the probe is not just broken
    assert fit_linear_probe(x[:1500], y[:1500], x[1500:], y[1500:], l2=1e-2)["top1"] > 60.0


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_agrees_with_an_independent_newton_solver(l2):
    x, y = gaussian_classes(2, 900, 4, 6, separation=0.8)
    ours = fit_linear_probe(x[:600], y[:600], x[600:], y[600:], l2=l2, dtype="float64")
    theirs, objective, grad_norm = newton_probe(x[:600], y[:600], x[600:], y[600:], l2)
    assert grad_norm < 1e-8  # Newton converged
    assert 35.0 < theirs < 95.0  # a problem where the probe's accuracy is informative
    assert abs(ours["top1"] - theirs) <= 1.0
    ours32 = fit_linear_probe(x[:600], y[:600], x[600:], y[600:], l2=l2)
    assert abs(ours32["top1"] - theirs) <= 1.0
    assert ours["val"] == [] and ours["l2"] == l2 and ours["iterations"] >= 1


def test_l2_is_chosen_on_held_out_features_then_refitted():
    x, y = gaussian_classes(3, 800, 5, 40, separation=0.35)
    result = fit_linear_probe(x[:500], y[:500], x[500:], y[500:], l2=[1e-4, 1e-2, 1.0], val_fraction=0.2, seed=7)
    assert [r["l2"] for r in result["val"]] == [1.0, 1e-2, 1e-4]  # fitted from strong to weak decay
    best = max(result["val"], key=lambda r: (r["top1"], r["l2"]))
    assert result["l2"] == best["l2"]
    # the refit on all training features is the single-l2 probe with the chosen value
    single = fit_linear_probe(x[:500], y[:500], x[500:], y[500:], l2=result["l2"])
    assert abs(single["top1"] - result["top1"]) <= 0.5
    # the held-out split is seeded
    again = fit_linear_probe(x[:500], y[:500], x[500:], y[500:], l2=[1e-4, 1e-2, 1.0], val_fraction=0.2, seed=7)
    assert [r["top1"] for r in again["val"]] == [r["top1"] for r in result["val"]]


def test_l2_is_chosen_by_cross_validation_over_every_training_feature():
    x, y = gaussian_classes(5, 700, 4, 30, separation=0.4)
    train_x, train_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
    l2s = [1e-4, 1e-2, 1.0]
    result = fit_linear_probe(train_x, train_y, test_x, test_y, l2=l2s, folds=4, seed=3, dtype="float64")
    # independently: each l2 fitted on three of the four seeded parts, scored on the fourth, summed over parts
    parts = torch.randperm(400, generator=torch.Generator().manual_seed(3)).chunk(4)
    for row in result["val"]:
        hits = 0.0
        for k, held in enumerate(parts):
            fit = torch.cat([p for j, p in enumerate(parts) if j != k])
            one = fit_linear_probe(train_x[fit], train_y[fit], train_x[held], train_y[held], l2=row["l2"],
                                   dtype="float64")  # fmt: skip
            hits += one["top1"] * len(held) / 100.0
        assert abs(row["top1"] - 100.0 * hits / 400) <= 0.5  # warm-started path vs cold fits: same convex optimum
    best = max(result["val"], key=lambda r: (r["top1"], r["l2"]))
    assert result["l2"] == best["l2"]
    single = fit_linear_probe(train_x, train_y, test_x, test_y, l2=result["l2"], dtype="float64")
    assert single["top1"] == result["top1"]  # the chosen value refitted on all the training features
    again = fit_linear_probe(train_x, train_y, test_x, test_y, l2=l2s, folds=4, seed=3, dtype="float64")
    assert again["val"] == result["val"]
    other = fit_linear_probe(train_x, train_y, test_x, test_y, l2=l2s, folds=4, seed=4, dtype="float64")
    assert other["val"] != result["val"]  # the seed draws the folds
    probe = FastLinearProbe(l2=l2s, folds=4, seed=3, dtype="float64")
    assert probe.run(train_x, train_y, test_x, test_y)["val"] == result["val"]
    assert probe.settings() == {"l2": l2s, "val_fraction": None, "folds": 4, "max_iter": 500, "dtype": "float64"}
    assert FastLinearProbe().settings()["val_fraction"] == 0.1  # one held-out tenth unless folds are asked for


def test_fold_options_are_checked():
    x, y = gaussian_classes(6, 60, 3, 5, separation=2.0)
    with pytest.raises(OptionError, match="val_fraction.*folds=5"):
        fit_linear_probe(x[:40], y[:40], x[40:], y[40:], val_fraction=0.2, folds=5)
    with pytest.raises(OptionError, match="val_fraction"):
        FastLinearProbe(val_fraction=0.1, folds=3)
    with pytest.raises(OptionError, match="folds"):
        FastLinearProbe(folds=0)
    with pytest.raises(ValueError, match="folds 50 need at least 50"):
        fit_linear_probe(x[:40], y[:40], x[40:], y[40:], l2=[0.1, 1.0], folds=50)
    # a single l2 needs no choice: folds change nothing
    one = fit_linear_probe(x[:40], y[:40], x[40:], y[40:], l2=0.1, folds=5)
    assert one["val"] == [] and one["top1"] == fit_linear_probe(x[:40], y[:40], x[40:], y[40:], l2=0.1)["top1"]


def test_guards_and_protocol():
    x, y = gaussian_classes(4, 200, 3, 5, separation=2.0)
    with pytest.raises(ValueError, match="never occur"):
        fit_linear_probe(x[:100], y[:100].clamp_max(1), x[100:], y[100:])
    with pytest.raises(ValueError, match="no labels"):
        fit_linear_probe(x[:100], torch.full((100,), -1), x[100:], y[100:])
    with pytest.raises(OptionError, match="val_fraction"):
        fit_linear_probe(x[:100], y[:100], x[100:], y[100:], val_fraction=1.0)
    with pytest.raises(OptionError, match=r"l2\[1\]"):
        fit_linear_probe(x[:100], y[:100], x[100:], y[100:], l2=[0.1, -1.0])
    with pytest.raises(OptionError, match="dtype"):
        FastLinearProbe(dtype="float16")
    with pytest.raises(ValueError, match="leaves 0"):
        fit_linear_probe(x[:4], y[:4], x[:4], y[:4], l2=[0.1, 1.0], val_fraction=0.1)
    probe = FastLinearProbe(l2=[0.01, 0.1], max_iter=50)
    result = probe.run(x[:100], y[:100], x[100:], y[100:])
    direct = fit_linear_probe(x[:100], y[:100], x[100:], y[100:], l2=[0.01, 0.1], max_iter=50)
    assert (result["top1"], result["l2"], result["val"]) == (direct["top1"], direct["l2"], direct["val"])
    assert probe.settings()["l2"] == [0.01, 0.1]


def test_warnings_for_a_grid_edge_and_an_unconverged_fit():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 5, generator=g) * 0.1
    x[torch.arange(300), y] += 3.0
    # every l2 separates these perfectly: the tie goes to the largest, the grid's edge
    result = fit_linear_probe(x[:200], y[:200], x[200:], y[200:], l2=(1e-4, 1e-3))
    assert result["l2"] == 1e-3 and result["converged"]
    assert any("grid's largest" in w for w in result["warnings"])
    capped = fit_linear_probe(x[:200], y[:200], x[200:], y[200:], l2=1e-3, max_iter=1)
    assert not capped["converged"] and any("max_iter 1" in w for w in capped["warnings"])
    assert fit_linear_probe(x[:200], y[:200], x[200:], y[200:], l2=1e-3)["warnings"] == []
