"""MAGMA: layer-wise manifold regularisation of a ViT encoder (Dondera, Singh, Jamali-Rad, arXiv 2412.02871).

The functional form :func:`magma_loss` comes first, the Composer :class:`MAGMA` algorithm after it.
The maths is docs/algorithms.md §1; the method card is ``README.md`` beside this file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch

from magma_composer.algorithms.tap_regularizer import TapRegularizer
from magma_composer.distributed import all_gather_with_grad
from magma_composer.models.taps import FeatureTap
from magma_composer.schedules import WeightSchedule

__all__ = ["MAGMA", "MagmaStats", "magma_loss"]


class MagmaStats(NamedTuple):
    """Diagnostics of one :func:`magma_loss` evaluation (detached scalar tensors).

    Attributes:
        valid: False where the term was skipped (fewer than 3 samples, or every pairwise distance of the
            reference features 0, or a data-derived ``gamma`` of 0): the loss is then 0 with no gradient.
        gamma: the RBF bandwidth used (0 where skipped).
        mean_affinity: the mean of ``W`` over the ``B * (B - 1)`` off-diagonal pairs (0 where skipped).
    """

    valid: torch.Tensor
    gamma: torch.Tensor
    mean_affinity: torch.Tensor


def _check_positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def magma_loss(
    reference: torch.Tensor,
    target: torch.Tensor,
    *,
    rbf_scale: float = 1.0,
    eps: float = 1e-4,
    gamma: float | None = None,
    return_stats: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, MagmaStats]]:
    """The MAGMA regulariser ``R(X, Y) = trace(Y^T L Y) / B^2`` of docs/algorithms.md §1.

    The graph comes from the reference features ``X``: ``D2[i, j] = ||x_i - x_j||^2`` (diagonal exactly
    0), ``W[i, j] = exp(-rbf_scale * D2[i, j] / gamma)`` off the diagonal and 0 on it, with ``gamma`` the
    unbiased standard deviation of the non-zero off-diagonal ``D2`` entries unless given;
    ``s_i = 1 / sqrt(sum_j W[i, j] + eps)`` and ``L = I - diag(s) W diag(s)``. The term is computed as
    ``sum(Y * (L Y)) / B^2`` with ``B x D`` products (never a ``D x D`` matrix), in float32 (float64 for
    float64 inputs) with autocast disabled. Gradients reach ``Y``, and ``X`` through ``W`` and ``gamma``.

    Degenerate input (``B < 3``; every ``D2`` entry 0; a data-derived ``gamma`` of 0) makes the term
    undefined: it is then skipped, i.e. the result is a zero that carries no gradient, and
    ``stats.valid`` is false. The check needs no device synchronisation.

    Args:
        reference (torch.Tensor): ``B x D_x`` reference-layer features ``X``.
        target (torch.Tensor): ``B x D_y`` target-layer features ``Y``.
        rbf_scale (float): multiplies ``D2 / gamma`` inside the exponential. Default: ``1.0``.
        eps (float): added to the degree inside the square root, ``> 0``. Default: ``1e-4``.
        gamma (float, optional): a fixed RBF bandwidth ``> 0``; by default it is derived from the batch.
        return_stats (bool): also return :class:`MagmaStats`.

    Returns:
        torch.Tensor | tuple[torch.Tensor, MagmaStats]: the scalar term (and its diagnostics).

    Example:
        >>> x, y = torch.randn(256, 768), torch.randn(256, 768, requires_grad=True)
        >>> loss = magma_loss(x, y)
        >>> loss.backward()
    """
    if reference.dim() != 2 or target.dim() != 2 or reference.shape[0] != target.shape[0]:
        raise ValueError(
            f"magma_loss needs B x D reference and target features with the same B, got {tuple(reference.shape)} "
            f"and {tuple(target.shape)}"
        )
    rbf_scale = _check_positive(rbf_scale, "rbf_scale")
    eps = _check_positive(eps, "eps")
    if gamma is not None:
        gamma = _check_positive(gamma, "gamma")
    dtype = _compute_dtype(reference, target)
    device = target.device
    b = target.shape[0]
    if b < 3:
        zero = torch.zeros((), dtype=dtype, device=device)
        out = zero
        stats = MagmaStats(torch.zeros((), dtype=torch.bool, device=device), zero, zero)
        return (out, stats) if return_stats else out

    with torch.autocast(device_type=device.type, enabled=False):
        x = reference.to(dtype)
        y = target.to(dtype)
        # pairwise squared distances from the Gram matrix of the centred features (translation-invariant,
        # and centring keeps the cancellation in sq_i + sq_j - 2 <x_i, x_j> small)
        xc = x - x.mean(dim=0, keepdim=True)
        sq = (xc * xc).sum(dim=1)
        d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (xc @ xc.T)).clamp_min(0.0)
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=device)
        zero = torch.zeros((), dtype=dtype, device=device)
        d2 = torch.where(off_diagonal, d2, zero)

        if gamma is None:
            nonzero = d2 > 0  # the diagonal is exactly 0, so this is off-diagonal too
            n = nonzero.sum()
            mean = (d2 * nonzero).sum() / n.clamp_min(1)
            var = (((d2 - mean) * nonzero) ** 2).sum() / (n - 1).clamp_min(1)
            valid = (n >= 2) & (var > 0)
            # a safe value where invalid, so that neither the value nor the gradient can become NaN
            gamma_t = torch.sqrt(torch.where(valid, var, torch.ones_like(var)))
            w = torch.exp(d2 * (-rbf_scale / gamma_t))
        else:
            valid = torch.ones((), dtype=torch.bool, device=device)
            gamma_t = torch.full((), gamma, dtype=dtype, device=device)
            w = torch.exp(d2 * (-rbf_scale / gamma))
        w = torch.where(off_diagonal, w, zero)
        s = torch.rsqrt(w.sum(dim=1) + eps).unsqueeze(1)
        ly = y - s * (w @ (s * y))  # L Y, with B x D products only
        r = (y * ly).sum() / (b * b)
        out = torch.where(valid, r, zero)
        if not return_stats:
            return out
        with torch.no_grad():
            stats = MagmaStats(
                valid=valid,
                gamma=torch.where(valid, gamma_t, zero),
                mean_affinity=torch.where(valid, w.sum() / (b * (b - 1)), zero),
            )
        return out, stats


class MAGMA(TapRegularizer):
    """Adds the MAGMA manifold regulariser of a ViT's blocks to the training loss.

    Each training step (each microbatch), for every reference block ``k`` it computes
    :func:`magma_loss` ``(X_k, Y)``, where ``X_k`` and ``Y`` are the patch-token means (CLS excluded)
    of block ``k``'s and the target block's outputs, averages over the reference blocks (and over the
    model's forward calls if it ran the encoder several times, e.g. on two views), and adds
    ``weight * R`` to ``state.loss['magma']``.

    It works on any ComposerModel that holds a timm ``VisionTransformer`` (the MAE of this package, a
    SimCLR or VICReg model...). The term is batch-wide: it sees one microbatch, so set the microbatch
    to the per-device batch (a warning says when it is smaller), or use ``gather=True`` for the global
    batch across ranks.

    Logged every batch: ``magma/weight``; while the weight is not 0, also ``magma/term`` (the unweighted
    ``R``), ``magma/gamma``, ``magma/mean_affinity`` (mean off-diagonal ``W``), ``magma/target_norm``
    (the mean L2 norm of the rows of ``Y``: the term can be lowered by shrinking ``Y``) and
    ``magma/skipped``; the trainer logs ``loss/train/magma`` (``weight * R``).

    Args:
        reference_layers (int | list[int]): 0-based reference block indices (negative counts from the
            end). Default: ``[10]`` (ViT-B's recipe).
        target_layer (int): the target block, after every reference block. Default: ``-1`` (the last).
        weight (float | dict | WeightSchedule): the weight lambda, or a schedule such as
            ``{'type': 'warmup', 'start': '10ep', 'end': '110ep', 'value': 1.0}``. Default: ``1.0``.
        rbf_scale (float): see :func:`magma_loss`. Default: ``1.0``.
        eps (float): see :func:`magma_loss`. Default: ``1e-4``.
        gamma (float, optional): a fixed bandwidth; default: derived from each batch.
        gather (bool): compute the term on the batch gathered from all ranks (gradient to each rank's
            own rows). Default: ``False`` (the local batch, as in the paper).

    Example:
        .. code-block:: python

            from composer import Trainer
            from magma_composer.algorithms.magma import MAGMA

            magma = MAGMA(reference_layers=[10], target_layer=11,
                          weight={'type': 'warmup', 'start': '10ep', 'end': '110ep', 'value': 1.0})
            trainer = Trainer(model=model, train_dataloader=loader, max_duration='400ep', algorithms=[magma])
    """

    key = "magma"
    stat_names = ("gamma", "mean_affinity", "target_norm")

    def __init__(
        self,
        reference_layers: Union[int, Sequence[int]] = (10,),
        target_layer: int = -1,
        weight: Union[float, Mapping[str, Any], WeightSchedule] = 1.0,
        rbf_scale: float = 1.0,
        eps: float = 1e-4,
        gamma: float | None = None,
        gather: bool = False,
    ) -> None:
        super().__init__(weight, gather)
        if isinstance(reference_layers, int) and not isinstance(reference_layers, bool):
            reference_layers = [reference_layers]
        if isinstance(reference_layers, (str, bytes)) or not isinstance(reference_layers, Sequence):
            raise TypeError(f"reference_layers must be a list of block indices, got {reference_layers!r}")
        reference_layers = list(reference_layers)
        if not reference_layers:
            raise ValueError("reference_layers must name at least one block")
        for index in reference_layers + [target_layer]:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(
                    f"reference_layers and target_layer must be int block indices, got {index!r} "
                    f"({type(index).__name__})"
                )
        self.reference_layers = reference_layers
        self.target_layer = target_layer
        self.rbf_scale = _check_positive(rbf_scale, "rbf_scale")
        self.eps = _check_positive(eps, "eps")
        self.gamma = None if gamma is None else _check_positive(gamma, "gamma")
        self._reference_blocks: list[int] = []
        self._target_block = -1

    def _request(self, tap: FeatureTap) -> None:
        refs = [tap.normalize_block_index(i, "reference_layers") for i in self.reference_layers]
        target = tap.normalize_block_index(self.target_layer, "target_layer")
        if len(set(refs)) != len(refs):
            raise ValueError(f"reference_layers={self.reference_layers} names a block twice")
        late = [self.reference_layers[j] for j, i in enumerate(refs) if i >= target]
        if late:
            raise ValueError(
                f"target_layer={self.target_layer} (block {target} of {tap.depth}) must come after every reference "
                f"block, but reference_layers {late} do not come before it"
            )
        tap.request_blocks(refs + [target])
        self._reference_blocks, self._target_block = refs, target

    def _compute(self, tap: FeatureTap) -> tuple[torch.Tensor, torch.Tensor]:
        references = [tap.block_features(i) for i in self._reference_blocks]
        targets = tap.block_features(self._target_block)
        if any(len(r) != len(targets) for r in references):
            raise RuntimeError(
                "MAGMA: the reference and target blocks ran a different number of times this step "
                f"({[len(r) for r in references]} vs {len(targets)})"
            )
        values, valids, gammas, affinities, norms = [], [], [], [], []
        for call, y in enumerate(targets):
            xs = [r[call] for r in references]
            if self.gather:
                widths = [x.shape[1] for x in xs] + [y.shape[1]]
                *xs, y = all_gather_with_grad(torch.cat(xs + [y], dim=1)).split(widths, dim=1)
            for x in xs:
                value, stats = magma_loss(
                    x, y, rbf_scale=self.rbf_scale, eps=self.eps, gamma=self.gamma, return_stats=True
                )
                values.append(value)
                valids.append(stats.valid)
                gammas.append(stats.gamma)
                affinities.append(stats.mean_affinity)
            norms.append(y.detach().float().norm(dim=1).mean())
        term, denominator, head = self._average_valid(values, valids)
        record = torch.stack(
            head
            + [
                torch.stack(gammas).float().sum() / denominator,
                torch.stack(affinities).float().sum() / denominator,
                torch.stack(norms).mean(),
            ]
        )
        return term, record

    def _skip_reason(self) -> str:
        return "it needs at least 3 samples whose reference features are not all identical"

    def _repr_args(self) -> dict[str, Any]:
        return {
            "reference_layers": self.reference_layers,
            "target_layer": self.target_layer,
            "weight": self.schedule,
            "rbf_scale": self.rbf_scale,
            "eps": self.eps,
            "gamma": self.gamma,
            "gather": self.gather,
        }
