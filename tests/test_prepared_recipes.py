"""Each data set's path as a new user walks it: files in the data set's own format -> ``prepare`` -> the shipped
recipe for that data set, trained for a few steps on the prepared splits (the recipe's own split names, its
evaluation split included), with a tiny model. The preparers' decoding is tested in tests/test_prepare.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger

from magma_composer.config import load_config
from magma_composer.data.prepare import MEDMNIST_CLASSES, imagenet100_classes, prepare_dataset
from magma_composer.train import build_trainer
from tests.conftest import REPO
from tests.test_prepare import _write_cifar100, _write_imagenet, _write_medmnist, _write_stl10, _write_tiny


def _downloads(name: str, root: Path) -> Path:
    """Writes a small download of ``name`` in its own format under ``root``; returns the ``--src`` to prepare."""
    if name == "cifar100":
        _write_cifar100(root, counts=(("train", 24), ("test", 8)))
    elif name == "stl10":
        _write_stl10(root, counts=(("train", 8), ("test", 8), ("unlabeled", 24)))
    elif name == "tiny-imagenet":
        _write_tiny(root)
    elif name == "imagenet100":
        _write_imagenet(root, imagenet100_classes())
    else:
        _write_medmnist(root / f"{name}_64.npz", 64, len(MEDMNIST_CLASSES[name]))
    return root


RECIPES = [
    ("cifar100", "cifar100/mu-mae-vit-small.yaml", ()),
    ("stl10", "stl10/m-mae-vit-small.yaml", ("train", "test", "unlabeled", "train+unlabeled")),
    ("tiny-imagenet", "tiny-imagenet/pmae-mae-vit-tiny.yaml", ()),
    ("imagenet100", "imagenet100/m-mae-vitb16.yaml", ()),
    ("imagenet100", "imagenet100/m-simclr-resnet50.yaml", ()),
    ("bloodmnist", "medmnist/bloodmnist-pmae-mae-rd-vit-tiny.yaml", ()),
    ("dermamnist", "medmnist/dermamnist-pmae-mae-vit-tiny.yaml", ()),
]


@pytest.mark.parametrize("name, recipe, splits", RECIPES, ids=[r for _, r, _ in RECIPES])
def test_prepared_data_set_trains_from_its_recipe(name, recipe, splits, tmp_path):
    src = _downloads(name, tmp_path / "downloads")
    out = tmp_path / f"{name}-mds"
    prepare_dataset(name, src, out, splits=list(splits) or None, progress=False)

    cfg = load_config(REPO / "yamls" / recipe)
    overrides = [
        f"train_data.remote={out}",
        "train_data.batch_size=4",
        "train_data.num_workers=0",
        f"eval_data.remote={out}",
        "eval_data.batch_size=8",
        "eval_data.num_workers=0",
        "eval_data.max_samples=null",  # the fake splits are tiny (5 images); an evaluation may not repeat them
        "eval_interval=2ba",
        "model.img_size=32",
        "callbacks={}",
        "loggers={in_memory: {}}",
        "save_folder=null",
        "save_interval=null",
        "autoresume=false",
        "device_train_microbatch_size=4",
        "max_duration=2ba",
        "progress_bar=false",
        "device=cpu",
        "precision=fp32",
    ]
    if cfg.model.get("name", "mae") == "mae":
        overrides += [
            "model.encoder={embed_dim: 32, depth: 4, num_heads: 2}",
            "model.patch_size=8",
            "model.decoder_dim=32",
            "model.decoder_depth=1",
            "model.decoder_heads=2",
        ]
    else:
        overrides += ["model.encoder=resnet18", "model.proj_hidden_dim=32", "model.proj_output_dim=16"]
    for section in ("train_data", "eval_data"):  # the statistics file of the PMAE baselines, fitted on these splits
        if getattr(cfg, section).get("pixel_stats"):
            from magma_composer.pca.fit import compute_pixel_stats

            stats = tmp_path / "stats.pt"
            if not stats.exists():
                compute_pixel_stats(str(out), 32, out=stats, split=cfg.train_data["split"], progress=False)
            overrides.append(f"{section}.pixel_stats={stats}")
    if "magma" in cfg.algorithms and cfg.model.get("name", "mae") == "mae":
        overrides += ["algorithms.magma.reference_layers=[2]", "algorithms.magma.target_layer=3"]
    if "magma" in cfg.algorithms:
        overrides.append("algorithms.magma.weight={type: constant, value: 1.0}")

    trainer = build_trainer(load_config(REPO / "yamls" / recipe, overrides))
    try:
        trainer.fit()
        (memory,) = [d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)]
        logged = {key: [value for _, value in rows] for key, rows in memory.data.items()}
    finally:
        trainer.close()
    # the recipe's own splits exist in the prepared data set, and a training step ran on them
    assert (out / cfg.train_data["split"]).is_dir() and (out / cfg.eval_data["split"]).is_dir()
    assert len(logged["loss/train/total"]) == 2
    assert all(torch.isfinite(torch.as_tensor(v)) for v in logged["loss/train/total"])
    if "magma" in cfg.algorithms:
        assert len(logged["magma/term"]) == 2
