"""Two augmented views of each training image, for joint-embedding methods (SimCLR, VICReg).

A data set with ``views`` yields ``2 x C x S x S`` tensors (view 1, then view 2). Each view is drawn by its own
pipeline, in the order the methods publish it::

    RandomResizedCrop (bicubic) -> horizontal flip -> colour jitter (random order of the four) -> greyscale
    -> ToTensor -> Gaussian blur -> solarisation -> normalisation

The PIL steps come first (the crop shrinks the image before any per-pixel work); blur and solarisation run on the
float tensor. Every draw comes from torch's CPU generator, which the data set seeds per sample (view 1's draws, then
view 2's), so a sample's views depend only on ``(augment_seed, epoch, sample index)``.

Presets (``views: simclr`` / ``views: vicreg``), at ``S`` > :data:`SMALL_IMAGE_SIZE` (ImageNet-size images):

============== ============================ =============================================
key            ``simclr``                   ``vicreg`` (view 1 / view 2)
============== ============================ =============================================
crop_scale     [0.08, 1.0]                  [0.08, 1.0]
crop_ratio     [3/4, 4/3]                   [3/4, 4/3]
hflip_prob     0.5                          0.5
jitter         [0.8, 0.8, 0.8, 0.2]         [0.4, 0.4, 0.2, 0.1]
jitter_prob    0.8                          0.8
grayscale_prob 0.2                          0.2
blur_prob      0.5                          1.0 / 0.1
blur_sigma     [0.1, 2.0]                   [0.1, 2.0]
blur_kernel    0.1 (of the side)            0.1 (of the side)
solarize_prob  0                            0 / 0.2
============== ============================ =============================================

* ``simclr``: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations", Appendix A:
  colour distortion of strength ``s = 1`` (jitter ``0.8 s, 0.8 s, 0.8 s, 0.2 s`` with probability 0.8, greyscale
  0.2) and blur with probability 0.5, kernel 10 % of the side, sigma in [0.1, 2.0]. solo-learn's SimCLR configs (the
  MAGMA authors' base; ``scripts/pretrain/*/simclr.sh`` and ``augmentations/symmetric.yaml``) use the same
  strengths; ``0.4, 0.4, 0.2, 0.1`` are solo-learn's BYOL / VICReg strengths, the ``vicreg`` preset here.
* ``vicreg``: Bardes et al. 2022, "VICReg", whose augmentations are BYOL's (Grill et al. 2020, Appendix B,
  Table 6): asymmetric, blur always on view 1 and with probability 0.1 on view 2, solarisation only on view 2 (0.2).
  solo-learn's VICReg configs differ (crop scale from 0.2, symmetric solarisation 0.1, symmetric blur 0.5 on
  ImageNet-100): override those keys to follow them.
* Small images (``S`` <= :data:`SMALL_IMAGE_SIZE`: CIFAR, Tiny-ImageNet, MedMNIST at 64 px): no blur in either
  preset, as SimCLR did on CIFAR-10 (google-research/simclr's CIFAR-10 command ``--use_blur=False
  --color_jitter_strength=0.5``) and as solo-learn's CIFAR SimCLR and VICReg scripts do; ``simclr`` also takes
  that command's colour strength ``s = 0.5``: jitter ``[0.4, 0.4, 0.4, 0.1]`` (solo-learn keeps ``s = 1`` on CIFAR:
  ``jitter: [0.8, 0.8, 0.8, 0.2]`` follows it).

A mapping ``{preset: simclr, <key>: <value>, ...}`` overrides keys of the table. Probabilities (``*_prob``) take one
number (both views) or ``[view 1, view 2]``; ranges (``crop_scale``, ``crop_ratio``, ``blur_sigma``) and ``jitter``
(brightness, contrast, saturation, hue) apply to both views. ``blur_kernel`` is the kernel's size as a fraction of
the side, made odd as SimCLR does (``2 * (int(f * S) // 2) + 1``: 23 px at 224; a kernel of 1 px leaves the image
unchanged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from PIL import Image
from torchvision import transforms as T

from magma_composer.data.transforms import normalization
from magma_composer.options import OptionError, check_choice, check_int, check_number

__all__ = [
    "SMALL_IMAGE_SIZE",
    "VIEW_KEYS",
    "VIEW_PRESETS",
    "TwoViews",
    "ViewSettings",
    "blur_kernel_size",
    "two_view_transform",
    "view_settings",
]

#: the presets ``views`` accepts by name
VIEW_PRESETS = ("simclr", "vicreg")
#: images of at most this side get the presets' small-image variant (no blur; SimCLR: colour strength 0.5)
SMALL_IMAGE_SIZE = 64
#: how many views a sample yields
NUM_VIEWS = 2


@dataclass(frozen=True)
class ViewSettings:
    """The resolved augmentation of one view (see the module docstring for each key)."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip_prob: float
    jitter: tuple[float, float, float, float]
    jitter_prob: float
    grayscale_prob: float
    blur_prob: float
    blur_sigma: tuple[float, float]
    blur_kernel: float
    solarize_prob: float


