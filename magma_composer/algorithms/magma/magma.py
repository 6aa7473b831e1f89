"""MAGMA: layer-wise manifold regularisation of an encoder (Dondera, Singh, Jamali-Rad, arXiv 2412.02871).

The functional form :func:`magma_loss` comes first, the Composer :class:`MAGMA` algorithm after it.
The maths is docs/algorithms.md §1; the method card is ``README.md`` beside this file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Union

import torch

from magma_composer.algorithms.tap_regularizer import TapRegularizer, TermRecord
from magma_composer.distributed import all_gather_with_grad
from magma_composer.feature_checks import check_feature_dtype, compute_dtype, require_within_range, within_range
from magma_composer.models.taps import FeatureTap
from magma_composer.options import OptionError, check_number
from magma_composer.schedules import WeightSchedule

__all__ = ["MAGMA", "MagmaStats", "magma_loss"]


class MagmaStats(NamedTuple):
    """Diagnostics of one :func:`magma_loss` evaluation (detached scalar tensors).

    Attributes:
        valid: False where the term was skipped (fewer than 3 samples; every pairwise distance of the
            reference features 0; a data-derived ``gamma`` of 0; or, with ``check_finite=False``, NaN,
            infinite or overflowing features): the loss is then 0 with a zero gradient.
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


def _magma_limits(dtype: torch.dtype, b: int, d_x: int, d_y: int, eps: float) -> tuple[float, float]:
    """The largest ``|x|`` and ``|y|`` for which no intermediate of :func:`magma_loss` can overflow ``dtype``.

    ``D2 <= 16 D_x max|x|^2`` and the mean of ``D2`` sums ``B^2`` of them; ``|(L Y)_ij| <= (1 + B) max|y|``
    (``s_i W_ij s_j <= 1``) and the term sums ``B D_y`` products; ``s * Y <= max|y| / sqrt(eps)``. A factor 4
    of headroom covers rounding.
    """
    big = torch.finfo(dtype).max
    limit_x = math.sqrt(big / (64.0 * max(d_x, 1) * b * b))
    limit_y = min(math.sqrt(big / (16.0 * b * max(d_y, 1) * (b + 1))), big * math.sqrt(eps) / 4.0)
    return limit_x, limit_y


