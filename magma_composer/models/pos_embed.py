"""Fixed 2-D sine-cosine position embeddings (docs/algorithms.md §0)."""

from __future__ import annotations

import torch

__all__ = ["sincos_2d"]


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    if dim % 2:
        raise ValueError(f"a 1-D sin-cos embedding needs an even width, got {dim}")
    freq = 1.0 / (10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)))
    angles = positions.reshape(-1, 1).double() * freq.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Returns a ``(num_prefix_tokens + grid_h * grid_w) x dim`` float32 table.

    Half of the width encodes the row, half the column; prefix tokens (CLS) get zeros.

    Args:
        dim (int): embedding width, a multiple of 4.
        grid_h (int): number of patch rows.
        grid_w (int): number of patch columns.
        num_prefix_tokens (int): rows of zeros put first (for the CLS token).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    table = torch.cat([_sincos_1d(dim // 2, rows), _sincos_1d(dim // 2, cols)], dim=1)
    if num_prefix_tokens:
        table = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=table.dtype), table], dim=0)
    return table.float()
