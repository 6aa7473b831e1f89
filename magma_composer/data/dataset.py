"""MDS image data sets streamed from a local folder or object storage."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import tempfile
import urllib.parse
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from magma_composer.data.checked_streaming import CheckedStreamingDataset
from magma_composer.data.storage import is_remote
from magma_composer.data.transforms import eval_transform, normalization, train_transform
from magma_composer.data.views import two_view_transform
from magma_composer.options import OptionError, check_int
from magma_composer.seeding import derive_seed

__all__ = ["StreamingImageDataset", "decode_image", "default_cache_folder"]


def decode_image(data: Any) -> Image.Image:
    """Decodes an MDS ``x`` column (JPEG bytes, or a PIL image from a ``pil``/``jpeg`` column) to RGB."""
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    if image.mode == "RGB":  # convert() would copy an RGB image once more
        image.load()
        return image
    return image.convert("RGB")


def default_cache_folder(remote: str, split: str | None, tag: str = "") -> str:
    """A local cache folder for a remote data set, unique per remote, split and ``tag``."""
    digest = hashlib.sha1(f"{remote}|{split}|{tag}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "magma_composer_cache", digest)


@contextlib.contextmanager
def _seeded_global_rngs(seed: int, python_and_numpy: bool) -> Iterator[None]:
    """Seeds the global generators that transforms draw from and, in the main process, restores them afterwards:
    torch's CPU generator (torchvision) always, Python's ``random`` and NumPy's (timm's RandAugment and random
    erasing) only when ``python_and_numpy``, so that plain crops and flips pay nothing for them.

    Only the CPU generator is touched: torch.manual_seed would also seed (and initialise) CUDA.
    """
    in_worker = get_worker_info() is not None  # a loader worker owns its generators: nothing to restore
    saved = (random.getstate(), np.random.get_state()) if python_and_numpy and not in_worker else None
    with contextlib.nullcontext() if in_worker else torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if python_and_numpy:
            random.seed(seed)
            np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])


class StreamingImageDataset(CheckedStreamingDataset):
    """Image classification shards in MDS format (columns ``x``: JPEG bytes, ``y``: int label).

    Yields ``(image, label)``: a ``3 x S x S`` float tensor and an int (``-1`` for a data set without a ``y``
    column: unlabelled images; :attr:`has_labels` tells), or ``(image, label, sample index)`` with
    ``return_index``. With ``views`` (training only), ``image`` is a ``2 x 3 x S x S`` tensor of two augmented
    views (view 1 then view 2), so a collated batch is ``B x 2 x 3 x S x S``.

    Built on :class:`~magma_composer.data.checked_streaming.CheckedStreamingDataset`: the data set's index is checked
    first (a clear error naming the endpoint, bucket and prefix), shards are hash-checked (``validate_hash``,
    default ``'auto'``), and a shard that cannot be fetched or fails its check is a clear error, never a
    silently short epoch.

    Args:
        remote (str): where the shards live: a local folder (read in place) or a URI (``s3://bucket/prefix``; set
            ``S3_ENDPOINT_URL`` for S3-compatible stores).
        local (str, optional): the local cache folder of a URI ``remote``; must be unique per data set on a node.
            Default: a folder under the temporary directory, unique per remote, split and ``cache_tag``.
        split (str, optional): a sub-folder of ``remote`` (``'train'``, ``'val'``).
        image_size (int): output side in pixels.
        train (bool): MAE training augmentation (``True``) or the evaluation transform.
        crop_scale (Sequence[float], optional): training: RandomResizedCrop scale range ``[lo, hi]``, ``0 < lo <= hi
            <= 1``. Default ``(0.2, 1.0)``.
        hflip (bool, optional): training: random horizontal flip. Default ``True``.
        auto_augment (str, optional): training: a timm RandAugment policy (``'rand-m9-mstd0.5-inc1'``), after the
            crop and flip. Default: none.
        random_erase (float, optional): training: probability of timm's random erasing (per-pixel noise), after
            normalisation. Default 0.
        normalize (str): ``'imagenet'``, ``'none'`` (pixels in [0, 1], for PCA masking) or ``'pixel'`` (per-pixel
            standardisation ``(x - mean) / std`` with the statistics in ``pixel_stats``), after ToTensor, for
            training, evaluation and each view.
        pixel_stats (str, optional): with ``normalize: pixel`` (and only then): a per-pixel statistics file
            (``python -m magma_composer.pca stats``) or a PCA basis file, fitted at ``image_size``.
        views (str | Mapping, optional): training only: yield two augmented views per image for SimCLR / VICReg:
            a preset ``'simclr'`` or ``'vicreg'``, or ``{preset: ..., <key>: <value>}`` with overrides (see
            :mod:`magma_composer.data.views`). It replaces the single-view crop and flip, so ``crop_scale``,
            ``hflip``, ``auto_augment`` and ``random_erase`` are refused beside it (set the crop inside ``views``).
        resize_ratio (float, optional): evaluation: resize to ``image_size / resize_ratio``, then centre crop
            (ImageNet: 0.875). Default ``1.0``.
        max_samples (int, optional): an epoch of this many samples (streaming's ``epoch_size``), for subset runs.
            Training may ask for more than the split holds (streaming repeats samples) and draws another subset
            each epoch; an evaluation set (``train=False``) may not ask for more, since repeated images would count
            twice in a kNN bank or a top-1 figure.
        shuffle (bool): shuffle (seeded by ``shuffle_seed``). Default ``True``: capped kNN sets and pictures then
            span the classes. An evaluation set (``train=False``) yields the same images in the same order on every
            pass (the first epoch's subset and order: ``same_every_pass``), so that the first ``N`` of any pass, as
            a capped kNN monitor reads them, are the same ``N`` images at every measurement.
        augment_seed (int, optional): training augmentations are drawn from a generator seeded by
            ``(augment_seed, epoch, sample index)``, not from the global RNG, so that they are the same in any
            loader worker and after a resumption from a checkpoint. Default: the shuffle seed.
        transform (Callable, optional): replaces the transform above entirely.
        cache_tag (str): tells apart the default cache folders of two data sets on the same remote and split.
        return_index (bool): also yield each sample's index in the data set (evaluation gathers features from
            several ranks by it, dropping the samples streaming repeats to even out the ranks).
        **streaming_kwargs: passed to :class:`CheckedStreamingDataset` and :class:`streaming.StreamingDataset`
            (``batch_size``, ``shuffle_seed``, ``validate_hash``, ``predownload``, ``cache_limit``, ...).
    """

    def __init__(
        self,
        remote: str,
        local: str | None = None,
        split: str | None = None,
        image_size: int = 224,
        train: bool = True,
        crop_scale: Sequence[float] | None = None,
        hflip: bool | None = None,
        auto_augment: str | None = None,
        random_erase: float | None = None,
        normalize: str = "imagenet",
        resize_ratio: float | None = None,
        max_samples: int | None = None,
        shuffle: bool = True,
        augment_seed: int | None = None,
        transform: Callable | None = None,
        cache_tag: str = "",
        return_index: bool = False,
        views: str | Mapping[str, Any] | None = None,
        pixel_stats: str | None = None,
        **streaming_kwargs: Any,
    ) -> None:
        # options of the other kind of transform, or of a transform that is replaced, would be silently unused
        single_view = ("crop_scale", "hflip", "auto_augment", "random_erase")
        given = dict(
            crop_scale=crop_scale, hflip=hflip, auto_augment=auto_augment, random_erase=random_erase,
            resize_ratio=resize_ratio, normalize=None if normalize == "imagenet" else normalize,
            pixel_stats=pixel_stats, views=views,
        )  # fmt: skip
        if transform is not None:
            for key, value in given.items():
                if value is not None:
                    raise OptionError(key, "has no effect: this data set's transform is replaced by 'transform'")
        if views is not None and not train:
            raise OptionError(
                "views", "applies to training data only (two augmented views per image); an evaluation data set "
                "yields single centre-cropped images: remove views here"
            )  # fmt: skip
        unused = ("resize_ratio",) if train else (*single_view, "views")
        for key, value in given.items():
            if key in unused and value is not None:
                kind = "evaluation" if train else "training"
                raise OptionError(key, f"applies to {kind} data only; this data set has the other transform")
        if views is not None:
            for key in single_view:
                if given[key] is not None:
                    raise OptionError(
                        key, "has no effect beside views: the two-view pipeline has its own crop, flip and colour "
                        "augmentations; set them inside views (e.g. views: {preset: simclr, crop_scale: [0.2, 1.0]}) "
                        "or remove this option"
                    )  # fmt: skip
        if max_samples is not None:
            check_int("max_samples", max_samples, 1)
            streaming_kwargs["epoch_size"] = max_samples
        if not isinstance(remote, str) or not remote:
            raise OptionError("remote", f"expected a local folder or a URI such as s3://bucket/prefix, got {remote!r}")
        if is_remote(remote):
            if not urllib.parse.urlparse(remote).netloc:
                raise OptionError("remote", f"{remote!r} names no bucket; write scheme://bucket/prefix")
            local = local or default_cache_folder(remote, split, cache_tag)
        elif local is None:  # a local folder is read in place
            remote, local = None, remote
        # an evaluation measures the same images, in the same order, on every pass (a capped kNN bank included)
        streaming_kwargs.setdefault("same_every_pass", not train)
        super().__init__(remote=remote, local=local, split=split, shuffle=shuffle, **streaming_kwargs)
        if not train and max_samples is not None and max_samples > self.size:
            # streaming would repeat images to fill the epoch: duplicated kNN bank entries and test queries
            where = f"{remote or local}" + (f", split {split!r}" if split else "")
            raise OptionError(
                "max_samples", f"{max_samples} is more than the {self.size} images of this evaluation set ({where}); "
                f"an evaluation set would repeat images to fill it: give at most {self.size}, or null for all"
            )  # fmt: skip
        if transform is None:
            # checked and loaded once, here: a bad normalisation or statistics file fails before any sample is read
            finish = normalization(normalize, pixel_stats, image_size)
            pixel = finish if normalize == "pixel" else None
            if views is not None:
                transform = two_view_transform(views, image_size, normalize, pixel)
            elif train:
                transform = train_transform(
                    image_size,
                    crop_scale or (0.2, 1.0),
                    True if hflip is None else hflip,
                    normalize,
                    auto_augment,
                    random_erase or 0.0,
                    pixel_stats=pixel,
                )
            else:
                transform = eval_transform(
                    image_size, normalize, 1.0 if resize_ratio is None else resize_ratio, pixel_stats=pixel
                )
        self.transform = transform
        self.image_size = image_size
        self.train = train
        #: the pixel normalisation of the images this data set yields (``'imagenet'``, ``'none'`` or ``'pixel'``)
        self.normalize = normalize
        #: with ``normalize == 'pixel'``: the per-pixel statistics file
        self.pixel_stats = pixel_stats
        #: the two-view option (``None``: single images)
        self.views = views
        self.augment_seed = int(self.shuffle_seed if augment_seed is None else augment_seed)
        self.return_index = return_index
        # timm's RandAugment and random erasing draw from Python's and NumPy's generators, torchvision's from torch's
        self._python_and_numpy_rngs = auto_augment is not None or bool(random_erase)

    @property
    def has_labels(self) -> bool:
        """Whether the shards have a ``y`` (label) column; without one every label is ``-1``."""
        return all("y" in getattr(shard, "column_names", ("y",)) for shard in self.shards)

    def _sample_seed(self, index: int) -> int:
        epoch = max(0, int(getattr(self, "next_epoch", 1)) - 1)  # streaming sets next_epoch when an epoch starts
        return derive_seed(self.augment_seed, epoch, index)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        sample = super().__getitem__(index)
        image = decode_image(sample["x"])
        label = int(sample["y"]) if "y" in sample else -1
        if not self.train:
            image = self.transform(image)
        else:
            with _seeded_global_rngs(self._sample_seed(index), self._python_and_numpy_rngs):
                image = self.transform(image)
        return (image, label, index) if self.return_index else (image, label)
