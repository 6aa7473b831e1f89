"""Checks of the feature tensors that the batch-wide losses (``magma_loss``, ``uniformity_loss``, and the two-view
losses' dtype check) take.

Both losses refuse non-float features with a ``TypeError`` and take ``check_finite``:

* ``True`` (the default of a direct call): NaN, infinite or overflowing features are a ``ValueError`` naming the
  function and the input. The check reads one number back from the device (a synchronisation).
* ``False`` (what the training algorithms pass): no synchronisation; such features make the term a skipped zero
  (``valid`` false) whose gradient is exactly zero, because the features are replaced by zeros before any
  arithmetic (``torch.where`` on a device-side flag), so no NaN can reach the backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["check_feature_dtype", "compute_dtype", "require_within_range", "within_range"]


def check_feature_dtype(fn: str, name: str, features: Any) -> None:
    """Raises ``TypeError`` unless ``features`` is a real floating-point tensor.

    Args:
        fn (str): the calling function, for the message.
        name (str): the argument's name, for the message.
        features (Any): the value to check.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(
            f"{fn}: {name} must hold real floating-point features (float16, bfloat16, float32 or float64), got "
            f"dtype {features.dtype}; integer, bool and complex tensors are refused"
        )


def within_range(features: torch.Tensor, limit: float) -> torch.Tensor:
    """A 0-dim bool tensor, true when every value is finite and ``|value| <= limit``; no device synchronisation."""
    if features.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=features.device)
    with torch.no_grad():
        return features.detach().abs().amax() <= limit  # a NaN maximum compares false


def require_within_range(fn: str, name: str, features: torch.Tensor, limit: float) -> None:
    """Raises a ``ValueError`` naming ``fn`` and ``name`` unless every value is finite and ``|value| <= limit``.

    Reads one number back from the device (a synchronisation); the failure path counts the bad values.
    """
    if features.numel() == 0:
        return
    features = features.detach()
    top = float(features.abs().amax())
    if top <= limit:
        return
    if not math.isfinite(top):
        bad = int((~torch.isfinite(features)).sum())
        raise ValueError(
            f"{fn}: {name} has {bad} NaN or infinite value(s) among its {features.numel()} (the model has diverged "
            f"or its input is corrupted); pass check_finite=False to skip such a term (value 0, valid=False, zero "
            f"gradient) instead of raising"
        )
    raise ValueError(
        f"{fn}: {name} holds values up to {top:.3g}, above {limit:.3g}, the largest for which the term cannot "
        f"overflow {features.dtype}; pass float64 features, or check_finite=False to skip such a term"
    )


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a loss computes in: float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