def magma_loss(
    reference: torch.Tensor,
    target: torch.Tensor,
    *,
    rbf_scale: float = 1.0,
    eps: float = 1e-4,
    gamma: float | None = None,
    return_stats: bool = False,
    check_finite: bool = True,
) -> Union[torch.Tensor, tuple[torch.Tensor, MagmaStats]]:
    """The MAGMA regulariser ``R(X, Y) = trace(Y^T L Y) / B^2`` of docs/algorithms.md §1.

    The graph comes from the reference features ``X``: ``D2[i, j] = ||x_i - x_j||^2`` (diagonal exactly
    0), ``W[i, j] = exp(-rbf_scale * D2[i, j] / gamma)`` off the diagonal and 0 on it, with ``gamma`` the
    unbiased standard deviation of the non-zero off-diagonal ``D2`` entries unless given;
    ``s_i = 1 / sqrt(sum_j W[i, j] + eps)`` and ``L = I - diag(s) W diag(s)``. The term is computed as
    ``sum(Y * (L Y)) / B^2`` with ``B x D`` products (never a ``D x D`` matrix), in float32 (float64 for
    float64 inputs) with autocast disabled. Gradients reach ``Y``, and ``X`` through ``W`` and ``gamma``.

    Degenerate input (``B < 3``; every ``D2`` entry 0; a data-derived ``gamma`` of 0) makes the term
    undefined: it is then skipped, i.e. the result is a zero whose gradient is zero, and ``stats.valid``
    is false. The check needs no device synchronisation.

    Non-finite features (NaN or inf in ``reference`` or ``target``), and features so large that the term
    would overflow the compute dtype (beyond about ``1e13`` in float32 for ViT-B-sized batches), are a
    ``ValueError`` naming the input when ``check_finite`` is true (the default; it costs one device
    synchronisation). With ``check_finite=False``, the setting for a training step, they make the term
    skipped like degenerate input, without any synchronisation: value 0, ``valid`` false and gradients that
    are exactly zero (the features are replaced by zeros before any arithmetic, so no NaN reaches backward).

    Args:
        reference (torch.Tensor): ``B x D_x`` reference-layer features ``X``, floating point.
        target (torch.Tensor): ``B x D_y`` target-layer features ``Y``, floating point.
        rbf_scale (float): multiplies ``D2 / gamma`` inside the exponential. Default: ``1.0``.
        eps (float): added to the degree inside the square root, ``> 0``. Default: ``1e-4``.
        gamma (float, optional): a fixed RBF bandwidth ``> 0``; by default it is derived from the batch.
        return_stats (bool): also return :class:`MagmaStats`.
        check_finite (bool): raise on non-finite or overflowing features (one device synchronisation);
            ``False`` skips the term instead, with no synchronisation. Default: ``True``.

    Returns:
        torch.Tensor | tuple[torch.Tensor, MagmaStats]: the scalar term (and its diagnostics).

    Raises:
        TypeError: a feature tensor is not floating point (integer, bool or complex).
        ValueError: the shapes do not match, an option is out of range, or (``check_finite``) a feature
            tensor holds NaN, inf or overflowing values.

    Example:
        >>> x, y = torch.randn(256, 768), torch.randn(256, 768, requires_grad=True)
        >>> loss = magma_loss(x, y)
        >>> loss.backward()
    """
    check_feature_dtype("magma_loss", "reference", reference)
    check_feature_dtype("magma_loss", "target", target)
    if reference.dim() != 2 or target.dim() != 2 or reference.shape[0] != target.shape[0]:
        raise ValueError(
            f"magma_loss needs B x D reference and target features with the same B, got {tuple(reference.shape)} "
            f"and {tuple(target.shape)}"
        )
    rbf_scale = _check_positive(rbf_scale, "rbf_scale")
    eps = _check_positive(eps, "eps")
    if gamma is not None:
        gamma = _check_positive(gamma, "gamma")
    dtype = compute_dtype(reference, target)
    device = target.device
    b = target.shape[0]
    limit_x, limit_y = _magma_limits(dtype, max(b, 1), reference.shape[1], target.shape[1], eps)

    with torch.autocast(device_type=device.type, enabled=False):
        x = reference.to(dtype)
        y = target.to(dtype)
        if check_finite:
            require_within_range("magma_loss", "reference", x, limit_x)
            require_within_range("magma_loss", "target", y, limit_y)
        zero = torch.zeros((), dtype=dtype, device=device)
        if b < 3:
            stats = MagmaStats(torch.zeros((), dtype=torch.bool, device=device), zero, zero)
            return (zero, stats) if return_stats else zero
        # zeros in place of unusable features: the term below is then finite and its gradient exactly zero
        usable = within_range(x, limit_x) & within_range(y, limit_y)
        x = torch.where(usable, x, zero)
        y = torch.where(usable, y, zero)
        # pairwise squared distances from the Gram matrix of the centred features (translation-invariant,
        # and centring keeps the cancellation in sq_i + sq_j - 2 <x_i, x_j> small)
        xc = x - x.mean(dim=0, keepdim=True)
        sq = (xc * xc).sum(dim=1)
        d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (xc @ xc.T)).clamp_min(0.0)
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=device)
        d2 = torch.where(off_diagonal, d2, zero)

        big = torch.finfo(dtype).max
        if gamma is None:
            nonzero = d2 > 0  # the diagonal is exactly 0, so this is off-diagonal too
            n = nonzero.sum()
            # the spread of D2 / max(D2), scaled back: squaring D2 itself could overflow
            top = d2.detach().amax().clamp_min(torch.finfo(dtype).tiny)
            scaled = d2 / top
            mean = (scaled * nonzero).sum() / n.clamp_min(1)
            var = (((scaled - mean) * nonzero) ** 2).sum() / (n - 1).clamp_min(1)
            valid = usable & (n >= 2) & (var > 0)
            # a safe value where invalid, so that neither the value nor the gradient can become NaN
            gamma_t = top * torch.sqrt(torch.where(valid, var, torch.ones_like(var)))
        else:
            valid = usable
            gamma_t = torch.full((), gamma, dtype=dtype, device=device)
        # finite even for a tiny gamma: D2 = 0 times an infinite factor would be NaN
        w = torch.exp(d2 * (-rbf_scale / gamma_t).clamp_min(-big))
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


#: the per-step diagnostics logged as ``magma/<name>`` (see :func:`_diagnostics`)
_DIAGNOSTICS = ("gamma", "mean_affinity", "target_norm", "target_spread", "reference_norm", "rayleigh")


