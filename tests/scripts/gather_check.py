"""One training step of a tiny float64 MAE with MAGMA and Uniformity (``gather=True``); writes loss and gradients.

Run it twice and compare (``tests/test_gather_distributed.py`` does):

* under the launcher, ``composer -n 2 --master_port PORT tests/scripts/gather_check.py --out ddp.pt``:
  DDP on CPU (gloo), each rank training on its half of the batch (``DistributedSampler``: rank ``r``
  gets samples ``r, r + N, r + 2N, ...``);
* plainly, ``python tests/scripts/gather_check.py --out single.pt --parts 2`` (or :func:`run` in
  process): one process on the whole batch, ordered as the ranks' halves concatenated.

Rank 0 (or the single process) saves its loss dict, the loss dict averaged over ranks, every
parameter's gradient after the backward (already averaged over ranks by DDP), and the MAGMA term of
its local batch alone (for comparison).
The mask ratio is 0, so the forward is deterministic.
"""

from __future__ import annotations

import argparse
import os

import torch
from composer import Callback, Trainer
from composer.utils import dist
from torch.utils.data import DataLoader, Subset, TensorDataset

from magma_composer.algorithms.magma import MAGMA, magma_loss
from magma_composer.algorithms.uniformity import Uniformity
from magma_composer.models import ComposerMAE, get_feature_tap

REFERENCE, TARGET = 1, 3


class Capture(Callback):
    """Records the first batch's loss dict (BEFORE_BACKWARD) and gradients (AFTER_TRAIN_BATCH)."""

    def __init__(self) -> None:
        self.result: dict = {}

    def before_backward(self, state, logger) -> None:
        self.result["losses"] = {k: v.item() for k, v in state.loss.items()}
        # the loss each term contributes to the update: DDP averages over ranks
        self.result["mean_losses"] = {}
        for k, v in state.loss.items():
            total = v.detach().clone()
            dist.all_reduce(total)
            self.result["mean_losses"][k] = total.item() / dist.get_world_size()
        tap = get_feature_tap(state.model)
        x, y = tap.block_features(REFERENCE)[0], tap.block_features(TARGET)[0]
        self.result["local_magma"] = magma_loss(x, y).item()
        self.result["local_batch"] = x.shape[0]

    def after_train_batch(self, state, logger) -> None:
        self.result["grads"] = {
            name.removeprefix("module."): p.grad.detach().clone()
            for name, p in state.model.named_parameters()
            if p.grad is not None
        }


def run(out: str, samples: int = 16, parts: int = 2) -> None:
    """Trains one batch and saves the capture (rank 0).

    Args:
        out (str): file to write.
        samples (int): the global batch size.
        parts (int): single process only: order the batch as this many rank slices concatenated.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = ComposerMAE(
        {"embed_dim": 32, "depth": 4, "num_heads": 2},
        img_size=32,
        patch_size=8,
        mask_ratio=0.0,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
    ).double()
    assert not model.net.mask_token.requires_grad  # mask_ratio 0: ComposerMAE freezes the unused token
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(samples, 3, 32, 32, generator=g, dtype=torch.float64), torch.zeros(samples, dtype=torch.long)
    )
    if world > 1:
        loader = DataLoader(data, batch_size=samples // world, sampler=dist.get_sampler(data, shuffle=False))
    else:
        order = [i for part in range(parts) for i in range(part, samples, parts)]
        loader = DataLoader(Subset(data, order), batch_size=samples)

    capture = Capture()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration="1ba",
        algorithms=[
            MAGMA(reference_layers=[REFERENCE], target_layer=TARGET, weight=1.0, gather=True),
            Uniformity(weight=1.0, gather=True),
        ],
        callbacks=[capture],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
        progress_bar=False,
        log_to_console=False,
        device="cpu",
        seed=0,
        dist_timeout=120,
    )
    trainer.fit()
    if dist.get_global_rank() == 0:
        torch.save({"world_size": world, **capture.result}, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="file to write (rank 0)")
    parser.add_argument("--samples", type=int, default=16, help="global batch size")
    parser.add_argument("--parts", type=int, default=2, help="single process: order the batch as this many rank slices")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out, args.samples, args.parts)


if __name__ == "__main__":
    main()
