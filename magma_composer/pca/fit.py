"""Fitting the PCA basis of docs/algorithms.md §3: exactly for small images or few images, by streaming otherwise.

* ``exact`` (``D`` up to about 16k): one pass accumulates, in float64, the per-pixel sums and the
  ``D x D`` matrix of products; the covariance of the standardised images follows from them, and its
  full eigendecomposition gives the basis (``K = min(N, D)`` components unless fewer are asked for).
* ``gram`` (any ``D``, ``N`` up to about 16k; one rank): exact for ``K < N`` in one pass over the data. The
  pass keeps the images in memory (``uint8`` as the shards give them: ``N x D`` bytes, within ``cache_gib``)
  and sums the per-pixel statistics; then, a block of pixels at a time, the standardised images ``Z`` give
  the ``N x N`` Gram matrix ``G = Z Z^T / N`` (float32 products summed in float64; only its lower triangle),
  whose top-``K`` eigenpairs ``(lambda, u)`` give the components ``v = Z^T u / sqrt(N lambda)`` (the
  eigenvectors of ``C = Z^T Z / N``) in a second sweep over the images in memory. Cost ``N^2 D`` against the
  randomized method's ``4 (2 + power_iters) N D (K + oversample)``: ``method='auto'`` takes it when it is the
  cheaper one (and the images fit ``cache_gib``).
* ``randomized`` (any ``D``; ``O(D * K)`` memory): a block power iteration on the covariance ``C`` of the
  standardised images ``z``. The first pass collects the per-pixel sums and, at the same time, the
  product of the raw second moments with a random ``D x L`` matrix (``L = K + oversample``), from which
  ``C`` applied to a random block follows once the mean and std are known. Each further pass multiplies
  ``C`` with the current orthonormal block ``Q`` as ``sum_batches Z^T (Z Q) / N`` (float32 products on the
  device, float64 accumulation) and re-orthonormalises by QR. The last pass's product ``Y = C Q`` gives
  the Nystrom approximation ``C ~ Y (Q^T Y)^-1 Y^T``, whose top-``K`` eigenpairs (from an ``L x L``
  Cholesky factor and a QR + SVD of a ``D x L`` matrix) are the basis. Passes over the data:
  ``2 + power_iters``; only the first decodes the images when they fit ``cache_gib`` (they are kept in
  memory, ``uint8`` as the shards give them, and the later passes read that copy).

Ratios ``rho`` are eigenvalues divided by the total variance of ``z``, computed exactly from the first
pass's sums (the number of non-constant pixels), so a truncated basis reports ``sum(rho) < 1``.

Under ``torch.distributed`` each rank streams its own share and the sums are all-reduced; every rank
ends with the same basis (rank 0 broadcasts each orthonormal block) and rank 0 writes the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import TypeVar

import torch
from composer.utils import dist
from tqdm.auto import tqdm

from magma_composer.distributed import cores_per_rank
from magma_composer.options import OptionError, check_choice, check_int, check_number
from magma_composer.pca.basis import PCABasis, PixelStats, check_output_path, save_basis, save_pixel_stats

__all__ = [
    "AUTO_WORKERS_MIN_IMAGES",
    "EXACT_MAX_DIM",
    "GRAM_MAX_IMAGES",
    "METHODS",
    "compute_pixel_stats",
    "default_cache_gib",
    "default_workers",
    "fit_basis",
    "fit_pca",
    "fit_pixel_stats",
    "resolve_device",
]

log = logging.getLogger(__name__)

#: ``method='auto'`` fits the exact basis up to this many values per image (64 x 64 x 3 = 12,288 fit).
EXACT_MAX_DIM = 16_384
METHODS = ("auto", "exact", "gram", "randomized")
#: ``method='auto'`` considers the gram method up to this many images (its ``N x N`` eigendecomposition
#: grows as ``N^3``: about 10 s at 4,096 images, 10 min at 16,384 on two cores).
GRAM_MAX_IMAGES = 16_384
#: ``num_workers=None`` decodes in the main process below this many images per rank (starting the
#: workers would cost more than it saves).
AUTO_WORKERS_MIN_IMAGES = 1024

#: The gram method's pixels per block: an ``N x 4096`` float32 block of standardised images at a time.
_COLUMN_BLOCK = 4096
#: Its rows per product: blocks of the Gram matrix's lower triangle (smaller ones waste less above the diagonal).
_ROW_BLOCK = 512
#: A gram eigenvalue below this fraction of the largest is at the float32 products' rounding level.
_GRAM_FLOOR = 1e-6

#: Pixels whose variance is below this are constant in the data set (far below one 8-bit step squared).
_CONSTANT_VAR = 1e-12

Batches = Callable[[], Iterable[torch.Tensor]]
T = TypeVar("T")


def default_cache_gib() -> float:
    """The default memory for images kept between passes: a quarter of the machine's memory, at most 8 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume a small machine
        physical = 8.0
    return min(8.0, physical / 4)