def _diagnostics(x: torch.Tensor, y: torch.Tensor, value: torch.Tensor, stats: MagmaStats) -> dict[str, torch.Tensor]:
    """One part's logged diagnostics, detached float32 scalars on the device (no synchronisation).

    ``target_norm`` and ``reference_norm`` are the mean L2 row norms of ``Y`` and ``X``; ``target_spread`` the mean
    row norm of ``Y`` minus its batch mean (what the graph can act on); ``rayleigh`` is ``R B^2 / ||Y||_F^2``, the
    Rayleigh quotient of ``L`` on ``Y``: 1 where the graph has no weight (``L = I``, the term is then only the size
    of ``Y``), below 1 where neighbours in ``X`` have aligned ``Y``.
    """
    with torch.no_grad():
        xd, yd = x.detach().float(), y.detach().float()
        energy = (yd * yd).sum()
        b = yd.shape[0]
        return {
            "gamma": stats.gamma.float(),
            "mean_affinity": stats.mean_affinity.float(),
            "target_norm": yd.norm(dim=1).mean(),
            "target_spread": (yd - yd.mean(dim=0, keepdim=True)).norm(dim=1).mean(),
            "reference_norm": xd.norm(dim=1).mean(),
            "rayleigh": value.detach().float() * (b * b) / energy.clamp_min(torch.finfo(torch.float32).tiny),
        }


def _check_layer(key: str, layer: Any) -> None:
    """A layer option is an int (a ViT block index) or a non-empty module name; which exist is checked on the model."""
    if isinstance(layer, str):
        if not layer:
            raise OptionError(key, "expected a module name such as 'layer3', got an empty string")
    elif isinstance(layer, bool) or not isinstance(layer, int):
        raise OptionError(
            key,
            f"expected an integer (a ViT block index) or a module name (e.g. 'layer3'), got {layer!r} "
            f"({type(layer).__name__})",
        )


