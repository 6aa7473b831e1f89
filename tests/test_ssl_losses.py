"""nt_xent_loss and vicreg_loss: float64 known answers against lightly, an independent loop, and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import NTXentLoss, VICRegLoss
from lightly.loss.vicreg_loss import covariance_loss, invariance_loss, variance_loss

from magma_composer.losses import nt_xent_loss, vicreg_loss

SHAPES = [(2, 3), (5, 4), (8, 16), (16, 6)]  # B < D and B > D: the covariance's two regimes


def _pair(b: int, d: int, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=torch.float64)
    # correlated views with varied scales, so no term is trivially zero or saturated
    z2 = 0.7 * z1 + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)
    scale = torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    return (z1 * scale).to(dtype), (z2 * scale).to(dtype)


# ---------------------------------------------------------------------- independent float64 loops
def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    rows = [[float(v) for v in r] for r in torch.cat([z1, z2]).tolist()]
    n, b = len(rows), len(rows) // 2
    unit = []
    for r in rows:
        norm = math.sqrt(sum(v * v for v in r))
        unit.append([v / norm for v in r])

    def sim(i: int, k: int) -> float:
        return sum(x * y for x, y in zip(unit[i], unit[k]))

    total = 0.0
    for i in range(n):
        positive = (i + b) % n
        denominator = sum(math.exp(sim(i, k) / t) for k in range(n) if k != i)
        total += -math.log(math.exp(sim(i, positive) / t) / denominator)
    return total / n


def _vicreg_loop(z1: torch.Tensor, z2: torch.Tensor, eps: float) -> tuple[float, float, float]:
    a, c = z1.tolist(), z2.tolist()
    b, d = len(a), len(a[0])
    invariance = sum((a[i][j] - c[i][j]) ** 2 for i in range(b) for j in range(d)) / (b * d)

    def var_cov(z: list[list[float]]) -> tuple[float, float]:
        mean = [sum(z[i][j] for i in range(b)) / b for j in range(d)]
        cov = [
            [sum((z[i][j] - mean[j]) * (z[i][k] - mean[k]) for i in range(b)) / (b - 1) for k in range(d)]
            for j in range(d)
        ]
        v = sum(max(0.0, 1.0 - math.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        off = sum(cov[j][k] ** 2 for j in range(d) for k in range(d) if j != k) / d
        return v, off

    v1, c1 = var_cov(a)
    v2, c2 = var_cov(c)
    return invariance, v1 + v2, c1 + c2


# ---------------------------------------------------------------------- NT-Xent
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("t", [0.07, 0.2, 0.5, 1.0])
def test_nt_xent_matches_lightly_float64(b, d, t):
    z1, z2 = _pair(b, d, seed=b * 31 + d)
    ours = nt_xent_loss(z1, z2, temperature=t)
    reference = NTXentLoss(temperature=t, memory_bank_size=0)(z1, z2)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_independent_loop(b, d, t):
    z1, z2 = _pair(b, d, seed=7 + b)
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(_nt_xent_loop(z1, z2, t), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("t", [0.1, 0.5, 2.0])
def test_nt_xent_orthogonal_samples_identical_views(t):
    # u = [e1, e2, e1, e2]: every anchor's positive has similarity 1, its two negatives similarity 0
    e = torch.eye(2, dtype=torch.float64)
    expected = math.log(1.0 + 2.0 * math.exp(-1.0 / t))
    assert nt_xent_loss(e, e.clone(), t).item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("b", [2, 3, 10])
def test_nt_xent_collapsed_embeddings(b):
    # every similarity is 1: l_i = -log(e^(1/t) / ((2B - 1) e^(1/t))) = log(2B - 1), whatever t
    z = torch.ones(b, 5, dtype=torch.float64)
    for t in (0.1, 1.0):
        assert nt_xent_loss(z, 3 * z, t).item() == pytest.approx(math.log(2 * b - 1), rel=1e-13)


def test_nt_xent_antipodal_views():
    # z2 = -z1 for two orthogonal samples: positive similarity -1, negatives 0 and 0
    e = torch.eye(2, dtype=torch.float64)
    t = 0.5
    expected = -math.log(math.exp(-2.0) / (math.exp(-2.0) + 2.0))
    assert nt_xent_loss(e, -e, t).item() == pytest.approx(expected, rel=1e-14)


def test_nt_xent_invariances():
    z1, z2 = _pair(6, 4, seed=3)
    base = nt_xent_loss(z1, z2, 0.3)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    # scale of each row, order of the views, order of the samples: none changes the loss
    row_scale = torch.linspace(0.5, 4.0, 6, dtype=torch.float64).unsqueeze(1)
    torch.testing.assert_close(nt_xent_loss(z1 * row_scale, z2, 0.3), base, rtol=1e-12, atol=0)
    torch.testing.assert_close(nt_xent_loss(z2, z1, 0.3), base, rtol=1e-12, atol=0)
    torch.testing.assert_close(nt_xent_loss(z1[perm], z2[perm], 0.3), base, rtol=1e-12, atol=0)
    # a different pairing is a different loss (the positive is the *same* row of the other view)
    assert abs(nt_xent_loss(z1, z2[perm], 0.3).item() - base.item()) > 1e-3


def test_nt_xent_gradient_matches_lightly_and_is_finite():
    z1, z2 = _pair(8, 5, seed=11)
    ours = [z.clone().requires_grad_() for z in (z1, z2)]
    theirs = [z.clone().requires_grad_() for z in (z1, z2)]
    nt_xent_loss(*ours, temperature=0.2).backward()
    NTXentLoss(temperature=0.2)(*theirs).backward()
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_nt_xent_gradient_finite_on_degenerate_input():
    # collapsed and all-zero embeddings: the normalisation must not produce NaN gradients
    for z in (torch.ones(4, 3), torch.zeros(4, 3)):
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        loss = nt_xent_loss(a, b, 0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


# ---------------------------------------------------------------------- VICReg
@pytest.mark.parametrize("b,d", SHAPES)
def test_vicreg_parts_match_lightly_float64(b, d):
    z1, z2 = _pair(b, d, seed=b + 100 * d)
    eps = 1e-4
    _, parts = vicreg_loss(z1, z2, eps=eps)
    torch.testing.assert_close(parts["invariance"], invariance_loss(z1, z2), rtol=1e-12, atol=1e-14)
    # lightly's variance_loss / covariance_loss are per branch; ours sum the two branches
    variance = variance_loss(z1, eps) + variance_loss(z2, eps)
    covariance = covariance_loss(z1) + covariance_loss(z2)
    torch.testing.assert_close(parts["variance"], variance, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(parts["covariance"], covariance, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("b,d", SHAPES)
def test_vicreg_total_matches_lightly_with_its_averaged_variance(b, d):
    # lightly (like the authors' code) averages the two variance terms: its mu is our var_weight * 2
    z1, z2 = _pair(b, d, seed=5 * b + d)
    lam, mu, nu = 25.0, 25.0, 1.0
    reference = VICRegLoss(lambda_param=lam, mu_param=mu, nu_param=nu, eps=1e-4)(z1, z2)
    total, _ = vicreg_loss(z1, z2, sim_weight=lam, var_weight=mu / 2, cov_weight=nu, eps=1e-4)
    torch.testing.assert_close(total, reference, rtol=1e-12, atol=1e-12)
    # with the published weights as given, the variance term counts twice as much here as in lightly
    ours, parts = vicreg_loss(z1, z2)
    torch.testing.assert_close(ours - reference, 0.5 * mu * parts["variance"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b,d", SHAPES)
def test_vicreg_matches_independent_loop(b, d):
    z1, z2 = _pair(b, d, seed=13 * b + d)
    eps = 1e-3
    total, parts = vicreg_loss(z1, z2, sim_weight=3.0, var_weight=5.0, cov_weight=0.5, eps=eps)
    inv, var, cov = _vicreg_loop(z1, z2, eps)
    assert parts["invariance"].item() == pytest.approx(inv, rel=1e-12)
    assert parts["variance"].item() == pytest.approx(var, rel=1e-12, abs=1e-15)
    assert parts["covariance"].item() == pytest.approx(cov, rel=1e-12)
    assert total.item() == pytest.approx(3.0 * inv + 5.0 * var + 0.5 * cov, rel=1e-12)


def test_vicreg_hand_computed_variance():
    # z = [[1, 0], [-1, 0]]: variances 2 and 0, no covariance; v = (0 + (1 - sqrt(eps))) / 2 per branch
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    eps = 1e-4
    total, parts = vicreg_loss(z, z.clone(), eps=eps)
    assert parts["invariance"].item() == 0.0
    assert parts["variance"].item() == pytest.approx(1.0 - math.sqrt(eps), rel=1e-14)
    assert parts["covariance"].item() == 0.0
    assert total.item() == pytest.approx(25.0 * (1.0 - math.sqrt(eps)), rel=1e-14)


def test_vicreg_hand_computed_covariance():
    # z = [[1, 1], [-1, -1], [0, 0]]: both variances 1 (no hinge), covariance 1; c = (1 + 1) / 2 per branch
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    total, parts = vicreg_loss(z, z.clone())
    assert parts["variance"].item() == 0.0
    assert parts["covariance"].item() == pytest.approx(2.0, rel=1e-14)
    assert total.item() == pytest.approx(2.0, rel=1e-14)


def test_vicreg_hand_computed_invariance_and_shift():
    z1, _ = _pair(6, 3, seed=2)
    shift = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    _, base = vicreg_loss(z1, z1.clone())
    _, shifted = vicreg_loss(z1, z1 + shift)
    # a shift of one view moves only the invariance term: mean(shift^2)
    assert shifted["invariance"].item() == pytest.approx(float((shift**2).mean()), rel=1e-14)
    torch.testing.assert_close(shifted["variance"], base["variance"], rtol=1e-13, atol=0)
    torch.testing.assert_close(shifted["covariance"], base["covariance"], rtol=1e-13, atol=0)


def test_vicreg_weights_scale_the_parts():
    z1, z2 = _pair(7, 4, seed=9)
    _, parts = vicreg_loss(z1, z2)
    for weights in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (2.0, 3.0, 4.0)):
        total, _ = vicreg_loss(z1, z2, *weights)
        expected = sum(w * parts[k] for w, k in zip(weights, ("invariance", "variance", "covariance")))
        torch.testing.assert_close(total, expected, rtol=1e-13, atol=0)


def test_vicreg_gradient_matches_lightly_and_is_finite():
    z1, z2 = _pair(9, 6, seed=21)
    ours = [z.clone().requires_grad_() for z in (z1, z2)]
    theirs = [z.clone().requires_grad_() for z in (z1, z2)]
    vicreg_loss(*ours, var_weight=12.5)[0].backward()
    VICRegLoss()(*theirs).backward()
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_vicreg_gradient_finite_on_collapsed_input():
    z = torch.ones(4, 3)
    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    total, parts = vicreg_loss(a, b)
    total.backward()
    assert parts["variance"].item() == pytest.approx(2 * (1 - math.sqrt(1e-4)), rel=1e-6)
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


# ---------------------------------------------------------------------- precision and bad input
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_losses_compute_in_float32(dtype):
    z1, z2 = _pair(8, 4, seed=1, dtype=dtype)
    reference_nt = nt_xent_loss(z1.float(), z2.float(), 0.2)
    reference_vic = vicreg_loss(z1.float(), z2.float())[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nt = nt_xent_loss(z1, z2, 0.2)
        vic, parts = vicreg_loss(z1, z2)
    assert nt.dtype == vic.dtype == parts["covariance"].dtype == torch.float32
    torch.testing.assert_close(nt, reference_nt, rtol=0, atol=0)
    torch.testing.assert_close(vic, reference_vic, rtol=0, atol=0)


def test_float64_stays_float64():
    z1, z2 = _pair(4, 3)
    assert nt_xent_loss(z1, z2).dtype == torch.float64
    assert vicreg_loss(z1, z2.float())[0].dtype == torch.float64


BAD_PAIRS = [
    (torch.randn(4, 3), torch.randn(4, 2), ValueError, "same shape"),
    (torch.randn(4, 3), torch.randn(5, 3), ValueError, "same shape"),
    (torch.randn(4), torch.randn(4), ValueError, "B x D"),
    (torch.randn(2, 4, 3), torch.randn(2, 4, 3), ValueError, "B x D"),
    (torch.randn(1, 3), torch.randn(1, 3), ValueError, "at least 2"),
    (torch.randn(4, 0), torch.randn(4, 0), ValueError, "D = 0"),
    (torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long), TypeError, "floating-point"),
    (torch.ones(4, 3, dtype=torch.bool), torch.ones(4, 3), TypeError, "floating-point"),
    (torch.randn(4, 3, dtype=torch.complex64), torch.randn(4, 3), TypeError, "floating-point"),
    ([[1.0, 2.0], [3.0, 4.0]], torch.randn(2, 2), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("z1,z2,error,words", BAD_PAIRS)
@pytest.mark.parametrize("loss", [nt_xent_loss, vicreg_loss])
def test_bad_input_is_refused(loss, z1, z2, error, words):
    with pytest.raises(error, match=words) as info:
        loss(z1, z2)
    assert loss.__name__ in str(info.value)


@pytest.mark.parametrize("t", [0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        nt_xent_loss(torch.randn(3, 2), torch.randn(3, 2), temperature=t)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"sim_weight": -1.0}, "sim_weight must be a finite number >= 0"),
        ({"var_weight": float("nan")}, "var_weight"),
        ({"cov_weight": float("inf")}, "cov_weight"),
        ({"eps": 0.0}, "eps must be a finite number > 0"),
        ({"eps": -1e-4}, "eps"),
    ],
)
def test_bad_vicreg_options(kwargs, words):
    with pytest.raises(ValueError, match=words):
        vicreg_loss(torch.randn(3, 2), torch.randn(3, 2), **kwargs)
