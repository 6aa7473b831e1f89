"""VICReg's variance-invariance-covariance loss (Bardes, Ponce, LeCun, ICLR 2022, arXiv 2105.04906)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from magma_composer.losses._inputs import check_nonnegative, check_pair, compute_dtype

__all__ = ["vicreg_loss"]


def _variance_covariance(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v(Z), c(Z))`` of one branch, see :func:`vicreg_loss`."""
    b, d = z.shape
    centred = z - z.mean(dim=0, keepdim=True)
    cov = (centred.T @ centred) / (b - 1)
    variance = F.relu(1.0 - torch.sqrt(cov.diagonal() + eps)).mean()
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=z.device)
    covariance = cov.masked_select(off_diagonal).pow(2).sum() / d
    return variance, covariance


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg's loss of the embeddings ``Z = z1`` and ``Z' = z2`` of a batch of ``B`` two-view samples.

    With ``C(Z) = (Z - mean(Z))^T (Z - mean(Z)) / (B - 1)`` the ``D x D`` covariance of a branch (its
    diagonal the unbiased variances ``Var(z^j)``)::

        invariance s(Z, Z') = 1 / (B D) * sum_i ||z_i - z'_i||^2                 (the mean squared error)
        v(Z)                = 1 / D * sum_j max(0, 1 - sqrt(Var(z^j) + eps))     (hinge on the std, gamma 1)
        c(Z)                = 1 / D * sum_{j != k} C(Z)_jk^2
        variance            = v(Z) + v(Z')
        covariance          = c(Z) + c(Z')
        total               = sim_weight * invariance + var_weight * variance + cov_weight * covariance

    Both regularisers are summed over the two branches as in the paper's eq. 6 and solo-learn's
    ``vicreg_loss_func`` (the code behind MAGMA's M-VICReg). The authors' released code and lightly's
    ``VICRegLoss`` *average* the two variance terms (a factor 1/2 on ``variance``): their
    ``var_weight = 25`` equals ``var_weight = 12.5`` here. The invariance term is the mean over the
    ``B x D`` entries (``F.mse_loss``), as in every released implementation; the paper's eq. 2 omits the
    ``1 / D``. Computed in float32 (float64 for float64 input) with autocast disabled.

    Args:
        z1 (torch.Tensor): ``B x D`` embeddings of the first views (the expander's output).
        z2 (torch.Tensor): ``B x D`` embeddings of the second views, row ``i`` the same sample.
        sim_weight (float): ``lambda >= 0``, the invariance weight. Default: ``25.0``.
        var_weight (float): ``mu >= 0``, the variance weight. Default: ``25.0``.
        cov_weight (float): ``nu >= 0``, the covariance weight. Default: ``1.0``.
        eps (float): ``> 0``, added to the variance inside the square root. Default: ``1e-4``.

    Returns:
        tuple[torch.Tensor, dict[str, torch.Tensor]]: the weighted total, and the unweighted parts
        ``{'invariance': s, 'variance': v(Z) + v(Z'), 'covariance': c(Z) + c(Z')}`` (scalars in the compute
        dtype, in the graph).

    Raises:
        TypeError: ``z1`` or ``z2`` is not a real floating-point tensor.
        ValueError: the shapes are not one ``B x D`` with ``B >= 2``, a weight is negative or not finite,
            or ``eps`` is not ``> 0``.

    Example:
        >>> z1, z2 = torch.randn(256, 2048), torch.randn(256, 2048)
        >>> total, parts = vicreg_loss(z1, z2)
        >>> total.item() == (25 * parts['invariance'] + 25 * parts['variance'] + parts['covariance']).item()
        True
    """
    fn = "vicreg_loss"
    check_pair(fn, z1, z2)
    sim_weight = check_nonnegative(fn, "sim_weight", sim_weight)
    var_weight = check_nonnegative(fn, "var_weight", var_weight)
    cov_weight = check_nonnegative(fn, "cov_weight", cov_weight)
    eps = check_nonnegative(fn, "eps", eps, positive=True)
    dtype = compute_dtype(z1, z2)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a, b = z1.to(dtype), z2.to(dtype)
        invariance = F.mse_loss(a, b)
        var_a, cov_a = _variance_covariance(a, eps)
        var_b, cov_b = _variance_covariance(b, eps)
        variance = var_a + var_b
        covariance = cov_a + cov_b
        total = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return total, {"invariance": invariance, "variance": variance, "covariance": covariance}
