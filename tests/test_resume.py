"""Deterministic resumption: a run stopped mid-epoch and resumed from its checkpoint continues exactly."""

import pytest
from composer.core import Callback

from magma_composer.config import validate
from magma_composer.train import build_trainer
from tests.conftest import tiny_recipe


class Record(Callback):
    """Per batch: the loss terms, and a fingerprint of every sample the model saw (after augmentation)."""

    def __init__(self):
        self.rows = []

    def after_loss(self, state, logger):
        images, labels = state.batch
        # one number per image (per view of a two-view batch B x 2 x C x H x W)
        fingerprints = images.double().flatten(images.dim() - 3).sum(-1).tolist()
        self.rows.append(
            {
                "batch": int(state.timestamp.batch),
                "loss": {k: float(v) for k, v in state.loss.items()},
                "samples": sorted(zip(labels.tolist(), fingerprints)),
            }
        )


def fit(recipe: dict) -> Record:
    trainer = build_trainer(validate(recipe))
    record = Record()
    trainer.state.callbacks.append(record)
    trainer.fit()
    trainer.close()
    return record


@pytest.mark.parametrize("algorithms", [{}, {"magma": {"reference_layers": [1], "weight": 0.5}, "uniformity": {}}])
def test_resume_mid_epoch_continues_bit_identically(demo_mds, tmp_path, algorithms):
    # 160 samples / 16 = 10 batches an epoch; stop at batch 7 (mid-epoch 1), then continue to 15 (mid-epoch 2)
    common = dict(
        scheduler={"warmup": "0ba", "alpha_f": 1.0},  # constant lr: the schedule does not depend on max_duration
        algorithms=algorithms,
        seed=11,
    )
    full = fit(tiny_recipe(demo_mds, max_duration="15ba", **common))
    ckpt = tmp_path / "ckpt"
    first = fit(tiny_recipe(demo_mds, max_duration="7ba", save_folder=str(ckpt), save_interval="7ba", **common))
    (checkpoint,) = ckpt.glob("ep0-ba7-rank0.pt")
    second = fit(tiny_recipe(demo_mds, max_duration="15ba", load_path=str(checkpoint), **common))

    assert [r["batch"] for r in first.rows + second.rows] == list(range(15))
    assert first.rows == full.rows[:7]
    # the resumed run sees exactly the samples the uninterrupted run saw next, with the same augmentations and
    # masks, and its loss trajectory is bit-identical
    for resumed, reference in zip(second.rows, full.rows[7:], strict=True):
        assert resumed["samples"] == reference["samples"]
        assert resumed["loss"] == reference["loss"]
    # epoch 0 = batches 0..9 covers the 160 samples once; the resumed run finished it with the unseen ones
    epoch0 = [label for r in full.rows[:10] for label, _ in r["samples"]]
    assert len(epoch0) == 160 and sorted(epoch0) == sorted([i % 10 for i in range(160)])
    if algorithms:
        assert set(second.rows[0]["loss"]) == {"mae", "magma", "uniformity"}
