"""The data loader of a recipe's ``train_data`` / ``eval_data`` section."""

from __future__ import annotations

from typing import Any

import torch

from magma_composer.data.dataset import StreamingImageDataset
from magma_composer.options import OptionError, check_int

__all__ = ["build_image_dataloader"]


def build_image_dataloader(
    batch_size: int,
    num_workers: int = 2,
    drop_last: bool | None = None,
    persistent_workers: bool | None = None,
    train: bool = True,
    **dataset_options: Any,
) -> Any:
    """A resumable :class:`streaming.StreamingDataLoader` over a :class:`StreamingImageDataset`.

    Args:
        batch_size (int): samples per batch, per device (also the data set's ``batch_size``, which streaming uses
            to partition samples across ranks).
        num_workers (int): loader worker processes (0: load in the main process).
        drop_last (bool, optional): drop the last incomplete batch. Default: ``True`` for training, ``False``
            for evaluation.
        persistent_workers (bool, optional): keep the workers between epochs. Default: ``True`` when there are
            workers.
        train (bool): the training transform and sampling, or the evaluation ones.
        **dataset_options: the options of :class:`StreamingImageDataset` (``remote``, ``split``, ``crop_scale``...);
            with ``views`` (training), batches are ``(B x 2 x C x S x S views, B labels)``.

    Raises:
        OptionError: a bad value, named by its option.
    """
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0)
    if persistent_workers and num_workers == 0:
        raise OptionError("persistent_workers", "true needs num_workers > 0 (there are no workers to keep)")
    dataset = StreamingImageDataset(batch_size=batch_size, train=train, **dataset_options)
    drop_last = train if drop_last is None else drop_last
    per_rank = len(dataset)  # this rank's samples per epoch
    if drop_last and per_rank < batch_size:
        # no complete batch: every epoch would be empty, and a run measured in batches would never end
        raise OptionError(
            "batch_size",
            f"{batch_size}, but this data set gives {per_rank} samples per epoch to each rank ({dataset.size} in "
            f"{dataset_options.get('split') or 'the data set'}), so with drop_last no batch is ever complete: "
            f"lower batch_size to at most {per_rank}, or set drop_last: false",
        )
    from streaming import StreamingDataLoader

    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers,
    )


#: where ``**dataset_options`` go (the recipe reader follows it to check their keys)
build_image_dataloader.kwargs_owner = StreamingImageDataset
