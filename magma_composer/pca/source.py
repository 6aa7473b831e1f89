"""Reading MDS image shards directly for the basis fit: each rank reads its own shards, no sample twice.

``StreamingDataset`` pads every rank's share to the same length (repeating samples) and shuffles; a
PCA fit wants every image exactly once, in any order. So the fit reads the index itself, keeps the first
``max_images`` samples in shard order, gives each rank a contiguous run of whole shards, and lets
streaming's :class:`~streaming.base.stream.Stream` download (and decompress) only those shards.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import torch
from streaming.base.format.base.reader import Reader
from streaming.base.stream import Stream
from streaming.base.world import World
from torch.utils.data import Dataset

from magma_composer.data.dataset import decode_image
from magma_composer.data.transforms import eval_transform

__all__ = ["ShardImages", "open_shards", "split_shards"]

_STREAM_DEFAULTS = {
    "split": None,
    "download_retry": 2,
    "download_timeout": 120.0,
    "validate_hash": None,
    "keep_zip": False,
}


def _resolve_location(data: str, local: str | None) -> tuple[str | None, str]:
    """``(remote, local)`` for streaming: a local folder is read in place, a URI is cached under ``local``."""
    if "://" not in data:
        if local is not None and os.path.abspath(local) != os.path.abspath(data):
            raise ValueError(f"--local is only for remote data; {data!r} is a local folder and is read in place")
        return None, data
    if local is None:
        digest = hashlib.blake2s(data.encode(), digest_size=8).hexdigest()
        local = os.path.join(tempfile.gettempdir(), "magma_composer_pca", digest)
    return data, local


def open_shards(data: str, split: str | None = None, local: str | None = None) -> tuple[Stream, list[Reader]]:
    """Reads the MDS index of ``data`` (a local folder or a URI such as ``s3://bucket/prefix``).

    Returns:
        ``(stream, shards)``: the streaming ``Stream`` (to download shards with) and the shard readers.

    Raises:
        FileNotFoundError: if a local ``data`` folder has no ``index.json``.
    """
    remote, local = _resolve_location(data, local)
    if remote is None and not os.path.isfile(os.path.join(local, split or "", "index.json")):
        raise FileNotFoundError(
            f"no MDS index at {os.path.join(local, split or '', 'index.json')!r}: --data must be a folder (or URI) "
            "of MDS shards written by streaming.MDSWriter, with --split naming the sub-folder if there is one"
        )
    stream = Stream(remote=remote, local=local, split=split)
    stream.apply_default(_STREAM_DEFAULTS)
    shards = stream.get_shards(World.detect(), allow_unsafe_types=False)
    if not shards or sum(s.samples for s in shards) == 0:
        raise ValueError(f"the MDS data set at {data!r} (split {split!r}) holds no samples")
    return stream, shards


def split_shards(counts: list[int], rank: int, world_size: int, max_images: int | None = None) -> list[tuple[int, int]]:
    """This rank's share: ``(shard index, samples used)`` pairs over contiguous whole shards.

    The first ``max_images`` samples (all if ``None``) in shard order are used; shard ``i`` goes to the rank
    whose equal slice of those samples holds the shard's first sample, so ranks never share a shard.
    """
    total = sum(counts) if max_images is None else min(max_images, sum(counts))
    share, start = [], 0
    for i, count in enumerate(counts):
        used = min(count, total - start)
        if used <= 0:
            break
        if start * world_size // total == rank:
            share.append((i, used))
        start += used
    return share


class ShardImages(Dataset):
    """The images of some shards, resized (shorter side) and centre-cropped, as flat float vectors in [0, 1].

    Args:
        shards (list[Reader]): shard readers whose files are present locally.
        share (list[tuple[int, int]]): ``(shard index, samples used)`` pairs, from :func:`split_shards`.
        image_size (int): output side in pixels.
    """

    def __init__(self, shards: list[Reader], share: list[tuple[int, int]], image_size: int) -> None:
        self.shards = shards
        self.index = [(i, j) for i, used in share for j in range(used)]
        self.transform = eval_transform(image_size, normalize="none")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> torch.Tensor:
        shard, idx = self.index[item]
        sample = self.shards[shard].get_item(idx)
        return self.transform(decode_image(sample["x"])).reshape(-1)
