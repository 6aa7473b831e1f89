"""Run precision: one place that decides it, and bf16 autocast on CPUs, which Composer does not do.

Composer autocasts only on GPUs (its Trainer refuses ``amp_bf16`` on a CPU), yet a CPU with AVX-512 BF16 or AMX
runs a ViT step about twice as fast under ``torch.autocast('cpu', dtype=torch.bfloat16)`` (docs/benchmarks.md). So
on a CPU the package's models autocast themselves: :func:`cpu_autocast` marks a model, and its ``forward``,
``loss``, ``eval_forward`` and ``extract_features`` (decorated with :func:`autocast_on_cpu`) then run under CPU
autocast while Composer runs in ``fp32``. The regularisers and the PCA projections disable autocast and compute in
float32 either way (docs/algorithms.md §1-§3).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = [
    "CPU_PRECISIONS",
    "PRECISIONS",
    "autocast_context",
    "autocast_on_cpu",
    "cpu_autocast",
    "cpu_supports_bf16",
    "default_precision",
]

log = logging.getLogger(__name__)

#: every precision a recipe may name
PRECISIONS = ("fp32", "amp_fp16", "amp_bf16", "amp_fp8")
#: those a CPU run accepts
CPU_PRECISIONS = ("fp32", "amp_bf16")

F = TypeVar("F", bound=Callable[..., Any])


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); without it bf16 is emulated and slower."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def default_precision(device: str) -> str:
    """``amp_bf16`` on a GPU and on a CPU with native bf16, else ``fp32``.

    Args:
        device (str): ``'gpu'``/``'cuda'`` or ``'cpu'``.
    """
    if device in ("gpu", "cuda"):
        return "amp_bf16"
    return "amp_bf16" if cpu_supports_bf16() else "fp32"


def cpu_autocast(model: torch.nn.Module, precision: str) -> None:
    """Makes ``model`` autocast its own CPU computations at ``precision`` (``'fp32'`` turns it off).

    Args:
        model (torch.nn.Module): a model of this package (one with a ``cpu_autocast_dtype`` attribute).
        precision (str): one of :data:`CPU_PRECISIONS`.

    Raises:
        ValueError: ``precision`` is not a CPU precision.
        TypeError: the model does not support CPU autocast.
    """
    if precision not in CPU_PRECISIONS:
        raise ValueError(
            f"precision: {precision!r} is not available on a CPU; choose one of {', '.join(CPU_PRECISIONS)}"
        )
    if not hasattr(model, "cpu_autocast_dtype"):
        raise TypeError(
            f"precision: {precision!r} on a CPU needs a model of this package ({type(model).__name__} does not "
            "autocast itself); use precision: fp32"
        )
    if precision == "amp_bf16" and not cpu_supports_bf16():
        log.warning("precision amp_bf16: this CPU has no native bf16 (AVX-512 BF16 / AMX); expect it to be slower")
    model.cpu_autocast_dtype = torch.bfloat16 if precision == "amp_bf16" else None


def autocast_on_cpu(method: F) -> F:
    """Runs a model method under CPU autocast at the model's ``cpu_autocast_dtype`` (when it is set)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        dtype = getattr(self, "cpu_autocast_dtype", None)
        # an enclosing autocast (a nested call) is left as it is
        if dtype is None or torch.is_autocast_enabled("cpu"):
            return method(self, *args, **kwargs)
        with torch.autocast("cpu", dtype=dtype):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device_type`` (a null context for ``fp32``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)
