"""The PCA basis file (per-pixel standardisation, top-K eigenvectors and their variance ratios) and the
pixel statistics file (the standardisation alone).

A basis is fitted once per data set and image size (``python -m magma_composer.pca fit``) and read by
:class:`~magma_composer.algorithms.pca_masking.PCAMasking`; pixel statistics (``python -m magma_composer.pca
stats``) feed the data sets' ``normalize: pixel``. Both files are ``torch.save`` dicts of tensors, numbers and
strings (loadable with ``weights_only=True``) that hold a sha256 of their content (their identity) and end with
a sha256 of all their bytes (the zip archive's comment), so a truncated file or one with any byte altered is
refused on load, naming the file, rather than silently training on wrong statistics.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch

__all__ = [
    "BASIS_FORMAT",
    "STATS_FORMAT",
    "PCABasis",
    "PixelStats",
    "basis_sha256",
    "check_output_path",
    "describe_file",
    "load_basis",
    "load_pixel_stats",
    "save_basis",
    "save_pixel_stats",
]

#: The ``format`` tag stored in every basis file.
BASIS_FORMAT = "magma_composer.pca_basis/1"
#: The ``format`` tag stored in every pixel statistics file.
STATS_FORMAT = "magma_composer.pixel_stats/1"

_ARRAYS = ("mean", "std", "components", "eigenvalues", "ratios")
_META = ("image_size", "channels", "num_images", "total_variance", "method")
_STATS_ARRAYS = ("mean", "std")
_STATS_META = ("image_size", "channels", "num_images")

#: The file ends with this and the hex sha256 of every byte before it (the zip archive's comment).
_TRAILER_PREFIX = b"magma_composer.pca_basis sha256="
_TRAILER_SIZE = len(_TRAILER_PREFIX) + 64
#: A zip end-of-central-directory record without a comment.
_EOCD_SIZE = 22


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


class PixelStats(NamedTuple):
    """Per-pixel mean and standard deviation of a data set's images, for ``normalize: pixel``.

    ``D = channels * image_size ** 2`` values flattened in C, H, W order: ``image.reshape(-1)`` of a
    ``C x S x S`` tensor (channel-major, then rows, then columns), the same order as :class:`PCABasis`. So
    ``(image - mean.reshape(C, S, S)) / std.reshape(C, S, S)`` standardises a ``C x S x S`` image. The images
    are those of the basis fit: resized (shorter side to ``image_size``, bicubic), centre-cropped, pixels in
    [0, 1].

    Attributes:
        mean (torch.Tensor): ``D`` per-pixel mean, float64.
        std (torch.Tensor): ``D`` per-pixel population standard deviation (``ddof=0``), float64; pixels that
            are constant in the data set get 1, so their standardised value is 0 (never a division by 0).
        image_size (int): image side ``S`` in pixels.
        channels (int): image channels ``C``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    image_size: int
    channels: int


