"""SimCLR's normalized-temperature cross entropy (NT-Xent; Chen et al., ICML 2020, arXiv 2002.05709)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from magma_composer.losses._inputs import check_nonnegative, check_pair, compute_dtype

__all__ = ["nt_xent_loss"]


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's contrastive loss over the ``2B`` embeddings of a batch of ``B`` two-view samples.

    With ``u_1..u_2B`` the rows of ``z1`` then ``z2``, each scaled to unit length, ``s_ik = u_i . u_k`` the
    cosine similarity and ``p(i)`` the other view of sample ``i`` (``p(i) = i + B`` for ``i <= B`` and
    ``i - B`` otherwise)::

        l_i = -log( exp(s_i,p(i) / t) / sum_{k != i} exp(s_ik / t) )
        L   = 1 / (2B) * sum_{i=1..2B} l_i

    Each anchor's positive is its other view; the other ``2B - 2`` embeddings are its negatives (the
    denominator holds the positive and the ``2B - 2`` negatives). This is SimCLR's NT-Xent (the paper's
    eq. 1, averaged over both orders of every pair) and the loss of lightly's ``NTXentLoss`` without a
    memory bank. Computed in float32 (float64 for float64 input) with autocast disabled; a zero
    embedding stays zero after the normalisation (L2 norm clamped at 1e-12).

    Args:
        z1 (torch.Tensor): ``B x D`` projections of the first views.
        z2 (torch.Tensor): ``B x D`` projections of the second views, row ``i`` the same sample as
            ``z1``'s row ``i``.
        temperature (float): ``t > 0``. Default: ``0.1``, the SimCLR paper's ImageNet setting (batch 4096);
            solo-learn's SimCLR configurations, and ``ComposerSimCLR``'s default, use 0.2.

    Returns:
        torch.Tensor: the scalar loss, in the compute dtype.

    Raises:
        TypeError: ``z1`` or ``z2`` is not a real floating-point tensor.
        ValueError: the shapes are not one ``B x D`` with ``B >= 2``, or ``temperature`` is not ``> 0``.

    Example:
        >>> z1, z2 = torch.randn(256, 128), torch.randn(256, 128)
        >>> loss = nt_xent_loss(z1, z2, temperature=0.2)
    """
    check_pair("nt_xent_loss", z1, z2)
    temperature = check_nonnegative("nt_xent_loss", "temperature", temperature, positive=True)
    dtype = compute_dtype(z1, z2)
    b = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        u = F.normalize(torch.cat([z1, z2], dim=0).to(dtype), dim=1)
        logits = (u @ u.T) / temperature
        # an anchor is not its own negative: -inf gives exp() = 0 in the log-sum-exp
        self_pair = torch.eye(2 * b, dtype=torch.bool, device=u.device)
        logits = logits.masked_fill(self_pair, float("-inf"))
        positive = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(u.device)
        return F.cross_entropy(logits, positive)
