"""Reading MDS image shards directly for the basis fit: each rank reads its own shards, no sample twice.

``StreamingDataset`` pads every rank's share to the same length (repeating samples) and shuffles; a
PCA fit wants every image exactly once, in any order. So the fit reads the index itself, keeps the first
``max_images`` samples in shard order, gives each rank a contiguous run of whole shards, and lets
streaming's :class:`~streaming.base.stream.Stream` download (and decompress) only those shards.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from streaming.base.format.base.reader import Reader
from streaming.base.stream import Stream
from streaming.base.world import World
from torch.utils.data import Dataset

from magma_composer.data.dataset import decode_image, default_cache_folder
from magma_composer.data.storage import RemoteDataError, check_remote, is_remote, join_url
from magma_composer.data.transforms import eval_transform
from magma_composer.options import OptionError

__all__ = ["ShardImages", "open_shards", "split_shards"]

_STREAM_DEFAULTS = {
    "split": None,
    "download_retry": 2,
    "download_timeout": 120.0,
    "keep_zip": False,
}


def _resolve_location(data: str, split: str | None, local: str | None) -> tuple[str | None, str]:
    """``(remote, local)`` for streaming: a local folder is read in place, a URI is cached under ``local``."""
    if not is_remote(data):
        if local is not None and os.path.abspath(local) != os.path.abspath(data):
            raise OptionError("local", f"is only for remote data; {data!r} is a local folder and is read in place")
        return None, data
    return data, local if local is not None else default_cache_folder(data, split, tag="pca")


def _check_data(data: str, split: str | None) -> dict:
    """Reads the data set's index with :func:`~magma_composer.data.storage.check_remote`; names a missing ``split``."""
    if not is_remote(data) and os.path.exists(data) and not os.path.isdir(data):
        raise OptionError("data", f"{data!r} is a file; --data must be a folder (or s3:// URI) of MDS shards")
    if not is_remote(data) and split is not None and os.path.isdir(data) and not os.path.isdir(join_url(data, split)):
        raise OptionError(
            "split", f"{split!r} is not a folder in {data!r}, which holds {sorted(os.listdir(data))[:10]}"
        )
    try:
        return check_remote(data, split)
    except RemoteDataError as e:
        hint = (
            "; --data must be a folder (or s3:// URI) of MDS shards written by python -m magma_composer.data.convert "
            "(or streaming.MDSWriter), with --split naming the sub-folder if there is one"
        )
        raise OptionError("data", f"{e}{hint if not is_remote(data) else ''}") from e


def open_shards(data: str, split: str | None = None, local: str | None = None) -> tuple[Stream, list[Reader]]:
    """Reads the MDS index of ``data`` (a local folder or a URI such as ``s3://bucket/prefix``).

    Returns:
        ``(stream, shards)``: the streaming ``Stream`` (to download shards with, checking them with a hash the
        index carries) and the shard readers.

    Raises:
        OptionError: ``data`` (or ``split``, ``local``) does not name a readable MDS data set of images in an
            ``x`` column with at least one sample; the message says what was found instead.
    """
    if not isinstance(data, (str, os.PathLike)) or not os.fspath(data):
        raise OptionError("data", f"expected a folder or URI of MDS shards, got {data!r}")
    data = os.fspath(data)
    if split is not None and (not isinstance(split, str) or not split or os.path.isabs(split)):
        raise OptionError("split", f"expected the name of a sub-folder of the data set, got {split!r}")
    if local is not None and (not isinstance(local, (str, os.PathLike)) or not os.fspath(local)):
        raise OptionError("local", f"expected a folder for the shard cache, got {local!r}")
    remote, local = _resolve_location(data, split, None if local is None else os.fspath(local))
    summary = _check_data(data, split)
    hashes = summary.get("hashes") or []
    where = f"{join_url(data, split) if split else data}"
    try:
        stream = Stream(remote=remote, local=local, split=split)
        stream.apply_default(
            {**_STREAM_DEFAULTS, "validate_hash": "xxh64" if "xxh64" in hashes else next(iter(hashes), None)}
        )
        shards = stream.get_shards(World.detect(), allow_unsafe_types=False)
    except Exception as e:  # streaming raises several types for an index it cannot use
        raise OptionError("data", f"cannot read the MDS index of {where}: {type(e).__name__}: {e}") from e
    if not shards or sum(s.samples for s in shards) == 0:
        raise OptionError("data", f"the MDS data set at {where} holds no samples")
    columns = getattr(shards[0], "column_names", None)
    if columns is not None and "x" not in columns:
        raise OptionError("data", f"the MDS data set at {where} has no image column 'x' (its columns: {columns})")
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
    """The images of some shards, resized (shorter side) and centre-cropped, as flat ``uint8`` vectors (C, H, W).

    ``uint8`` is a quarter of float32's size, both through the loader workers' shared memory and in the fit's
    in-memory copy of the images; ``x / 255`` is exactly what ``ToTensor`` gives for the same image. The
    channels come from PIL's ``split`` (0.2 ms at 224 px, where ``ToTensor`` takes about 20 ms and
    ``PILToTensor`` with a flattening copy about 12 ms on this machine's CPU: they dominated the fit).

    Args:
        shards (list[Reader]): shard readers whose files are present locally.
        share (list[tuple[int, int]]): ``(shard index, samples used)`` pairs, from :func:`split_shards`.
        image_size (int): output side in pixels.
    """

    def __init__(self, shards: list[Reader], share: list[tuple[int, int]], image_size: int) -> None:
        self.shards = shards
        self.index = [(i, j) for i, used in share for j in range(used)]
        steps = eval_transform(image_size, normalize="none").transforms
        if not isinstance(steps[-1], T.ToTensor):  # the resize and crop are eval_transform's, defined there
            raise RuntimeError(f"eval_transform(normalize='none') no longer ends with ToTensor: {steps}")
        self.transform = T.Compose(steps[:-1])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> torch.Tensor:
        shard, idx = self.index[item]
        sample = self.shards[shard].get_item(idx)
        return planes(self.transform(decode_image(sample["x"])))


def planes(image: Image.Image) -> torch.Tensor:
    """An RGB image's pixels as a flat ``uint8`` tensor in C, H, W order (the channel planes one after another)."""
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()])).reshape(-1)
