"""The shipped recipes carry exactly the published settings (docs/algorithms.md, "Published recipes")."""

import pytest

from magma_composer.config import ConfigError, load_config
from tests.conftest import REPO

IMAGENET = REPO / "yamls" / "imagenet"


def check_mae_vitb16(cfg):
    m = cfg.model
    assert (m["encoder"], m["img_size"], m["patch_size"]) == ("vit_base_patch16_224", 224, 16)
    assert (m["decoder_dim"], m["decoder_depth"], m["decoder_heads"]) == (512, 8, 16)
    assert m["mask_ratio"] == 0.75 and m["norm_pix_loss"] is True
    o = cfg.optimizer
    assert o["betas"] == [0.9, 0.95] and o["weight_decay"] == 0.05 and o["base_lr"] == 1.5e-4 and "lr" not in o
    assert (
        cfg.train_data["batch_size"] == 256 and cfg.train_data["crop_scale"] == [0.08, 1.0] and cfg.train_data["hflip"]
    )
    assert cfg.train_data.get("image_size") in (None, 224)
    assert (
        cfg.scheduler["warmup"] == "10ep" and cfg.scheduler.get("alpha_f", 0.0) == 0.0 and cfg.max_duration == "400ep"
    )
    assert cfg.precision in ("amp_fp16", "amp_bf16")


@pytest.mark.parametrize("name", ["mae", "m-mae", "u-mae", "mu-mae"])
def test_imagenet_family(name):
    cfg = load_config(IMAGENET / f"{name}-vitb16.yaml")
    check_mae_vitb16(cfg)
    algos = cfg.algorithms
    prefix = name.split("-")[0]
    assert ("magma" in algos) == (prefix in ("m", "mu"))
    assert ("uniformity" in algos) == (prefix in ("u", "mu"))
    if "magma" in algos:
        magma = algos["magma"]
        assert magma["reference_layers"] == [10] and magma["target_layer"] == 11
        assert magma["weight"] == {"type": "warmup", "start": "10ep", "end": "110ep", "value": 1.0}
        assert magma.get("rbf_scale", 1.0) == 1.0 and magma.get("eps", 1e-4) == 1e-4
        assert cfg.device_train_microbatch_size == cfg.train_data["batch_size"]
    if "uniformity" in algos:
        assert algos["uniformity"]["weight"] == 0.01
        assert cfg.device_train_microbatch_size == cfg.train_data["batch_size"]


@pytest.mark.parametrize("name", ["m-mae", "mu-mae"])
def test_imagenet1k_window(name):
    cfg = load_config(IMAGENET / f"{name}-vitb16-in1k.yaml")
    check_mae_vitb16(cfg)
    assert cfg.algorithms["magma"]["weight"] == {"type": "warmup", "start": "3ep", "end": "103ep", "value": 1.0}
    assert ("uniformity" in cfg.algorithms) == (name == "mu-mae")


def test_cifar10_family_shares_the_baseline():
    base = load_config(REPO / "yamls" / "cifar10" / "mae-vit-tiny.yaml")
    assert base.model["encoder"] == "vit_tiny_patch16_224" and base.model["img_size"] == 32
    for name in ("m-mae", "u-mae", "mu-mae"):
        cfg = load_config(REPO / "yamls" / "cifar10" / f"{name}-vit-tiny.yaml")
        assert cfg.model == base.model and cfg.optimizer == base.optimizer
        assert cfg.device_train_microbatch_size == cfg.train_data["batch_size"]


def test_base_recipe_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*the base of"):
        load_config(tmp_path / "c.yaml")


def test_pmae_recipes_follow_the_pmae_paper():
    cfg = load_config(REPO / "yamls" / "cifar10" / "pmae-vit-tiny.yaml")
    assert cfg.model["encoder"] == "vit_tiny_patch16_224" and (cfg.model["img_size"], cfg.model["patch_size"]) == (
        32,
        8,
    )
    assert (cfg.model["decoder_dim"], cfg.model["decoder_depth"]) == (512, 8)
    pca = cfg.algorithms["pca_masking"]
    assert pca["ratio"] == 0.2 and pca["per_sample"] is False and pca["residual"] == "drop"
    assert cfg.scheduler["warmup"] == "40ep" and cfg.max_duration == "800ep"
    assert (
        cfg.optimizer["base_lr"] == 1.5e-4
        and cfg.optimizer["betas"] == [0.9, 0.95]
        and cfg.optimizer["weight_decay"] == 0.05
    )
    assert cfg.train_data["crop_scale"] == [0.2, 1.0] and cfg.train_data["hflip"]
    assert cfg.train_data["normalize"] == "none" and cfg.eval_data["normalize"] == "none"
    big = load_config(IMAGENET / "pmae-vitb16.yaml")
    assert (big.model["img_size"], big.model["patch_size"]) == (224, 16)
    assert big.algorithms["pca_masking"]["ratio"] == 0.2 and big.train_data["normalize"] == "none"