def _content_sha256(fmt: str, arrays: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """sha256 over ``fmt``, the arrays (name, dtype, shape and bytes, in the given order) and the metadata."""
    h = hashlib.sha256(fmt.encode())
    for name, t in arrays.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    for name, value in meta.items():
        h.update(f"{name}={value!r};".encode())
    return h.hexdigest()


def basis_sha256(basis: PCABasis) -> str:
    """sha256 over the basis arrays (dtype, shape and bytes, in a fixed order) and its metadata."""
    return _content_sha256(
        BASIS_FORMAT, {name: getattr(basis, name) for name in _ARRAYS}, {name: getattr(basis, name) for name in _META}
    )


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Checks, before any work, that a file can be written at ``path``; returns it as a ``Path``.

    Nothing is created: the nearest existing folder above ``path`` is tested by creating and removing an
    empty temporary file in it (the only test that holds for every user, root included, and every file
    system, read-only mounts included).

    Args:
        path (str | PathLike): the file to write.
        overwrite (bool): whether an existing file at ``path`` may be replaced.

    Raises:
        IsADirectoryError: ``path`` is a directory.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        NotADirectoryError: a component of the parent path is a file.
        PermissionError: the folder cannot be written (read-only, no permission, ...).
    """
    path = Path(os.fspath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; name a file in it, e.g. {str(path / 'basis.pt')!r}")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(
                f"{str(path)!r} already exists; it is kept unless overwrite is set (--overwrite on the command line)"
            )
        if path.exists() and not path.is_file():
            raise FileExistsError(f"{str(path)!r} exists and is not a regular file; it is never replaced")
    folder = path.absolute().parent
    while not folder.exists() and not folder.is_symlink():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(folder)!r} is a file, not a folder")
    try:
        tmp, fd = _create_temporary(folder, ".write-check")
    except OSError as e:
        raise PermissionError(
            f"cannot write {str(path)!r}: the folder {str(folder)!r} is not writable ({e.strerror or e})"
        ) from e
    os.close(fd)
    tmp.unlink()
    return path


def _create_temporary(folder: Path, name: str) -> tuple[Path, int]:
    """A new empty file ``folder/.<name>.<random>.tmp`` (mode 0666 less the umask) and its open descriptor."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # a name already taken: draw another
            continue


def _seal(f: BinaryIO) -> None:
    """Appends the file checksum to a zip archive written by ``torch.save``: it becomes the archive's comment.

    The comment length in the end-of-central-directory record is set first, so the checksum covers every
    byte before it, and the file stays a zip archive that ``torch.load`` reads as it is.
    """
    f.seek(-_EOCD_SIZE, os.SEEK_END)
    eocd = f.read(_EOCD_SIZE)
    if eocd[:4] != b"PK\x05\x06" or eocd[-2:] != b"\0\0":
        raise RuntimeError("torch.save did not end its archive with a plain end-of-central-directory record")
    f.seek(-2, os.SEEK_END)
    f.write(_TRAILER_SIZE.to_bytes(2, "little"))
    f.seek(0)
    digest = _file_digest(f, None)
    f.seek(0, os.SEEK_END)
    f.write(_TRAILER_PREFIX + digest.encode())


def _file_digest(f: BinaryIO, size: int | None) -> str:
    """sha256 of the next ``size`` bytes of ``f`` (all that is left if ``None``), read in 16 MiB chunks."""
    h = hashlib.sha256()
    while size is None or size > 0:
        chunk = f.read(1 << 24 if size is None else min(1 << 24, size))
        if not chunk:
            break
        h.update(chunk)
        if size is not None:
            size -= len(chunk)
    return h.hexdigest()


def _write_payload(payload: dict[str, Any], path: Path, overwrite: bool, what: str = "basis") -> Path:
    """Writes ``payload`` with its checksum to ``path`` through a temporary file in the same folder.

    Without ``overwrite``, a file that appeared at ``path`` meanwhile is kept: the new file goes beside it.
    Any failure removes the temporary file. ``what`` names the content in messages (``'basis'``).

    Returns:
        Path: where the file was written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "w+b") as f:
            torch.save(payload, f)
            f.flush()
            _seal(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)  # fails if the name is taken: never replace a file this call did not check
        except FileExistsError:
            kept = path.with_name(f"{path.stem}.{payload['sha256'][:12]}{path.suffix}")
            os.replace(tmp, kept)
            raise FileExistsError(
                f"{str(path)!r} appeared while the {what} was being made and is kept as it was; the new {what} "
                f"was written to {str(kept)!r}"
            ) from None
        except OSError:  # a file system without hard links: a plain rename, after one more look
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"{str(path)!r} appeared while the {what} was being made") from None
            os.replace(tmp, path)
            return path
        tmp.unlink()
        return path
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_basis(basis: PCABasis, path: str | os.PathLike, overwrite: bool = False) -> PCABasis:
    """Writes ``basis`` to ``path``; returns it with its hash and path set.

    The file is written whole or not at all (a temporary file in the same folder, then a rename; a failed
    write removes the temporary file) and ends with a sha256 of its bytes, which :func:`load_basis` checks.

    Args:
        basis (PCABasis): the basis.
        path (str | PathLike): the file to write (missing folders are created).
        overwrite (bool): replace an existing file at ``path``. Default: ``False``.

    Raises:
        FileExistsError: ``path`` exists (or appeared while writing) and ``overwrite`` is false.
        IsADirectoryError, NotADirectoryError, PermissionError: see :func:`check_output_path`.
        OSError: the write failed (disk full, ...); nothing is left behind.
    """
    path = check_output_path(path, overwrite)
    basis = replace(basis.with_hash(), path=str(path))
    payload: dict[str, Any] = {"format": BASIS_FORMAT, "sha256": basis.sha256}
    payload.update({name: getattr(basis, name).detach().cpu().contiguous() for name in _ARRAYS})
    payload.update({name: getattr(basis, name) for name in _META})
    _write_payload(payload, path, overwrite)
    return basis


_REDO_BASIS = "fit the basis again (python -m magma_composer.pca fit ...)"
_REDO_STATS = "compute the statistics again (python -m magma_composer.pca stats ...)"


def _verify_checksum(path: Path, what: str = "PCA basis file", redo: str = _REDO_BASIS) -> None:
    """Raises ``ValueError`` naming ``path`` unless the file ends with a checksum that matches its bytes.

    ``what`` names the expected kind of file and ``redo`` says how to make it again, in messages.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size >= _TRAILER_SIZE + _EOCD_SIZE:
            f.seek(size - _TRAILER_SIZE)
            trailer = f.read(_TRAILER_SIZE)
        else:
            trailer = b""
        if not trailer.startswith(_TRAILER_PREFIX):
            raise ValueError(
                f"{str(path)!r} is not a {what} written by magma_composer, or it is truncated: it does not end "
                f"with a magma_composer checksum; {redo}"
            )
        f.seek(0)
        actual = _file_digest(f, size - _TRAILER_SIZE)
    recorded = trailer[len(_TRAILER_PREFIX) :].decode("ascii", errors="replace")
    if actual != recorded:
        raise ValueError(
            f"{what[0].upper()}{what[1:]} {str(path)!r} is corrupted: its bytes hash to {actual[:16]}..., but its "
            f"checksum records {recorded[:16]}...; {redo}"
        )


def _read_payload(path: Path, what: str, redo: str) -> dict[str, Any]:
    """The dict stored in a checksummed file at ``path`` (its checksum verified); ``ValueError`` naming the file
    if it is not such a file, is truncated or is altered. ``what`` and ``redo`` word the messages."""
    _verify_checksum(path, what, redo)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign content
        raise ValueError(f"{what[0].upper()}{what[1:]} {str(path)!r} is corrupted or not such a file ({e})") from e
    if not isinstance(payload, dict):
        raise ValueError(f"{str(path)!r} is not a {what} (it holds a {type(payload).__name__})")
    return payload


def _basis_from_payload(payload: dict[str, Any], path: Path) -> PCABasis:
    """The basis in a basis file's ``payload``, its content hash checked; ``ValueError`` naming ``path``."""
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
    return basis


def load_basis(
    path: str | os.PathLike | PCABasis,
    expected_image_size: int | None = None,
    expected_channels: int | None = None,
) -> PCABasis:
    """Reads a basis written by :func:`save_basis`, checking its checksum, its content hash and its image shape.

    Args:
        path (str | PathLike | PCABasis): the basis file (an in-memory basis is returned with its hash set).
        expected_image_size (int, optional): the image side the caller needs.
        expected_channels (int, optional): the channel count the caller needs.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        ValueError: if the file is not a basis file, is corrupted (truncated, any byte altered, or its content
            does not match its hash), or was fitted at another image size or channel count.
    """
    if isinstance(path, PCABasis):
        basis = path if path.sha256 else path.with_hash()
    else:
        path = Path(os.fspath(path))
        if not path.is_file():
            what = "is a directory, not a basis file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(
                f"PCA basis file {str(path)!r} {what}: fit one with "
                "`python -m magma_composer.pca fit --data ... --image-size ... --components ... --out "
                f"{path}`"
            )
        payload = _read_payload(path, "PCA basis file", _REDO_BASIS)
        if payload.get("format") != BASIS_FORMAT:
            found = payload.get("format")
            if found == STATS_FORMAT:
                raise ValueError(
                    f"{str(path)!r} is a pixel statistics file (mean and std only, from python -m magma_composer.pca "
                    "stats), not a PCA basis: fit a basis with python -m magma_composer.pca fit"
                )
            raise ValueError(f"{str(path)!r} is not a PCA basis file (format {found!r}, expected {BASIS_FORMAT!r})")
        basis = _basis_from_payload(payload, path)
    if expected_image_size is not None or expected_channels is not None:
        basis.check_image_shape(
            basis.image_size if expected_image_size is None else expected_image_size,
            basis.channels if expected_channels is None else expected_channels,
            what="the caller",
        )
    return basis


