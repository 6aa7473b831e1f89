"""Image transforms for MAE pre-training and evaluation."""

from __future__ import annotations

import re
from typing import Any, Sequence

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
    image_size: int,
    crop_scale: Sequence[float] = (0.2, 1.0),
    hflip: bool = True,
    normalize: str = "imagenet",
    auto_augment: str | None = None,
    random_erase: float = 0.0,
) -> T.Compose:
    """Training transform: RandomResizedCrop (bicubic), optional horizontal flip, optional RandAugment, to tensor,
    normalise, optional random erasing.

    Args:
        auto_augment (str, optional): a timm RandAugment policy string, e.g. ``'rand-m9-mstd0.5-inc1'`` (MAE's
            fine-tuning recipe); applied after the crop and flip.
        random_erase (float): probability of erasing one random rectangle with per-pixel normal noise (timm's
            ``RandomErasing``, mode ``pixel``), after normalisation; MAE's fine-tuning uses 0.25.
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
    steps += _finish(normalize)
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


def eval_transform(image_size: int, normalize: str = "imagenet", resize_ratio: float = 1.0) -> T.Compose:
    """Evaluation transform: resize the shorter side to ``image_size / resize_ratio``, centre crop, normalise.

    ``resize_ratio=1.0`` (the default) keeps the whole image for small data sets; ImageNet recipes use 0.875.
    """
    check_int("image_size", image_size, 1)
    check_number("resize_ratio", resize_ratio, 0.0, 1.0, open_min=True)
    resize = int(round(image_size / resize_ratio))
    steps = [T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(steps + _finish(normalize))
