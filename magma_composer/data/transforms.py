"""Image transforms for MAE pre-training and evaluation."""

from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T

from magma_composer.options import OptionError, check_choice, check_int, check_number

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NORMALIZATIONS", "train_transform", "eval_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``normalize`` options: ``'imagenet'`` (mean/std above) or ``'none'`` (pixels in [0, 1], for PCA masking,
#: whose basis carries its own per-pixel standardisation).
NORMALIZATIONS = ("imagenet", "none")


def _finish(normalize: str) -> list:
    check_choice("normalize", normalize, NORMALIZATIONS)
    steps = [T.ToTensor()]
    if normalize == "imagenet":
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return steps


def train_transform(
    image_size: int, crop_scale: Sequence[float] = (0.2, 1.0), hflip: bool = True, normalize: str = "imagenet"
) -> T.Compose:
    """MAE training transform: RandomResizedCrop (bicubic), optional horizontal flip, to tensor, normalise."""
    check_int("image_size", image_size, 1)
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise OptionError("crop_scale", f"expected [lo, hi] with 0 < lo <= hi <= 1, got {list(crop_scale)}")
    steps = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + _finish(normalize))


def eval_transform(image_size: int, normalize: str = "imagenet", resize_ratio: float = 1.0) -> T.Compose:
    """Evaluation transform: resize the shorter side to ``image_size / resize_ratio``, centre crop, normalise.

    ``resize_ratio=1.0`` (the default) keeps the whole image for small data sets; ImageNet recipes use 0.875.
    """
    check_int("image_size", image_size, 1)
    check_number("resize_ratio", resize_ratio, 0.0, 1.0, open_min=True)
    resize = int(round(image_size / resize_ratio))
    steps = [T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(steps + _finish(normalize))
