"""A differentiable all-gather for batch-wide regularisers (``gather=True``).

MAGMA and uniformity are functions of the whole batch. With ``gather=True`` each rank gathers every
rank's features, computes the term on the global batch, and the gradient flows back to each rank's own
rows.

What the user gets, exactly: every rank computes the same global term ``T`` (the same value on all
ranks, which is also what the trainer logs). ``torch.distributed.nn.functional.all_gather`` sums, in
its backward, the gradients that all ``N`` ranks' copies of ``T`` send to a rank's rows, so each rank's
parameters receive ``N`` times ``dT/dtheta`` through its own rows; DDP then averages gradients over
the ``N`` ranks. The two factors cancel: the parameters get exactly the gradient of ``T`` on the
concatenated global batch, the same as a single process training on that batch. No rescaling is
needed, and the local terms (e.g. the MAE loss, a mean over the local batch, averaged by DDP) keep
their usual meaning. ``tests/test_gather_distributed.py`` checks this against a single-process run.

Every rank must contribute a tensor of the same shape (the same local batch size). Composer's
``DistributedSampler`` and ``StreamingDataset`` give every rank the same number of samples, so this
holds unless a custom sampler hands ranks different batch sizes.
"""

from __future__ import annotations

import os

import torch
from composer.utils import dist

__all__ = ["all_gather_with_grad", "cores_per_rank"]


def cores_per_rank() -> int:
    """This rank's share of the cores this process may use (its CPU affinity), split among the node's ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, dist.get_local_world_size()))


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates ``tensor`` from every rank along dim 0, keeping the gradient path to each rank's rows.

    Rank ``r``'s rows come ``r``-th. With one rank (``composer.utils.dist.get_world_size() == 1``) this is
    the identity; with several, the default process group must be initialised (the Trainer does it).

    Args:
        tensor (torch.Tensor): ``b x ...``, the same shape on every rank.

    Returns:
        torch.Tensor: ``(N * b) x ...``.
    """
    if dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)