def _check_stats(stats: PixelStats, what: str) -> None:
    """Raises ``ValueError`` (naming ``what``) unless ``stats`` holds ``D = C S^2`` finite means and positive stds."""
    if not isinstance(stats, PixelStats):
        raise ValueError(f"{what}: expected a PixelStats, got {type(stats).__name__}")
    size, channels = stats.image_size, stats.channels
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (size, channels)):
        raise ValueError(f"{what}: image_size and channels must be integers >= 1, got {size!r} and {channels!r}")
    dim = channels * size * size
    for name in _STATS_ARRAYS:
        t = getattr(stats, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (dim,) or not t.is_floating_point():
            found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{what}: {name} must be a float tensor of D = {channels} x {size} x {size} = {dim} values, got {found}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: {name} holds values that are not finite")
    if not bool((stats.std > 0).all()):
        raise ValueError(f"{what}: std must be positive everywhere (constant pixels get 1)")


def _stats_meta(stats: PixelStats, num_images: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The arrays (float64, CPU) and metadata of a statistics file, in the order the content hash reads them."""
    arrays = {name: getattr(stats, name).detach().to("cpu", torch.float64).contiguous() for name in _STATS_ARRAYS}
    meta = {"image_size": int(stats.image_size), "channels": int(stats.channels), "num_images": int(num_images)}
    return arrays, meta


def save_pixel_stats(stats: PixelStats, path: str | os.PathLike, overwrite: bool = False, num_images: int = 0) -> Path:
    """Writes pixel statistics to ``path``, whole or not at all, with a checksum, like :func:`save_basis`.

    Args:
        stats (PixelStats): the statistics (``D`` values in C, H, W order; stored in float64).
        path (str | PathLike): the file to write (missing folders are created).
        overwrite (bool): replace an existing file at ``path``. Default: ``False``.
        num_images (int): images the statistics were computed from, recorded for ``info`` (0: not known).

    Returns:
        Path: the file written.

    Raises:
        ValueError: ``stats`` is inconsistent (shapes other than ``D = C S^2``, non-finite values, a std <= 0).
        FileExistsError: ``path`` exists (or appeared while writing) and ``overwrite`` is false.
        IsADirectoryError, NotADirectoryError, PermissionError: see :func:`check_output_path`.
        OSError: the write failed (disk full, ...); nothing is left behind.
    """
    _check_stats(stats, "save_pixel_stats")
    path = check_output_path(path, overwrite)
    arrays, meta = _stats_meta(stats, num_images)
    payload: dict[str, Any] = {"format": STATS_FORMAT, "sha256": _content_sha256(STATS_FORMAT, arrays, meta)}
    payload.update(arrays)
    payload.update(meta)
    return _write_payload(payload, path, overwrite, what="pixel statistics")


_STATS_REDO = (
    "compute it again with python -m magma_composer.pca stats --data ... --split train --image-size ... --out ..."
)
_ANY_REDO = "make it again with python -m magma_composer.pca fit (a basis) or stats (pixel statistics)"


def _read_stats_file(path: str | os.PathLike, what: str, redo: str) -> tuple[dict[str, Any], Path]:
    """The verified payload of a statistics or basis file; ``ValueError`` naming the file otherwise.

    ``what`` names the expected kind of file and ``redo`` says how to make it, in messages.
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        found = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ValueError(f"{what[0].upper()}{what[1:]} {str(path)!r} {found}: {redo}")
    payload = _read_payload(path, what, redo)
    if payload.get("format") not in (STATS_FORMAT, BASIS_FORMAT):
        raise ValueError(
            f"{str(path)!r} is neither a pixel statistics file nor a PCA basis file (format {payload.get('format')!r})"
        )
    return payload, path


def _stats_from_payload(payload: dict[str, Any], path: Path) -> tuple[PixelStats, int, str]:
    """``(stats, num_images, sha256)`` from a verified statistics or basis file's payload."""
    if payload["format"] == BASIS_FORMAT:
        basis = _basis_from_payload(payload, path)
        return PixelStats(basis.mean, basis.std, basis.image_size, basis.channels), basis.num_images, basis.sha256
    missing = [k for k in (*_STATS_ARRAYS, *_STATS_META, "sha256") if k not in payload]
    if missing:
        raise ValueError(f"pixel statistics file {str(path)!r} is corrupted: missing entries {missing}")
    stats = PixelStats(payload["mean"], payload["std"], payload["image_size"], payload["channels"])
    _check_stats(stats, f"pixel statistics file {str(path)!r}")
    actual = _content_sha256(STATS_FORMAT, *_stats_meta(stats, payload["num_images"]))
    if actual != payload["sha256"]:
        raise ValueError(
            f"pixel statistics file {str(path)!r} is corrupted: its content hashes to {actual[:16]}..., but the "
            f"file records {str(payload['sha256'])[:16]}...; {_STATS_REDO}"
        )
    return stats, int(payload["num_images"]), actual


def load_pixel_stats(path: str | os.PathLike) -> PixelStats:
    """Reads the per-pixel mean and std from a statistics file (:func:`save_pixel_stats`) or a PCA basis file.

    A basis file gives its own standardisation (the same numbers a ``stats`` run on the same images gives).
    Both files' checksums and content hashes are verified.

    Args:
        path (str | PathLike): the file.

    Returns:
        PixelStats: ``mean`` and ``std`` (float64, ``D`` values in C, H, W order), ``image_size``, ``channels``.

    Raises:
        ValueError: naming the file, if it is missing, a directory, truncated, altered, or another kind of file.
    """
    payload, path = _read_stats_file(path, "pixel statistics file (or PCA basis file)", _STATS_REDO)
    return _stats_from_payload(payload, path)[0]


def describe_file(path: str | os.PathLike) -> str:
    """One line describing a PCA basis file or a pixel statistics file, after checking it.

    Raises:
        ValueError: naming the file, if it is missing, truncated, altered, or another kind of file.
    """
    payload, path = _read_stats_file(path, "PCA basis or pixel statistics file", _ANY_REDO)
    if payload["format"] == BASIS_FORMAT:
        return _basis_from_payload(payload, path).summary()
    stats, num_images, sha256 = _stats_from_payload(payload, path)
    images = f"from {num_images} images" if num_images else "(image count not recorded)"
    return (
        f"Pixel statistics: {stats.channels}x{stats.image_size}x{stats.image_size} (D={stats.mean.numel()}) "
        f"{images}, mean {float(stats.mean.mean()):.4f}, std {float(stats.std.mean()):.4f} on average; "
        f"sha256 {sha256[:12]}"
    )