#: the keys a ``views`` mapping may set besides ``preset``
VIEW_KEYS = tuple(ViewSettings.__dataclass_fields__)
_PER_VIEW = tuple(k for k in VIEW_KEYS if k.endswith("_prob"))


def _preset(name: str, image_size: int) -> dict[str, Any]:
    small = image_size <= SMALL_IMAGE_SIZE
    common = dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip_prob=0.5, jitter_prob=0.8,
                  grayscale_prob=0.2, blur_sigma=(0.1, 2.0), blur_kernel=0.1)  # fmt: skip
    if name == "simclr":
        s = 0.5 if small else 1.0  # SimCLR's colour-distortion strength: 1 on ImageNet, 0.5 on CIFAR-10
        return dict(common, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), blur_prob=0.0 if small else 0.5,
                    solarize_prob=0.0)  # fmt: skip
    return dict(common, jitter=(0.4, 0.4, 0.2, 0.1), blur_prob=(0.0, 0.0) if small else (1.0, 0.1),
                solarize_prob=(0.0, 0.2))  # fmt: skip


def _pair(key: str, value: Any, check: Callable[[str, Any], float]) -> tuple[float, float]:
    """A ``[lo, hi]`` range with ``lo <= hi``, each end checked by ``check``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise OptionError(key, f"expected [lo, hi], got {value!r}")
    lo, hi = check(f"{key}[0]", value[0]), check(f"{key}[1]", value[1])
    if lo > hi:
        raise OptionError(key, f"expected lo <= hi, got {list(value)}")
    return lo, hi


def _check(key: str, value: Any, where: str) -> Any:
    """One key of the view settings, checked; ``where`` is its key path for messages."""
    if key == "crop_scale":
        return _pair(where, value, lambda k, v: check_number(k, v, 0.0, 1.0, open_min=True))
    if key == "crop_ratio":
        return _pair(where, value, lambda k, v: check_number(k, v, 0.0, open_min=True))
    if key == "blur_sigma":
        return _pair(where, value, lambda k, v: check_number(k, v, 0.0, open_min=True))
    if key == "blur_kernel":
        return check_number(where, value, 0.0, 1.0, open_min=True)
    if key == "jitter":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 4:
            raise OptionError(where, f"expected [brightness, contrast, saturation, hue], got {value!r}")
        strengths = [check_number(f"{where}[{i}]", v, 0.0) for i, v in enumerate(value[:3])]
        return (*strengths, check_number(f"{where}[3]", value[3], 0.0, 0.5))
    # a probability: one for both views, or one per view
    if isinstance(value, (list, tuple)):
        if len(value) != NUM_VIEWS:
            raise OptionError(where, f"expected one probability or [view 1, view 2], got {list(value)}")
        return tuple(check_number(f"{where}[{i}]", v, 0.0, 1.0) for i, v in enumerate(value))
    return check_number(where, value, 0.0, 1.0)


def view_settings(views: str | Mapping[str, Any], image_size: int) -> tuple[ViewSettings, ViewSettings]:
    """Resolves a ``views`` option (a preset name, or a mapping ``{preset: ..., <key>: <value>}``) at a size.

    Args:
        views: ``'simclr'``, ``'vicreg'`` or a mapping with ``preset`` and overrides of :data:`VIEW_KEYS`.
        image_size (int): the side of the views (chooses the presets' small-image variant).

    Returns:
        (ViewSettings, ViewSettings): view 1's and view 2's settings.

    Raises:
        OptionError: an unknown preset or key (named, with the valid ones), or a bad value (``views.<key>``).
    """
    check_int("image_size", image_size, 1)
    if isinstance(views, str):
        views = {"preset": views}
    if not isinstance(views, Mapping):
        raise OptionError(
            "views", f"expected a preset name ({', '.join(VIEW_PRESETS)}) or a mapping {{preset: ..., key: value}}, "
            f"got {views!r} ({type(views).__name__})"
        )  # fmt: skip
    if "preset" not in views:
        raise OptionError("views", f"a mapping needs 'preset' ({', '.join(VIEW_PRESETS)}) besides its overrides")
    check_choice("views.preset", views["preset"], VIEW_PRESETS)
    unknown = sorted(str(k) for k in views if k != "preset" and k not in VIEW_KEYS)
    if unknown:
        raise OptionError(
            f"views.{unknown[0]}", f"unknown key; a views mapping takes preset and {', '.join(VIEW_KEYS)}"
        )  # fmt: skip
    values = _preset(views["preset"], image_size)
    values.update({k: _check(k, v, f"views.{k}") for k, v in views.items() if k != "preset"})
    per_view = []
    for i in range(NUM_VIEWS):
        one = {k: (v[i] if k in _PER_VIEW and isinstance(v, tuple) else v) for k, v in values.items()}
        per_view.append(ViewSettings(**one))
    return per_view[0], per_view[1]


def blur_kernel_size(fraction: float, image_size: int) -> int:
    """The odd Gaussian kernel side for a fraction of the image side, as SimCLR computes it (23 px at 224)."""
    return 2 * (int(fraction * image_size) // 2) + 1


def _maybe(step: Callable, p: float) -> list:
    """``step`` with probability ``p``: nothing (and no draw) at 0, always (no draw) at 1."""
    if p <= 0:
        return []
    return [step] if p >= 1 else [T.RandomApply([step], p=p)]


def _view_steps(settings: ViewSettings, image_size: int, finish: Callable | None) -> T.Compose:
    s = settings
    steps: list = [
        T.RandomResizedCrop(
            image_size, scale=s.crop_scale, ratio=s.crop_ratio, interpolation=T.InterpolationMode.BICUBIC
        )  # fmt: skip
    ]
    if s.hflip_prob > 0:
        steps.append(T.RandomHorizontalFlip(s.hflip_prob))
    if any(s.jitter):
        steps += _maybe(T.ColorJitter(*s.jitter), s.jitter_prob)
    if s.grayscale_prob > 0:
        steps.append(T.RandomGrayscale(s.grayscale_prob))
    steps.append(T.ToTensor())
    kernel = blur_kernel_size(s.blur_kernel, image_size)
    if kernel > 1:  # a 1-pixel kernel is the identity
        steps += _maybe(_GaussianBlur(kernel, s.blur_sigma), s.blur_prob)
    steps += _maybe(_Solarize(), s.solarize_prob)
    if finish is not None:
        steps.append(finish)
    return T.Compose(steps)


class _GaussianBlur:
    """Gaussian blur of a ``C x H x W`` tensor with a ``kernel``-pixel kernel and ``sigma ~ U(lo, hi)``, reflected at
    the borders: torchvision's ``GaussianBlur`` (same draw, same kernel) as two 1-D passes, ``kernel / 2`` times
    fewer operations than its 2-D convolution.
    """

    def __init__(self, kernel: int, sigma: tuple[float, float]) -> None:
        self.kernel, self.sigma = kernel, sigma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        half = (self.kernel - 1) / 2
        weights = torch.exp(-0.5 * (torch.linspace(-half, half, self.kernel) / sigma) ** 2)
        weights = (weights / weights.sum()).to(x.dtype)
        c, pad = x.shape[0], self.kernel // 2
        y = torch.nn.functional.pad(x[None], (pad, pad, pad, pad), mode="reflect")
        weights = weights.repeat(c, 1).contiguous()  # one 1-D kernel per channel (a contiguous one: 2x faster)
        y = torch.nn.functional.conv2d(y, weights.view(c, 1, 1, -1), groups=c)
        y = torch.nn.functional.conv2d(y, weights.view(c, 1, -1, 1), groups=c)
        return y[0]

    def __repr__(self) -> str:
        return f"GaussianBlur(kernel_size={self.kernel}, sigma={self.sigma})"


class _Solarize:
    """Inverts the pixels at or above 0.5 (pixels in [0, 1]): ``x -> 1 - x`` there (BYOL's solarisation)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0.5, 1.0 - x, x)

    def __repr__(self) -> str:
        return "Solarize(threshold=0.5)"


class TwoViews:
    """Draws two views of a PIL image: a ``2 x C x S x S`` tensor (view 1 then view 2).

    Draws from torch's CPU generator; the data set seeds it per sample around the call.

    Attributes:
        settings (tuple[ViewSettings, ViewSettings]): each view's resolved augmentation.
        pipelines (tuple[T.Compose, T.Compose]): each view's transform.
    """

    def __init__(self, settings: tuple[ViewSettings, ViewSettings], image_size: int, finish: Callable | None) -> None:
        self.settings = tuple(settings)
        self.image_size = image_size
        self.pipelines = tuple(_view_steps(s, image_size, finish) for s in self.settings)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([pipeline(image) for pipeline in self.pipelines])

    def describe(self) -> list[dict[str, Any]]:
        """Each view's settings as a plain dict (for logs and run records)."""
        return [asdict(s) for s in self.settings]

    def __repr__(self) -> str:
        return f"TwoViews(\n  view 1: {self.pipelines[0]}\n  view 2: {self.pipelines[1]}\n)"


def two_view_transform(
    views: str | Mapping[str, Any], image_size: int, normalize: str = "imagenet", pixel_stats: Any = None
) -> TwoViews:
    """The two-view training transform of a ``views`` option (a preset name or a mapping with overrides).

    Args:
        views: ``'simclr'``, ``'vicreg'`` or ``{preset: ..., <key>: <value>}`` (keys: :data:`VIEW_KEYS`).
        image_size (int): the views' side ``S``.
        normalize (str): ``'imagenet'``, ``'none'`` or ``'pixel'``, applied to each view.
        pixel_stats: with ``normalize='pixel'``: the statistics file or a loaded ``PixelStandardize``.

    Raises:
        OptionError: a bad ``views`` (key ``views`` / ``views.<key>``), normalisation or statistics file.
    """
    settings = view_settings(views, image_size)
    finish = normalization(normalize, pixel_stats, image_size)
    return TwoViews(settings, image_size, finish)
