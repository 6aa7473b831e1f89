"""MDS image data sets streamed from a local folder or object storage."""

from __future__ import annotations

import io
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import get_worker_info
from PIL import Image

from magma_composer.data.checked_streaming import CheckedStreamingDataset
from magma_composer.data.transforms import eval_transform, train_transform

__all__ = ["StreamingImageDataset", "decode_image"]


def decode_image(data: Any) -> Image.Image:
    """Decodes an MDS ``x`` column (JPEG bytes, or a PIL image from a ``pil``/``jpeg`` column) to RGB."""
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    if image.mode == "RGB":  # convert() would copy an RGB image once more
        image.load()
        return image
    return image.convert("RGB")


class StreamingImageDataset(CheckedStreamingDataset):
    """Image classification shards in MDS format (columns ``x``: JPEG bytes, ``y``: int label).

    Yields ``(image, label)``: a ``3 x S x S`` float tensor and an int.

    Built on :class:`~magma_composer.data.checked_streaming.CheckedStreamingDataset`: the data set's index is checked
    first (a clear error naming the endpoint, bucket and prefix), shards are hash-checked (``validate_hash``,
    default ``'auto'``), and a shard that cannot be fetched or fails its check is a clear error, never a
    silently short epoch.

    Args:
        remote (str, optional): where the shards live: a local folder or a URI (``s3://bucket/prefix``;
            set ``S3_ENDPOINT_URL`` for S3-compatible stores).
        local (str, optional): the local cache folder; must be unique per data set on a node.
        split (str, optional): a sub-folder of ``remote`` / ``local`` (``'train'``, ``'val'``).
        image_size (int): output side in pixels.
        train (bool): MAE training augmentation (``True``) or the evaluation transform.
        crop_scale (Sequence[float]): RandomResizedCrop scale range for training.
        hflip (bool): random horizontal flip for training.
        normalize (str): ``'imagenet'`` or ``'none'`` (pixels in [0, 1]).
        resize_ratio (float): evaluation resize, see :func:`~magma_composer.data.transforms.eval_transform`.
        transform (Callable, optional): replaces the transform above entirely.
        augment_seed (int, optional): training augmentations are drawn from a generator seeded by
            ``(augment_seed, epoch, sample index)``, not from the global RNG, so that they are the same in any
            loader worker and after a resumption from a checkpoint. Default: the shuffle seed.
        **streaming_kwargs: passed to :class:`streaming.StreamingDataset` (``shuffle``, ``batch_size``,
            ``validate_hash``, ``predownload``, ``cache_limit``, ``num_canonical_nodes``, ``shuffle_algo``, ...).
    """

    def __init__(
        self,
        remote: str | None = None,
        local: str | None = None,
        split: str | None = None,
        image_size: int = 224,
        train: bool = True,
        crop_scale: Sequence[float] = (0.2, 1.0),
        hflip: bool = True,
        normalize: str = "imagenet",
        resize_ratio: float = 1.0,
        transform: Callable | None = None,
        augment_seed: int | None = None,
        **streaming_kwargs: Any,
    ) -> None:
        if remote is None and local is None:
            raise ValueError("StreamingImageDataset needs `remote` (a folder or URI) or `local` (a folder)")
        super().__init__(remote=remote, local=local, split=split, **streaming_kwargs)
        if transform is None:
            transform = (
                train_transform(image_size, crop_scale, hflip, normalize)
                if train
                else eval_transform(image_size, normalize, resize_ratio)
            )
        self.transform = transform
        self.image_size = image_size
        self.train = train
        self.augment_seed = int(self.shuffle_seed if augment_seed is None else augment_seed)

    def _sample_seed(self, index: int) -> int:
        epoch = max(0, int(getattr(self, "next_epoch", 1)) - 1)  # streaming sets next_epoch when an epoch starts
        return (((self.augment_seed * 1_000_003) + epoch) * 2_147_483_647 + int(index)) % (1 << 63)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = super().__getitem__(index)
        image = decode_image(sample["x"])
        if not self.train:
            return self.transform(image), int(sample["y"])
        # torchvision's random transforms draw from torch's global CPU generator: give them a per-sample seed.
        # Only the CPU generator is seeded: torch.manual_seed would also queue a lazy CUDA seeding, which records a
        # stack trace each time (about a fifth of the per-image cost of a 32 px loader worker). In a loader worker the
        # global generator serves the transforms alone, so it is not restored; in the main process it is.
        keep_global_rng = torch.random.fork_rng(devices=[]) if get_worker_info() is None else nullcontext()
        with keep_global_rng:
            torch.default_generator.manual_seed(self._sample_seed(index))
            return self.transform(image), int(sample["y"])
