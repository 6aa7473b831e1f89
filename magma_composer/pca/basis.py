"""The PCA basis file: per-pixel standardisation, top-K eigenvectors and their variance ratios.

A basis is fitted once per data set and image size (``python -m magma_composer.pca fit``) and read by
:class:`~magma_composer.algorithms.pca_masking.PCAMasking`. The file is a plain ``torch.save`` dict of
tensors, numbers and strings (loadable with ``weights_only=True``) with a sha256 over its content, so a
truncated or edited file is caught on load rather than silently training on a wrong basis.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["BASIS_FORMAT", "PCABasis", "basis_sha256", "load_basis", "save_basis"]

#: The ``format`` tag stored in every basis file.
BASIS_FORMAT = "magma_composer.pca_basis/1"

_ARRAYS = ("mean", "std", "components", "eigenvalues", "ratios")
_META = ("image_size", "channels", "num_images", "total_variance", "method")


@dataclass(frozen=True)
class PCABasis:
    """A fitted PCA basis of images flattened to ``D = channels * image_size ** 2`` values in C, H, W order.

    Attributes:
        mean (torch.Tensor): ``D`` per-pixel mean of the training images (pixels in [0, 1]), float64.
        std (torch.Tensor): ``D`` per-pixel standard deviation (population, ``ddof=0``), float64; pixels
            that are constant in the data set get 1 so that their standardised value is 0.
        components (torch.Tensor): ``D x K`` orthonormal eigenvectors of the covariance of the standardised
            images ``z = (x - mean) / std``, by decreasing eigenvalue, float32.
        eigenvalues (torch.Tensor): ``K`` eigenvalues (variance of ``z`` along each component), float64.
        ratios (torch.Tensor): ``K`` eigenvalues divided by the total variance of ``z`` (``rho``); a
            truncated basis has ``sum(ratios) < 1``.
        image_size (int): image side in pixels.
        channels (int): image channels.
        num_images (int): images the basis was fitted on.
        total_variance (float): total variance of ``z`` (the number of non-constant pixels).
        method (str): ``'exact'`` or ``'randomized'``.
        sha256 (str): content hash (see :func:`basis_sha256`).
        path (str, optional): the file it was loaded from or saved to.
    """

    mean: torch.Tensor
    std: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor
    ratios: torch.Tensor
    image_size: int
    channels: int
    num_images: int
    total_variance: float
    method: str
    sha256: str = ""
    path: str | None = None

    @property
    def dim(self) -> int:
        """Values per flattened image, ``D``."""
        return int(self.components.shape[0])

    @property
    def num_components(self) -> int:
        """Components in the basis, ``K``."""
        return int(self.components.shape[1])

    def with_hash(self) -> PCABasis:
        """Returns a copy whose ``sha256`` is computed from its content."""
        return replace(self, sha256=basis_sha256(self))

    def check_image_shape(self, image_size: int, channels: int, what: str = "the model") -> None:
        """Raises a clear ``ValueError`` unless the basis was fitted at ``image_size`` with ``channels`` channels."""
        if (self.image_size, self.channels) != (int(image_size), int(channels)):
            raise ValueError(
                f"PCA basis {self.path or '(in memory)'} was fitted on {self.channels} x {self.image_size} x "
                f"{self.image_size} images, but {what} uses {channels} x {image_size} x {image_size}: fit a basis "
                f"at this size with `python -m magma_composer.pca fit --image-size {image_size} ...`"
            )

    def summary(self) -> str:
        """One line describing the basis."""
        return (
            f"PCA basis: {self.channels}x{self.image_size}x{self.image_size} (D={self.dim}), K={self.num_components} "
            f"components ({self.method}) from {self.num_images} images, capturing "
            f"{float(self.ratios.sum()):.4f} of the variance; sha256 {self.sha256[:12]}"
        )


def basis_sha256(basis: PCABasis) -> str:
    """sha256 over the basis arrays (dtype, shape and bytes, in a fixed order) and its metadata."""
    h = hashlib.sha256(BASIS_FORMAT.encode())
    for name in _ARRAYS:
        t = getattr(basis, name).detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    for name in _META:
        h.update(f"{name}={getattr(basis, name)!r};".encode())
    return h.hexdigest()


def save_basis(basis: PCABasis, path: str | os.PathLike) -> PCABasis:
    """Writes ``basis`` to ``path`` (atomically: a temporary file, then a rename); returns it with hash and path."""
    path = Path(path)
    basis = replace(basis.with_hash(), path=str(path))
    payload: dict[str, Any] = {"format": BASIS_FORMAT, "sha256": basis.sha256}
    payload.update({name: getattr(basis, name).detach().cpu().contiguous() for name in _ARRAYS})
    payload.update({name: getattr(basis, name) for name in _META})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return basis


def load_basis(
    path: str | os.PathLike | PCABasis,
    expected_image_size: int | None = None,
    expected_channels: int | None = None,
) -> PCABasis:
    """Reads a basis written by :func:`save_basis` and checks its hash (and, if given, its image shape).

    Args:
        path (str | PathLike | PCABasis): the basis file (an in-memory basis is returned with its hash set).
        expected_image_size (int, optional): the image side the caller needs.
        expected_channels (int, optional): the channel count the caller needs.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if the file is not a basis file, is corrupted (unreadable or its content does not match
            its hash), or was fitted at another image size or channel count.
    """
    if isinstance(path, PCABasis):
        basis = path if path.sha256 else path.with_hash()
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"PCA basis file {str(path)!r} does not exist: fit one with "
                "`python -m magma_composer.pca fit --data ... --image-size ... --components ... --out "
                f"{path}`"
            )
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            raise ValueError(f"PCA basis file {str(path)!r} is corrupted or not a basis file ({e})") from e
        if not isinstance(payload, dict) or payload.get("format") != BASIS_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"{str(path)!r} is not a PCA basis file (format {found!r}, expected {BASIS_FORMAT!r})")
        missing = [k for k in (*_ARRAYS, *_META, "sha256") if k not in payload]
        if missing:
            raise ValueError(f"PCA basis file {str(path)!r} is corrupted: missing entries {missing}")
        basis = PCABasis(**{k: payload[k] for k in (*_ARRAYS, *_META)}, sha256=str(payload["sha256"]), path=str(path))
        actual = basis_sha256(basis)
        if actual != basis.sha256:
            raise ValueError(
                f"PCA basis file {str(path)!r} is corrupted: its content hashes to {actual[:16]}..., but the file "
                f"records {basis.sha256[:16]}...; fit the basis again"
            )
    if expected_image_size is not None or expected_channels is not None:
        basis.check_image_shape(
            basis.image_size if expected_image_size is None else expected_image_size,
            basis.channels if expected_channels is None else expected_channels,
            what="the caller",
        )
    return basis
