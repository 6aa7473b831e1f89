"""Input checks shared by the two-view losses: one message per mistake, naming the function and the argument."""

from __future__ import annotations

import math
from typing import Any

from magma_composer.feature_checks import check_feature_dtype, compute_dtype

__all__ = ["check_nonnegative", "check_pair", "compute_dtype"]


def check_pair(fn: str, z1: Any, z2: Any) -> None:
    """Raises unless ``z1`` and ``z2`` are ``B x D`` real floating-point tensors of one shape with ``B >= 2``.

    Raises:
        TypeError: a value is not a tensor, or not real floating point.
        ValueError: a shape is not ``B x D``, the shapes differ, ``B < 2`` or ``D < 1``.
    """
    for name, z in (("z1", z1), ("z2", z2)):
        check_feature_dtype(fn, name, z)
        if z.dim() != 2:
            raise ValueError(f"{fn}: {name} must be B x D (one embedding per row), got shape {tuple(z.shape)}")
    if z1.shape != z2.shape:
        raise ValueError(
            f"{fn}: z1 and z2 must have the same shape (row i of each is one view of sample i), got "
            f"{tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if z1.shape[0] < 2:
        raise ValueError(f"{fn}: needs a batch of at least 2 samples, got B = {z1.shape[0]}")
    if z1.shape[1] < 1:
        raise ValueError(f"{fn}: the embeddings have no dimension (D = 0)")


def check_nonnegative(fn: str, name: str, value: Any, positive: bool = False) -> float:
    """``value`` as a float; a ``ValueError`` unless it is a finite number ``>= 0`` (``> 0`` if ``positive``)."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < 0 or (positive and value == 0):
        raise ValueError(f"{fn}: {name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)