def default_workers(count: int) -> int:
    """Loader processes per rank for ``num_workers=None``: this rank's share of the cores, none for few images."""
    if count < AUTO_WORKERS_MIN_IMAGES:
        return 0
    return cores_per_rank()


def _as_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``b x D`` float32 on ``device``: ``uint8`` pixels (the shards' images) scaled by 1/255 as ``ToTensor`` does."""
    flat = batch.reshape(batch.shape[0], -1)
    if flat.dtype == torch.uint8:
        return flat.to(device, non_blocking=True).float().div_(255)
    return flat.to(device, torch.float32, non_blocking=True)


def _own(batch: torch.Tensor) -> torch.Tensor:
    """``batch`` as a tensor to keep: a loader worker's shared-memory batch is copied (each holds a file handle)."""
    return batch.clone() if batch.is_shared() else batch


class _Replay:
    """``batches`` whose first pass is kept in memory, as given, when it fits ``budget`` bytes.

    Later passes then read that copy instead of decoding the images again; when the images do not fit, each
    pass reads ``batches`` anew.
    """

    def __init__(self, batches: Batches, budget: float) -> None:
        self.batches, self.budget = batches, budget
        self.kept: list[torch.Tensor] | None = None

    def __call__(self) -> Iterable[torch.Tensor]:
        return iter(self.kept) if self.kept is not None else self._first()

    def _first(self) -> Iterator[torch.Tensor]:
        kept: list[torch.Tensor] | None = []
        size = 0
        for batch in self.batches():
            if kept is not None:
                size += batch.numel() * batch.element_size()
                if size <= self.budget:
                    kept.append(_own(batch))
                else:
                    log.info("the images pass cache_gib = %.3g GiB: every pass decodes them", self.budget / 2**30)
                    kept = None
            yield batch
        if kept is not None:
            self.kept = kept


def _passes(
    batches: Batches, dim: int, device: torch.device, desc: str, total: int | None, progress: bool
) -> Iterator[torch.Tensor]:
    """One pass over the data: float32 ``b x D`` batches on ``device``, with a progress bar on rank 0."""
    bar = tqdm(total=total, desc=desc, unit="img", disable=not (progress and dist.get_global_rank() == 0), leave=False)
    for batch in batches():
        batch = _as_float(batch, device)
        if batch.shape[1] != dim:
            raise ValueError(f"images have {batch.shape[1]} values each, but channels * image_size^2 = {dim}")
        yield batch
        bar.update(batch.shape[0])
    bar.close()


def _first_pass(
    batches: Batches,
    dim: int,
    device: torch.device,
    desc: str,
    total: int | None,
    progress: bool,
    also: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass summing, in float64, the image count and the per-pixel values and squares, all-reduced over ranks.

    ``also`` is called with every float32 batch, for work that shares the pass (the randomized fit's first
    product); it all-reduces its own results.

    Returns:
        ``(n, s1, s2)``: the count, ``sum x`` and ``sum x^2`` (``D`` each).
    """
    n = torch.zeros((), dtype=torch.float64, device=device)
    s1 = torch.zeros(dim, dtype=torch.float64, device=device)
    s2 = torch.zeros(dim, dtype=torch.float64, device=device)
    for x in _passes(batches, dim, device, desc, total, progress):
        n += x.shape[0]
        for start in range(0, dim, _COLUMN_BLOCK):  # blocks of pixels: the float64 copy stays in the cache
            x64 = x[:, start : start + _COLUMN_BLOCK].double()
            s1[start : start + _COLUMN_BLOCK] += x64.sum(0)
            s2[start : start + _COLUMN_BLOCK] += x64.square_().sum(0)
        if also is not None:
            also(x)
    for t in (n, s1, s2):
        dist.all_reduce(t)
    return n, s1, s2


def _stats(n: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel mean, population variance and the std used for standardising (1 for constant pixels)."""
    count = float(n.item())
    if count < 2:
        raise ValueError(f"fitting a PCA basis needs at least 2 images, got {int(count)}")
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0.0)
    std = torch.where(var > _CONSTANT_VAR, var.sqrt(), torch.ones_like(var))
    return mean, var, std


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device the products run on: ``device`` checked, or CUDA when available (else the CPU).

    Raises:
        OptionError: ``device`` is not a device name, not ``cpu``/``cuda``, or names a GPU that is not there.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError("device", f"{device!r} is not a device; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", f"{device!r}: no CUDA GPU is available here; use 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise OptionError("device", f"{device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
        if resolved.index is not None and dist.get_world_size() > 1:
            raise OptionError(
                "device", f"{device!r}: with several ranks give 'cuda': each rank uses its LOCAL_RANK's GPU"
            )
    elif resolved.type != "cpu":
        raise OptionError("device", f"{device!r}: only 'cpu' and 'cuda' are supported")
    return resolved


def _check_options(
    image_size: int,
    channels: int,
    components: int | None,
    method: str,
    oversample: int | None,
    power_iters: int,
    seed: int,
    device: str | torch.device | None,
    cache_gib: float | None = None,
    total: int | None = None,
    value_bytes: int = 4,
) -> tuple[int, str, int, torch.device, float]:
    """Checks the options of :func:`fit_pca`; returns ``(D, method, oversample, device, cache bytes)`` resolved.

    ``method='auto'`` is ``exact`` up to ``D = EXACT_MAX_DIM``; above, ``gram`` when the number of images
    ``total`` is known, on one rank, above ``K``, at most :data:`GRAM_MAX_IMAGES` and
    ``4 (2 + power_iters) (K + oversample)`` (where the gram method costs less), with the ``uint8`` images
    within ``cache_gib`` (``value_bytes`` per value: 1 for the shards' ``uint8`` images, 4 for float32 ones);
    ``randomized`` otherwise.

    Raises:
        OptionError: an option is invalid; its ``key`` is the argument's name.
    """
    check_int("image_size", image_size, 1)
    check_int("channels", channels, 1)
    dim = channels * image_size**2
    check_choice("method", method, METHODS)
    if cache_gib is None:
        cache_gib = default_cache_gib()
    cache_bytes = check_number("cache_gib", cache_gib, 0.0) * 2**30
    if components is None:
        if method in ("randomized", "gram") or (method == "auto" and dim > EXACT_MAX_DIM):
            name = "randomized" if method != "gram" else "gram"
            raise OptionError("components", f"is required for the {name} method (e.g. --components 1024)")
    else:
        check_int("components", components, 1)
        if components > dim:
            raise OptionError("components", f"must be at most D = channels x image_size^2 = {dim}, got {components}")
    if method == "exact" and dim > 4 * EXACT_MAX_DIM:
        raise OptionError(
            "method",
            f"the exact method needs a D x D float64 matrix, {dim**2 * 8 / 2**30:.0f} GiB at D={dim}: use "
            "method='randomized' (--method randomized) with a number of components",
        )
    if method == "gram" and dist.get_world_size() > 1:
        raise OptionError("method", "the gram method runs on one rank (it holds every image); use 'randomized'")
    check_int("power_iters", power_iters, 0)
    if oversample is None:
        oversample = max(16, (components or 0) // 10)
    check_int("oversample", oversample, 0)
    check_int("seed", seed, -(2**63), 2**64 - 1)
    if method == "auto":
        method = "exact" if dim <= EXACT_MAX_DIM else "randomized"
        if method == "randomized" and total is not None and dist.get_world_size() == 1:
            assert components is not None
            cheaper = total <= min(GRAM_MAX_IMAGES, 4 * (2 + power_iters) * (components + oversample))
            if components < total and cheaper and total * dim * value_bytes <= cache_bytes:
                method = "gram"
    return dim, method, oversample, resolve_device(device), cache_bytes


def _fit_exact(
    batches: Batches, dim: int, components: int | None, device: torch.device, total: int | None, progress: bool
) -> tuple:
    n = torch.zeros((), dtype=torch.float64, device=device)
    s1 = torch.zeros(dim, dtype=torch.float64, device=device)
    sxx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for x in _passes(batches, dim, device, "PCA exact", total, progress):
        x = x.double()
        n += x.shape[0]
        s1 += x.sum(0)
        sxx.addmm_(x.T, x)
    for t in (n, s1, sxx):
        dist.all_reduce(t)
    mean, var, std = _stats(n, s1, torch.diagonal(sxx).clone())
    count = float(n.item())
    cov = sxx.div_(count).sub_(torch.outer(mean, mean))  # covariance of x, in place
    cov.div_(std[:, None]).div_(std[None, :])  # covariance of z
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    k = components or min(int(count), dim)
    evals = evals.flip(0)[:k].clamp_min(0.0)
    evecs = evecs.flip(1)[:, :k]
    return count, mean, var, std, evecs, evals


def _fit_gram(
    batches: Batches,
    dim: int,
    components: int,
    device: torch.device,
    total: int | None,
    progress: bool,
    cache_bytes: float,
) -> tuple:
    held: list[torch.Tensor] = []
    size = 0

    def holding() -> Iterator[torch.Tensor]:
        nonlocal size
        for batch in batches():
            size += batch.numel() * batch.element_size()
            if size > cache_bytes:
                raise ValueError(
                    f"the gram method keeps the images in memory, and they take more than cache_gib = "
                    f"{cache_bytes / 2**30:.3g} GiB: raise it (--cache-gib) or use method='randomized'"
                )
            held.append(_own(batch.reshape(batch.shape[0], -1)))
            yield batch

    n, s1, s2 = _first_pass(holding, dim, device, "PCA gram (read)", total, progress)
    mean, var, std = _stats(n, s1, s2)
    count = int(n.item())
    if components >= count:
        raise ValueError(
            f"the gram method gives at most N - 1 = {count - 1} components from {count} images, "
            f"{components} were asked for: ask for fewer or use method='randomized'"
        )
    mean32, inv_std32 = mean.float(), (1.0 / std).float()

    def blocks(desc: str) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The standardised images, ``N x c`` float32 for each block of ``c`` pixels (as the passes compute them)."""
        bar = tqdm(total=dim, desc=desc, unit="px", disable=not progress, leave=False)
        for start in range(0, dim, _COLUMN_BLOCK):
            stop = min(start + _COLUMN_BLOCK, dim)
            z = _as_float(torch.cat([b[:, start:stop] for b in held]), device)
            yield start, stop, z.sub_(mean32[start:stop]).mul_(inv_std32[start:stop])
            bar.update(stop - start)
        bar.close()

    rows = [(i, min(i + _ROW_BLOCK, count)) for i in range(0, count, _ROW_BLOCK)]
    gram = torch.zeros(count, count, dtype=torch.float64, device=device)
    for _, _, z in blocks("PCA gram (products)"):
        for a, (i0, i1) in enumerate(rows):
            for j0, j1 in rows[: a + 1]:  # the lower triangle: eigh reads only that
                gram[i0:i1, j0:j1] += z[i0:i1] @ z[j0:j1].T  # float32 product, float64 sum
    gram.div_(count)
    evals, evecs = torch.linalg.eigh(gram, UPLO="L")
    del gram
    evals, evecs = evals.flip(0)[:components], evecs.flip(1)[:, :components]
    if float(evals[-1]) <= _GRAM_FLOOR * float(evals[0]):
        rank = int((evals > _GRAM_FLOOR * evals[0]).sum())
        raise ValueError(
            f"the images span about {rank} directions above the float32 rounding level, {components} components "
            f"were asked for: ask for at most {rank} (or use method='exact' for small images)"
        )
    weights = (evecs / (count * evals).sqrt()).float()  # v = Z^T u / sqrt(N lambda)
    del evecs
    vectors = torch.empty(dim, components, dtype=torch.float32, device=device)
    for start, stop, z in blocks("PCA gram (components)"):
        torch.mm(z.T, weights, out=vectors[start:stop])
    return count, mean, var, std, vectors, evals


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``y``'s columns, rank 0's on every rank (QR can differ in the last bits)."""
    q = torch.linalg.qr(y)[0].contiguous()
    dist.broadcast(q, src=0)
    return q


def _fit_randomized(
    batches: Batches,
    dim: int,
    components: int,
    oversample: int,
    power_iters: int,
    seed: int,
    device: torch.device,
    total: int | None,
    progress: bool,
    cache_bytes: float,
) -> tuple:
    batches = _Replay(batches, cache_bytes)
    width = min(components + oversample, dim)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(dim, width, generator=gen, dtype=torch.float32).to(device)

    # pass 1: per-pixel sums and the raw second moments applied to omega
    y = torch.zeros(dim, width, dtype=torch.float64, device=device)
    n, s1, s2 = _first_pass(
        batches, dim, device, "PCA pass 1 (stats)", total, progress, also=lambda x: y.add_(x.T @ (x @ omega))
    )  # float32 product, float64 sum
    dist.all_reduce(y)
    mean, var, std = _stats(n, s1, s2)
    count = float(n.item())
    # C_z (std * omega) = (E[x x^T] omega - mean (mean^T omega)) / std
    y.div_(count).sub_(torch.outer(mean, mean @ omega.double())).div_(std[:, None])
    omega = None  # free it (the first pass's closure holds the same cell)
    q = _orthonormal(y)

    mean32, inv_std32 = mean.float(), (1.0 / std).float()
    for it in range(power_iters + 1):
        q32 = q.float()
        y.zero_()
        desc = f"PCA pass {it + 2}/{power_iters + 2}"
        for x in _passes(batches, dim, device, desc, total, progress):
            z = (x - mean32) * inv_std32
            y.add_(z.T @ (z @ q32))
        dist.all_reduce(y)
        y.div_(count)  # y = C q
        if it < power_iters:
            q = _orthonormal(y)
    evecs, evals = _nystrom(q, y, components)
    return count, mean, var, std, evecs, evals


def _nystrom(q: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs (decreasing) of the Nystrom approximation ``Y (Q^T Y)^-1 Y^T`` of ``C``, given ``Y = C Q``.

    Its eigenvectors lie in ``span(Y) = span(C Q)``, so it is as accurate as one more power iteration
    (about 10x smaller principal angles than Rayleigh-Ritz on ``span(Q)``) for no extra pass. A shift ``nu``
    of the order of the rounding error keeps the Cholesky factor defined when ``C Q`` is rank deficient.
    ``y`` is overwritten (shifted in place) to keep the peak memory at a few ``D x L`` arrays.
    """
    nu = float(torch.finfo(y.dtype).eps * y.shape[0] ** 0.5 * torch.linalg.matrix_norm(y))
    y.add_(q, alpha=nu)
    b = q.T @ y
    b = 0.5 * (b + b.T)
    chol, info = torch.linalg.cholesky_ex(b)
    if int(info) != 0:  # not positive definite even after the shift: fall back to Rayleigh-Ritz on span(q)
        evals, u = torch.linalg.eigh(b)
        return q @ u.flip(1)[:, :k], (evals.flip(0)[:k] - nu).clamp_min(0.0)
    f = torch.linalg.solve_triangular(chol.mT, y, upper=True, left=False)  # F chol^T = Y, so C ~ F F^T
    qf, rf = torch.linalg.qr(f)
    del f
    u, sv, _ = torch.linalg.svd(rf)
    return qf @ u[:, :k], (sv[:k] * sv[:k] - nu).clamp_min(0.0)


def fit_pca(
    batches: Batches,
    image_size: int,
    channels: int = 3,
    components: int | None = None,
    method: str = "auto",
    oversample: int | None = None,
    power_iters: int = 2,
    seed: int = 0,
    device: str | torch.device | None = None,
    total: int | None = None,
    progress: bool = True,
    cache_gib: float | None = None,
) -> PCABasis:
    """Fits the basis to images streamed by ``batches``; the core of :func:`fit_basis`.

    Args:
        batches (Callable[[], Iterable[torch.Tensor]]): returns a fresh iterator over this rank's images at
            each call (one call per pass): ``b x D`` (or ``b x C x S x S``) tensors of pixels, flattened in C,
            H, W order: floats in [0, 1], or ``uint8`` in 0..255 (scaled by 1/255).
        image_size (int): image side ``S``, ``>= 1``.
        channels (int): image channels ``C``, ``>= 1``; ``D = C * S * S``.
        components (int, optional): ``K`` in ``[1, D]``; default ``min(N, D)`` for the exact method (required
            otherwise).
        method (str): ``'exact'``, ``'gram'``, ``'randomized'`` or ``'auto'`` (exact up to ``D = 16,384``;
            above, gram when ``total`` is known and gram costs less, see the module's text; randomized
            otherwise).
        oversample (int, optional): extra random directions for the randomized method, ``>= 0``; default
            ``max(16, K // 10)``.
        power_iters (int): power iterations of the randomized method, ``>= 0`` (passes over the data:
            ``2 + power_iters``).
        seed (int): seed of the random start block.
        device (str | torch.device, optional): ``'cpu'`` or ``'cuda'``, where the products run; default CUDA
            when available.
        total (int, optional): images per pass on this rank, for the progress bar and ``method='auto'`` (which
            counts 4 bytes per value against ``cache_gib``).
        progress (bool): show progress bars (rank 0 only).
        cache_gib (float, optional): GiB of memory for the images kept between passes (the gram method
            needs them all; the randomized one reads them again from ``batches`` when they do not fit),
            ``>= 0``; default :func:`default_cache_gib` (a quarter of the memory, at most 8 GiB).

    Returns:
        PCABasis: the basis (not yet saved; its hash is set).

    Raises:
        OptionError: an option is invalid (a ``ValueError`` whose ``key`` names the argument), checked before
            the first batch is read.
        ValueError: the images are unusable (fewer than 2, wrong size, or every pixel constant; for the gram
            method: more than ``cache_gib``, or spanning fewer than ``K`` directions).
    """
    dim, method, oversample, device, cache_bytes = _check_options(
        image_size, channels, components, method, oversample, power_iters, seed, device, cache_gib, total
    )
    return _fit(
        batches,
        image_size,
        channels,
        dim,
        components,
        method,
        oversample,
        power_iters,
        seed,
        device,
        total,
        progress,
        cache_bytes,
    )


def _fit(
    batches: Batches,
    image_size: int,
    channels: int,
    dim: int,
    components: int | None,
    method: str,
    oversample: int,
    power_iters: int,
    seed: int,
    device: torch.device,
    total: int | None,
    progress: bool,
    cache_bytes: float,
) -> PCABasis:
    """:func:`fit_pca` on options already checked and resolved by :func:`_check_options`."""
    if method == "exact":
        count, mean, var, std, evecs, evals = _fit_exact(batches, dim, components, device, total, progress)
    elif method == "gram":
        assert components is not None
        count, mean, var, std, evecs, evals = _fit_gram(batches, dim, components, device, total, progress, cache_bytes)
    else:
        assert components is not None
        count, mean, var, std, evecs, evals = _fit_randomized(
            batches, dim, components, oversample, power_iters, seed, device, total, progress, cache_bytes
        )
    total_variance = float((var / (std * std)).sum().item())
    if total_variance <= 0:
        raise ValueError("every pixel is constant across the images: there is no variance to fit a basis to")
    return PCABasis(
        mean=mean.cpu(),
        std=std.cpu(),
        components=evecs.float().cpu().contiguous(),
        eigenvalues=evals.cpu(),
        ratios=(evals / total_variance).cpu(),
        image_size=int(image_size),
        channels=int(channels),
        num_images=int(count),
        total_variance=total_variance,
        method=method,
    ).with_hash()


def _raise_together(error: BaseException | None) -> None:
    """Every rank raises if any rank failed, so that no rank waits in a collective for one that gave up.

    The rank that failed raises its own exception; the others raise the first failure they hear of (an
    :class:`OptionError` as such, anything else as a ``RuntimeError`` naming the rank).
    """
    if dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    report = None
    if error is not None:
        report = (error.key, error.message) if isinstance(error, OptionError) else f"{type(error).__name__}: {error}"
    reports = dist.all_gather_object(report)
    if error is not None:
        raise error
    for rank, report in enumerate(reports):
        if isinstance(report, tuple):
            raise OptionError(*report)
        if report is not None:
            raise RuntimeError(f"rank {rank} failed: {report}")


def _check_stream_options(
    batch_size: int, max_images: int | None, num_workers: int | None, overwrite: bool, progress: bool
) -> None:
    """Checks the options that :func:`fit_basis` and :func:`compute_pixel_stats` share for reading the shards."""
    check_int("batch_size", batch_size, 1)
    if max_images is not None:
        check_int("max_images", max_images, 2)
    if num_workers is not None:
        check_int("num_workers", num_workers, 0)
    if not isinstance(overwrite, bool):
        raise OptionError("overwrite", f"expected true or false, got {overwrite!r}")
    if not isinstance(progress, bool):
        raise OptionError("progress", f"expected true or false, got {progress!r}")


def _open_images(
    data: str,
    image_size: int,
    out: str | os.PathLike | None,
    split: str | None,
    batch_size: int,
    max_images: int | None,
    num_workers: int | None,
    local: str | None,
    device: torch.device,
    overwrite: bool,
) -> tuple[Batches, int, str | os.PathLike | None]:
    """Checks ``out`` (rank 0) and the data set's index, then gives this rank's share of the images.

    Returns:
        ``(batches, count, out)``: a fresh loader over this rank's ``count`` images at each call, and ``out``
        checked (a ``Path`` on rank 0).

    Raises:
        OptionError: ``out`` or ``data`` (``split``, ``local``) is unusable, on every rank.
    """
    from magma_composer.pca.source import ShardImages, open_shards, split_shards

    rank, world = dist.get_global_rank(), dist.get_world_size()
    if world > 1 and not dist.is_initialized():
        raise RuntimeError(
            f"WORLD_SIZE is {world} but torch.distributed is not initialised: call "
            "composer.utils.dist.initialize_dist(device) first (python -m magma_composer.pca does)"
        )
    error = None
    try:
        if out is not None and rank == 0:  # only rank 0 writes
            try:
                out = check_output_path(out, overwrite)
            except OSError as e:
                raise OptionError("out", str(e)) from e
        stream, shards = open_shards(data, split=split, local=local)
    except Exception as e:  # whatever stops one rank here must stop them all
        error = e
    _raise_together(error)

    share = split_shards([s.samples for s in shards], rank, world, max_images)
    for i, _ in share:
        stream.prepare_shard(shards[i])
    images = ShardImages(shards, share, image_size)
    if num_workers is None:
        num_workers = default_workers(len(images))

    def batches() -> Iterable[torch.Tensor]:
        return torch.utils.data.DataLoader(
            images, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
        )

    return batches, len(images), out


def _write_on_rank_zero(write: Callable[[], T]) -> T | None:
    """Runs ``write`` on rank 0 only; every rank raises if it failed. Returns its result on rank 0."""
    error, result = None, None
    if dist.get_global_rank() == 0:
        try:
            result = write()
        except Exception as e:
            error = e
    _raise_together(error)
    return result


def fit_basis(
    data: str,
    image_size: int,
    components: int | None = None,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    method: str = "auto",
    batch_size: int = 256,
    max_images: int | None = None,
    oversample: int | None = None,
    power_iters: int = 2,
    seed: int = 0,
    num_workers: int | None = None,
    local: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
    cache_gib: float | None = None,
) -> PCABasis:
    """Fits the PCA basis of an MDS image data set and (on rank 0) writes it to ``out``.

    Images come from the ``x`` column (JPEG bytes), are resized (shorter side to ``image_size``, bicubic) and
    centre-cropped without augmentation, scaled to [0, 1] and flattened in C, H, W order. Loader processes
    decode them while the products run on all the cores' threads; the decoded images (``uint8``) are kept in
    memory within ``cache_gib``, so that only the first pass decodes. Under
    ``torch.distributed`` (initialised, e.g. by ``composer.utils.dist.initialize_dist``) each rank reads its
    own whole shards (no sample is read twice) and the sums are all-reduced.

    Every option, the output path and the data set's index are checked before any image is read: a bad one
    is an :class:`~magma_composer.options.OptionError` naming the argument, on every rank.

    Args:
        data (str): a local folder of MDS shards or a URI (``s3://bucket/prefix``).
        image_size (int): image side in pixels.
        components (int, optional): ``K``, see :func:`fit_pca`.
        out (str | PathLike, optional): where to write the basis (``.pt``); nothing is written if ``None``.
            It must not be a directory, its folder must be writable, and an existing file is kept unless
            ``overwrite``.
        split (str, optional): sub-folder of ``data`` (``'train'``).
        method (str): ``'auto'``, ``'exact'``, ``'gram'`` or ``'randomized'`` (see :func:`fit_pca`; ``auto``
            knows the number of images here).
        batch_size (int): images per product, ``>= 1``.
        max_images (int, optional): use only the first ``max_images`` images (in shard order), ``>= 2``.
        oversample (int, optional): see :func:`fit_pca`.
        power_iters (int): see :func:`fit_pca`.
        seed (int): see :func:`fit_pca`.
        num_workers (int, optional): data loader processes decoding JPEGs, per rank, ``>= 0``; default
            :func:`default_workers` (this rank's share of the cores; none below 1,024 images).
        local (str, optional): cache folder for remote shards (default: under the temporary directory).
        device (str | torch.device, optional): see :func:`fit_pca`.
        progress (bool): progress bars.
        overwrite (bool): replace an existing file at ``out``. Default: ``False``.
        cache_gib (float, optional): see :func:`fit_pca`.

    Returns:
        PCABasis: the basis, with ``path`` set when it was written.

    Raises:
        OptionError: a bad option, ``out`` or ``data`` (checked before the work; its ``key`` names the argument).
        ValueError: the images are unusable (see :func:`fit_pca`).
        OSError, RuntimeError: reading the shards or writing ``out`` failed (a failed write leaves nothing behind).
    """
    dim, _, _, device, _ = _check_options(
        image_size, 3, components, method, oversample, power_iters, seed, device, cache_gib
    )
    _check_stream_options(batch_size, max_images, num_workers, overwrite, progress)
    batches, count, out = _open_images(
        data, image_size, out, split, batch_size, max_images, num_workers, local, device, overwrite
    )
    # again with the number of images known, for method='auto' (the options were checked before any read)
    dim, method, oversample, device, cache_bytes = _check_options(
        image_size, 3, components, method, oversample, power_iters, seed, device, cache_gib, count, value_bytes=1
    )
    basis = _fit(
        batches,
        image_size,
        3,
        dim,
        components,
        method,
        oversample,
        power_iters,
        seed,
        device,
        count,
        progress,
        cache_bytes,
    )
    if out is None:
        return basis

    def write() -> PCABasis:
        saved = save_basis(basis, out, overwrite=overwrite)
        log.info("wrote %s: %s", out, saved.summary())
        return saved

    return _write_on_rank_zero(write) or replace(basis, path=os.fspath(out))


def _pixel_stats(
    batches: Batches, image_size: int, channels: int, device: torch.device, total: int | None, progress: bool
) -> tuple[PixelStats, int]:
    """:func:`fit_pixel_stats` on checked options; also returns the number of images."""
    n, s1, s2 = _first_pass(batches, channels * image_size**2, device, "pixel statistics", total, progress)
    mean, _, std = _stats(n, s1, s2)
    return PixelStats(mean.cpu(), std.cpu(), int(image_size), int(channels)), int(n.item())


def fit_pixel_stats(
    batches: Batches,
    image_size: int,
    channels: int = 3,
    device: str | torch.device | None = None,
    total: int | None = None,
    progress: bool = True,
) -> PixelStats:
    """Per-pixel mean and std of images streamed by ``batches``: the first pass of the basis fit, alone.

    The numbers are those a randomized basis fit of the same images stores (the same pass, bit for bit); the
    exact fit sums the squares in another order (equal to about 1e-15).

    Args:
        batches (Callable[[], Iterable[torch.Tensor]]): see :func:`fit_pca` (called once).
        image_size (int): image side ``S``, ``>= 1``.
        channels (int): image channels ``C``, ``>= 1``.
        device (str | torch.device, optional): where the sums run; default CUDA when available.
        total (int, optional): images on this rank, for the progress bar.
        progress (bool): show a progress bar (rank 0 only).

    Returns:
        PixelStats: float64 ``D`` mean and std (population; 1 for constant pixels), in C, H, W order.

    Raises:
        OptionError: an option is invalid.
        ValueError: fewer than 2 images, or images of another size.
    """
    check_int("image_size", image_size, 1)
    check_int("channels", channels, 1)
    return _pixel_stats(batches, image_size, channels, resolve_device(device), total, progress)[0]


def compute_pixel_stats(
    data: str,
    image_size: int,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    batch_size: int = 256,
    max_images: int | None = None,
    num_workers: int | None = None,
    local: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PixelStats:
    """Per-pixel mean and std of an MDS image data set and (on rank 0) writes them to ``out``.

    The images, the ranks' shares, the checks and the errors are those of :func:`fit_basis` (the same code);
    only the first pass runs. Read the file with :func:`~magma_composer.pca.load_pixel_stats`.

    Args:
        data (str): a local folder of MDS shards or a URI (``s3://bucket/prefix``).
        image_size (int): image side in pixels.
        out (str | PathLike, optional): the statistics file to write; nothing is written if ``None``.
        split (str, optional): sub-folder of ``data`` (``'train'``).
        batch_size (int): images per batch, ``>= 1``.
        max_images (int, optional): use only the first ``max_images`` images (in shard order), ``>= 2``.
        num_workers (int, optional): data loader processes decoding JPEGs, per rank, ``>= 0``; default as
            :func:`fit_basis`.
        local (str, optional): cache folder for remote shards.
        device (str | torch.device, optional): where the sums run.
        progress (bool): progress bars.
        overwrite (bool): replace an existing file at ``out``. Default: ``False``.

    Returns:
        PixelStats: the statistics.

    Raises:
        OptionError, ValueError, OSError, RuntimeError: as :func:`fit_basis`.
    """
    check_int("image_size", image_size, 1)
    device = resolve_device(device)
    _check_stream_options(batch_size, max_images, num_workers, overwrite, progress)
    batches, count, out = _open_images(
        data, image_size, out, split, batch_size, max_images, num_workers, local, device, overwrite
    )
    stats, num_images = _pixel_stats(batches, image_size, 3, device, count, progress)
    if out is not None:
        _write_on_rank_zero(lambda: save_pixel_stats(stats, out, overwrite=overwrite, num_images=num_images))
        log.info("wrote %s: pixel statistics of %d images", out, num_images)
    return stats
