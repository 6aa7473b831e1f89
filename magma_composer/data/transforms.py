"""Image transforms for pre-training and evaluation, and the pixel normalisations they end with."""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Sequence

import torch
from torchvision import transforms as T

from magma_composer.options import OptionError, check_choice, check_int, check_number

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "PixelStandardize",
    "eval_transform",
    "normalization",
    "train_transform",
    "unnormalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``normalize`` options: ``'imagenet'`` (mean/std above), ``'none'`` (pixels in [0, 1], for PCA masking, whose
#: basis carries its own per-pixel standardisation) or ``'pixel'`` (per-pixel standardisation from a statistics
#: file, ``pixel_stats``).
NORMALIZATIONS = ("imagenet", "none", "pixel")


class PixelStandardize:
    """Per-pixel standardisation ``(x - mean) / std`` of ``C x S x S`` images with pixels in [0, 1].

    ``mean`` and ``std`` hold one value per pixel and channel (PMAE standardises every input this way). A pixel
    whose ``std`` is 0 (constant in the data set) is divided by 1, the rule of the PCA basis fitter
    (:mod:`magma_composer.pca.fit`), so its standardised value is ``x - mean`` (0 on the training images).

    Args:
        mean (torch.Tensor): ``C x S x S`` (or ``D = C * S * S`` values in C, H, W order) per-pixel means.
        std (torch.Tensor): the per-pixel standard deviations, the same shape; none negative.
        image_size (int): the image side ``S``.
        channels (int): the channels ``C``.
        path (str, optional): the file they came from, for messages.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, image_size: int, channels: int = 3,
                 path: str | None = None) -> None:  # fmt: skip
        shape = (int(channels), int(image_size), int(image_size))
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        where = path or "pixel statistics"
        dim = shape[0] * shape[1] * shape[2]
        if mean.numel() != dim or std.numel() != dim:
            raise ValueError(
                f"{where}: expected {shape[0]} x {shape[1]} x {shape[2]} = {dim} means and standard deviations, got "
                f"{mean.numel()} and {std.numel()}"
            )
        if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all()) or bool((std < 0).any()):
            raise ValueError(f"{where}: the means and standard deviations must be finite, the deviations >= 0")
        self.mean = mean.reshape(shape).float()
        self.std = torch.where(std > 0, std, torch.ones_like(std)).reshape(shape).float()
        self.image_size, self.channels, self.path = shape[1], shape[0], path

    @classmethod
    def from_file(cls, path: str | os.PathLike, image_size: int, channels: int = 3) -> PixelStandardize:
        """Reads a statistics file (or a PCA basis file) with :func:`magma_composer.pca.load_pixel_stats`.

        Raises:
            OptionError: (key ``pixel_stats``) the file is missing, unreadable, or of another image size or
                channel count than ``channels x image_size x image_size``.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise OptionError(
                "pixel_stats",
                f"{path}: no such file; compute the training split's per-pixel statistics with `python -m "
                f"magma_composer.pca stats --data DATA --split train --image-size {image_size} --out {path}` "
                "(a PCA basis file works too)",
            )
        from magma_composer.pca import load_pixel_stats

        try:
            stats = load_pixel_stats(path)
        except (ValueError, OSError) as exc:  # its messages name the file
            raise OptionError("pixel_stats", str(exc)) from None
        if (int(stats.channels), int(stats.image_size)) != (int(channels), int(image_size)):
            raise OptionError(
                "pixel_stats",
                f"{path} holds statistics of {stats.channels} x {stats.image_size} x {stats.image_size} images, but "
                f"this data set yields {channels} x {image_size} x {image_size}; compute them at this size "
                f"(`python -m magma_composer.pca stats ... --image-size {image_size}`)",
            )
        try:
            return cls(stats.mean, stats.std, stats.image_size, stats.channels, path=path)
        except ValueError as exc:
            raise OptionError("pixel_stats", str(exc)) from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Standardises a ``C x S x S`` image (or a batch of them)."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        """Undoes :meth:`__call__`: pixels in [0, 1] again."""
        return z * self.std.to(z.device) + self.mean.to(z.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path or 'in memory'}, {self.channels}x{self.image_size}x{self.image_size})"


def normalization(
    normalize: str, pixel_stats: str | os.PathLike | PixelStandardize | None = None, image_size: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The step that ends a transform after ``ToTensor``, or ``None`` for ``normalize='none'``.

    Args:
        normalize (str): one of :data:`NORMALIZATIONS`.
        pixel_stats: with ``'pixel'`` (and only then): the statistics file, or a loaded :class:`PixelStandardize`.
        image_size (int): the side of the images (checked against the statistics file).

    Raises:
        OptionError: an unknown ``normalize``, ``'pixel'`` without ``pixel_stats`` or ``pixel_stats`` without
            ``'pixel'``, or a statistics file that does not fit.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    if normalize != "pixel":
        if pixel_stats is not None:
            raise OptionError(
                "pixel_stats", f"is used by normalize: pixel only, but normalize is {normalize!r}; set both or neither"
            )
        return T.Normalize(IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else None
    if pixel_stats is None:
        raise OptionError(
            "normalize",
            "'pixel' standardises each pixel with the statistics in pixel_stats: PATH (`python -m magma_composer.pca "
            "stats ...` writes one); set pixel_stats",
        )
    if isinstance(pixel_stats, PixelStandardize):
        if image_size is not None and pixel_stats.image_size != image_size:
            raise OptionError(
                "pixel_stats",
                f"{pixel_stats.path or 'the statistics'} are of {pixel_stats.image_size} px images, but this "
                f"transform yields {image_size} px",
            )
        return pixel_stats
    if image_size is None:
        raise ValueError("normalization: 'pixel' needs the image size to check the statistics file against")
    return PixelStandardize.from_file(pixel_stats, image_size)


def _finish(normalize: str, pixel_stats: Any = None, image_size: int | None = None) -> list:
    step = normalization(normalize, pixel_stats, image_size)
    return [T.ToTensor()] + ([] if step is None else [step])


def unnormalize(images: torch.Tensor, normalize: str, pixel_stats: Any = None) -> torch.Tensor:
    """Undoes a data set's normalisation: pixels in [0, 1] (float) from ``C x S x S`` images or batches of them.

    Args:
        images (torch.Tensor): normalised images.
        normalize (str): the normalisation they had, one of :data:`NORMALIZATIONS`.
        pixel_stats: with ``'pixel'``: the statistics file or a loaded :class:`PixelStandardize`.
    """
    step = normalization(normalize, pixel_stats, images.shape[-1])
    images = images.float()
    if step is None:
        return images
    if isinstance(step, PixelStandardize):
        return step.invert(images)
    view = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(view)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(view)
    return images * std + mean


def train_transform(
    image_size: int,
    crop_scale: Sequence[float] = (0.2, 1.0),
    hflip: bool = True,
    normalize: str = "imagenet",
    auto_augment: str | None = None,
    random_erase: float = 0.0,
    pixel_stats: str | os.PathLike | PixelStandardize | None = None,
) -> T.Compose:
    """Training transform: RandomResizedCrop (bicubic), optional horizontal flip, optional RandAugment, to tensor,
    normalise, optional random erasing.

    Args:
        auto_augment (str, optional): a timm RandAugment policy string, e.g. ``'rand-m9-mstd0.5-inc1'`` (MAE's
            fine-tuning recipe); applied after the crop and flip.
        random_erase (float): probability of erasing one random rectangle with per-pixel normal noise (timm's
            ``RandomErasing``, mode ``pixel``), after normalisation; MAE's fine-tuning uses 0.25.
        normalize (str): one of :data:`NORMALIZATIONS`.
        pixel_stats: with ``normalize='pixel'``: the per-pixel statistics file (or a loaded
            :class:`PixelStandardize`).
    """
    check_int("image_size", image_size, 1)
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise OptionError("crop_scale", f"expected [lo, hi] with 0 < lo <= hi <= 1, got {list(crop_scale)}")
    check_number("random_erase", random_erase, 0.0, 1.0)
    steps = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if auto_augment is not None:
        steps.append(_rand_augment(auto_augment, image_size, normalize))
    steps += _finish(normalize, pixel_stats, image_size)
    if random_erase > 0:
        from timm.data.random_erasing import RandomErasing

        steps.append(RandomErasing(random_erase, mode="pixel", device="cpu"))
    return T.Compose(steps)


_RAND_SECTION = re.compile(r"(m|n|mmax|inc)\d+|(p|mstd)\d+(\.\d*)?")


def _rand_augment(policy: str, image_size: int, normalize: str) -> Any:
    from timm.data import rand_augment_transform

    sections = policy.split("-") if isinstance(policy, str) else []
    # timm skips a section it cannot parse; here each must be one it reads
    if not sections or sections[0] != "rand" or not all(_RAND_SECTION.fullmatch(s) for s in sections[1:]):
        raise OptionError(
            "auto_augment",
            f"expected a timm RandAugment policy 'rand-<section>-...' with sections m<int> (magnitude), n<int> (ops), "
            f"p<float>, mstd<float>, mmax<int>, inc<0|1>, e.g. 'rand-m9-mstd0.5-inc1'; got {policy!r}",
        )
    mean = IMAGENET_MEAN if normalize == "imagenet" else (0.5, 0.5, 0.5)
    fill = tuple(round(255 * m) for m in mean)  # the colour that pads rotated / translated images
    try:
        return rand_augment_transform(policy, {"translate_const": int(image_size * 0.45), "img_mean": fill})
    except (ValueError, KeyError, AssertionError, IndexError) as exc:
        raise OptionError(
            "auto_augment", f"{policy!r} is not a valid timm RandAugment policy ({exc}); e.g. 'rand-m9-mstd0.5-inc1'"
        ) from None


def eval_transform(
    image_size: int,
    normalize: str = "imagenet",
    resize_ratio: float = 1.0,
    pixel_stats: str | os.PathLike | PixelStandardize | None = None,
) -> T.Compose:
    """Evaluation transform: resize the shorter side to ``image_size / resize_ratio``, centre crop, normalise.

    ``resize_ratio=1.0`` (the default) keeps the whole image for small data sets; ImageNet recipes use 0.875.
    ``pixel_stats``: with ``normalize='pixel'``, the per-pixel statistics file (or a :class:`PixelStandardize`).
    """
    check_int("image_size", image_size, 1)
    check_number("resize_ratio", resize_ratio, 0.0, 1.0, open_min=True)
    resize = int(round(image_size / resize_ratio))
    steps = [T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(steps + _finish(normalize, pixel_stats, image_size))