class MAGMA(TapRegularizer):
    """Adds the MAGMA manifold regulariser of an encoder's layers to the training loss.

    Each training step (each microbatch), for every reference layer ``k`` it computes
    :func:`magma_loss` ``(X_k, Y)``, where ``X_k`` and ``Y`` are the reduced outputs of layer ``k`` and
    of the target layer recorded by the model's :class:`~magma_composer.models.FeatureTap`, averages over
    the reference layers (and over the recorded forward calls if the model ran the encoder several times
    outside :func:`~magma_composer.models.taps.tap_paused`), and adds ``weight * R`` to
    ``state.loss['magma']``.

    It works on any ComposerModel with an encoder the tap can read (see
    :func:`~magma_composer.models.taps.find_encoder`):

    * a timm ``VisionTransformer`` (the MAE of this package, a SimCLR or VICReg model on a ViT): layers
      are block indices, or dotted module names (``'blocks.10'``); a block's output is reduced to the
      mean over its patch tokens (CLS excluded);
    * any other encoder exposed as the model's ``encoder`` attribute, e.g. a timm ResNet: layers are
      dotted module names, a 4-D output is reduced by global average pooling. The published ResNet
      setting is ``reference_layers=['layer3'], target_layer='layer4'`` (the pooled ``layer4`` is the
      ResNet's pooled output).

    Two-view models (SimCLR, VICReg) encode their second view inside ``tap_paused``, so the term reads
    the first view only. The term is batch-wide: it sees one microbatch, so set the microbatch to the
    per-device batch (a warning says when it is smaller), or use ``gather=True`` for the global batch
    across ranks.

    Logged every batch: ``magma/weight``; while the weight is not 0, also ``magma/term`` (the unweighted
    ``R``), ``magma/gamma``, ``magma/mean_affinity`` (mean off-diagonal ``W``), ``magma/target_norm``
    (the mean L2 norm of the rows of ``Y``: the term can be lowered by shrinking ``Y``),
    ``magma/target_spread`` (the same for ``Y`` minus its batch mean), ``magma/reference_norm`` (for ``X``),
    ``magma/rayleigh`` (``R B^2 / ||Y||_F^2``: 1 when the graph has no weight) and ``magma/skipped``; the
    trainer logs ``loss/train/magma`` (``weight * R``).

    Args:
        reference_layers (int | list[int | str]): the reference layers: 0-based ViT block indices
            (negative counts from the end) or dotted module names of the encoder (``'layer3'``). Default:
            ``[10]`` (ViT-B's recipe).
        target_layer (int | str): the target layer, after every reference layer (for names: later in the
            encoder's module registration order, ``named_modules()``, and not inside a reference module).
            Default: ``-1`` (the last ViT block).
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

    def __init__(
        self,
        reference_layers: Union[int, Sequence[Union[int, str]]] = (10,),
        target_layer: Union[int, str] = -1,
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
            raise OptionError(
                "reference_layers",
                f"expected a list of block indices or module names (e.g. [10] or [layer3]), got {reference_layers!r}",
            )
        reference_layers = list(reference_layers)
        if not reference_layers:
            raise OptionError("reference_layers", "must name at least one block (e.g. [10] or [layer3])")
        for i, layer in enumerate(reference_layers):
            _check_layer(f"reference_layers[{i}]", layer)
        _check_layer("target_layer", target_layer)
        self.reference_layers = reference_layers
        self.target_layer = target_layer
        self.rbf_scale = check_number("rbf_scale", rbf_scale, 0.0, open_min=True)
        self.eps = check_number("eps", eps, 0.0, open_min=True)
        self.gamma = None if gamma is None else check_number("gamma", gamma, 0.0, open_min=True)
        self._reference_blocks: list[Union[int, str]] = []
        self._target_block: Union[int, str] = -1

    def _request(self, tap: FeatureTap) -> None:
        tap.request_blocks(self._reference_blocks + [self._target_block])

    def _check(self, tap: FeatureTap) -> None:
        refs = [tap.resolve(layer, "reference_layers") for layer in self.reference_layers]
        target = tap.resolve(self.target_layer, "target_layer")
        if len(set(refs)) != len(refs):
            raise ValueError(f"reference_layers={self.reference_layers} names a block twice")
        if all(isinstance(key, int) for key in [*refs, target]):
            late = [self.reference_layers[j] for j, i in enumerate(refs) if i >= target]
            if late:
                raise ValueError(
                    f"target_layer={self.target_layer} (block {target} of {tap.depth}) must come after every "
                    f"reference block, but reference_layers {late} do not come before it"
                )
        else:
            # named modules: ordered by registration (parents before their children), and the target may not
            # lie inside a reference module (its output would be computed before the reference's)
            target_name, target_order = tap.module_name(target), tap.module_order(target)
            late = [
                layer
                for layer, key in zip(self.reference_layers, refs)
                if tap.module_order(key) >= target_order or target_name.startswith(tap.module_name(key) + ".")
            ]
            if late:
                raise ValueError(
                    f"target_layer={self.target_layer!r} must come after every reference module in the encoder's "
                    f"registration order (the order of named_modules(), a module before its children) and lie "
                    f"inside none of them, but reference_layers {late} do not come before it"
                )
        self._reference_blocks, self._target_block = refs, target

    def _compute(self, tap: FeatureTap) -> tuple[torch.Tensor, TermRecord]:
        references = [tap.block_features(i) for i in self._reference_blocks]
        targets = tap.block_features(self._target_block)
        if any(len(r) != len(targets) for r in references):
            raise RuntimeError(
                "MAGMA: the reference and target blocks ran a different number of times this step "
                f"({[len(r) for r in references]} vs {len(targets)})"
            )
        values, valids = [], []
        stats: dict[str, list[torch.Tensor]] = {name: [] for name in _DIAGNOSTICS}
        for call, y in enumerate(targets):
            xs = [r[call] for r in references]
            if self.gather:
                widths = [x.shape[1] for x in xs] + [y.shape[1]]
                *xs, y = all_gather_with_grad(torch.cat(xs + [y], dim=1)).split(widths, dim=1)
            for x in xs:
                value, part = magma_loss(
                    x,
                    y,
                    rbf_scale=self.rbf_scale,
                    eps=self.eps,
                    gamma=self.gamma,
                    return_stats=True,
                    check_finite=False,  # a training step: skip a non-finite batch without a device sync
                )
                values.append(value)
                valids.append(part.valid)
                for name, diagnostic in _diagnostics(x, y, value, part).items():
                    stats[name].append(torch.where(part.valid, diagnostic, 0.0))
        return self._average_valid(values, valids, stats)

    def _skip_reason(self) -> str:
        return "it needs at least 3 samples whose reference features are finite and not all identical"

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
