"""Uniformity (U-MAE): spread the encoder's CLS features over the sphere (Zhang, Wang, Wang, NeurIPS 2022).

The functional form :func:`uniformity_loss` comes first, the Composer :class:`Uniformity` algorithm
after it. The maths is docs/algorithms.md §2; the method card is ``README.md`` beside this file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F

from magma_composer.algorithms.tap_regularizer import TapRegularizer, TermRecord
from magma_composer.distributed import all_gather_with_grad
from magma_composer.feature_checks import check_feature_dtype, require_within_range, within_range
from magma_composer.models.taps import FeatureTap
from magma_composer.schedules import WeightSchedule

__all__ = ["Uniformity", "UniformityStats", "uniformity_loss"]


class UniformityStats(NamedTuple):
    """Diagnostics of one :func:`uniformity_loss` evaluation (detached scalar tensors).

    Attributes:
        valid: False where the term was skipped (an empty batch, or, with ``check_finite=False``, NaN,
            infinite or overflowing features): the loss is then 0 with a zero gradient.
        feature_norm: the mean L2 norm of the features before normalisation (0 where skipped).
    """

    valid: torch.Tensor
    feature_norm: torch.Tensor


def uniformity_loss(
    features: torch.Tensor, *, return_stats: bool = False, check_finite: bool = True
) -> Union[torch.Tensor, tuple[torch.Tensor, UniformityStats]]:
    """The U-MAE uniformity term: the mean over all ``B x B`` pairs (diagonal included) of ``(f̂_i · f̂_j)^2``.

    ``f̂ = f / ||f||``. The sum of squared cosines equals both ``||F̂ F̂^T||_F^2`` (a ``B x B`` Gram
    matrix) and ``||F̂^T F̂||_F^2`` (``D x D``); the smaller one is computed. Float32 (float64 for
    float64 input), autocast disabled. The maths is docs/algorithms.md §2.

    Non-finite features (NaN or inf), and features so large that a norm would overflow the compute dtype,
    are a ``ValueError`` when ``check_finite`` is true (the default; it costs one device synchronisation).
    With ``check_finite=False``, the setting for a training step, the term is skipped instead, without any
    synchronisation: value 0, ``valid`` false and a gradient that is exactly zero (the features are replaced
    by zeros before any arithmetic). An empty batch is always skipped.

    Args:
        features (torch.Tensor): ``B x D`` floating-point features, e.g. the CLS token after the encoder's
            final norm.
        return_stats (bool): also return :class:`UniformityStats`.
        check_finite (bool): raise on non-finite or overflowing features (one device synchronisation);
            ``False`` skips the term instead, with no synchronisation. Default: ``True``.

    Returns:
        torch.Tensor | tuple[torch.Tensor, UniformityStats]: the scalar term (and its diagnostics).

    Raises:
        TypeError: ``features`` is not floating point (integer, bool or complex).
        ValueError: ``features`` is not ``B x D``, or (``check_finite``) holds NaN, inf or overflowing values.

    Example:
        >>> loss = uniformity_loss(torch.randn(256, 768, requires_grad=True))
        >>> loss.backward()
    """
    check_feature_dtype("uniformity_loss", "features", features)
    if features.dim() != 2:
        raise ValueError(f"uniformity_loss needs B x D features, got shape {tuple(features.shape)}")
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    b, d = features.shape
    device = features.device
    # ||f||^2 sums D squares; a factor 4 of headroom covers rounding
    limit = math.sqrt(torch.finfo(dtype).max / (4.0 * max(d, 1)))
    with torch.autocast(device_type=device.type, enabled=False):
        f = features.to(dtype)
        if check_finite:
            require_within_range("uniformity_loss", "features", f, limit)
        zero = torch.zeros((), dtype=dtype, device=device)
        if b == 0:
            stats = UniformityStats(torch.zeros((), dtype=torch.bool, device=device), zero)
            return (zero, stats) if return_stats else zero
        # zeros in place of unusable features: the term below is then finite and its gradient exactly zero
        valid = within_range(f, limit)
        f = torch.where(valid, f, zero)
        unit = F.normalize(f, dim=1)
        gram = unit @ unit.T if b <= d else unit.T @ unit
        out = torch.where(valid, (gram * gram).sum() / (b * b), zero)
        if not return_stats:
            return out
        with torch.no_grad():
            stats = UniformityStats(valid, f.norm(dim=1).mean())
    return out, stats


class Uniformity(TapRegularizer):
    """Adds the U-MAE uniformity term of the encoder's CLS token to the training loss.

    Each training step (each microbatch) it computes :func:`uniformity_loss` on the CLS token after the
    final LayerNorm of the model's timm ViT, as recorded during the training forward (the masked
    forward, for the MAE), averages over the recorded forward calls if the encoder ran several times
    (a two-view model encodes its second view inside :func:`~magma_composer.models.taps.tap_paused`, so
    the term reads the first view only), and adds ``weight * U`` to ``state.loss['uniformity']``. It
    works on any ComposerModel holding a timm ViT with a class token; on another encoder (a ResNet) it
    is a clear error at the recipe check, before training.

    The term is batch-wide: it sees one microbatch, so set the microbatch to the per-device batch (a
    warning says when it is smaller). The original U-MAE code gathered the features from all devices:
    ``gather=True`` does that, with the gradient flowing back to each rank's own rows.

    Logged every batch: ``uniformity/weight``; while the weight is not 0 also ``uniformity/term`` (the
    unweighted ``U``) and ``uniformity/feature_norm`` (mean CLS norm before normalisation); the trainer
    logs ``loss/train/uniformity`` (``weight * U``).

    Args:
        weight (float | dict | WeightSchedule): the weight, or a schedule. Default: ``0.01``, constant.
        gather (bool): compute the term on the batch gathered from all ranks. Default: ``False``.

    Example:
        .. code-block:: python

            from composer import Trainer
            from magma_composer.algorithms.uniformity import Uniformity

            trainer = Trainer(model=model, train_dataloader=loader, max_duration='200ep',
                              algorithms=[Uniformity(weight=0.01)])
    """

    key = "uniformity"

    def __init__(self, weight: Union[float, Mapping[str, Any], WeightSchedule] = 0.01, gather: bool = False) -> None:
        super().__init__(weight, gather)

    def _check(self, tap: FeatureTap) -> None:
        tap.check_cls()

    def _request(self, tap: FeatureTap) -> None:
        tap.request_cls()

    def _compute(self, tap: FeatureTap) -> tuple[torch.Tensor, TermRecord]:
        values, valids, norms = [], [], []
        for features in tap.final_cls():
            if self.gather:
                features = all_gather_with_grad(features)
            # a training step: skip a non-finite batch without a device sync
            value, stats = uniformity_loss(features, return_stats=True, check_finite=False)
            values.append(value)
            valids.append(stats.valid)
            norms.append(stats.feature_norm)
        return self._average_valid(values, valids, {"feature_norm": norms})

    def _skip_reason(self) -> str:
        return "the batch is empty or its features are not finite"
