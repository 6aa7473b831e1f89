"""Real Trainer runs from recipes: on demo shards, on shards converted from real CIFAR-10 JPEGs, on 2 ranks."""

import os
import subprocess

import pytest
import torch
import yaml
from composer.core import Callback

from magma_composer.config import validate
from magma_composer.train import build_trainer, main
from tests.conftest import REPO, free_port, tiny_recipe


def test_fit_on_demo_shards_with_callbacks_checkpoint_and_export(demo_mds, tmp_path):
    recipe = tiny_recipe(
        demo_mds,
        eval_data={"remote": str(demo_mds), "split": "test", "batch_size": 40, "num_workers": 0},
        callbacks={
            "knn_monitor": {"k": [5]},
            "reconstruction_images": {"folder": str(tmp_path / "pictures"), "num_images": 4},
        },
        save_folder=str(tmp_path / "ckpt"),
        save_interval="4ba",
        export_encoder=str(tmp_path / "encoder.pt"),
        max_duration="6ba",
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trainer = main([str(path)])
    state = trainer.state
    assert int(state.timestamp.batch) == 6
    knn = next(cb for cb in state.callbacks if type(cb).__name__ == "KNNMonitor")
    assert [label for label, _ in knn.history] == ["init", "final"]
    assert all(0 <= res[5] <= 100 for _, res in knn.history)
    assert (tmp_path / "pictures" / "reconstruction-final.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt"))  # at least one checkpoint
    encoder_state = torch.load(tmp_path / "encoder.pt")
    assert "blocks.0.attn.qkv.weight" in encoder_state


def test_loss_decreases_on_demo_shards(demo_mds):
    recipe = tiny_recipe(demo_mds, max_duration="30ba", seed=1)
    recipe["train_data"]["batch_size"] = 32
    recipe["optimizer"]["lr"] = 2e-3
    trainer = build_trainer(validate(recipe))
    losses = []

    class RecordLoss(Callback):
        def after_loss(self, state, logger):
            losses.append(float(state.loss["mae"]))

    trainer.state.callbacks.append(RecordLoss())
    trainer.fit()
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_fit_on_converted_real_cifar_jpegs(cifar_jpegs, tmp_path):
    from magma_composer.data.convert import convert_image_folder

    for split in ("train", "test"):
        convert_image_folder(cifar_jpegs / split, tmp_path / "mds" / split)
    recipe = tiny_recipe(
        tmp_path / "mds",
        eval_data={"remote": str(tmp_path / "mds"), "split": "test", "batch_size": 50, "num_workers": 0},
        max_duration="5ba",
    )
    trainer = build_trainer(validate(recipe))
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 5
    mse = trainer.state.eval_metrics["eval"]["ReconstructionMSE"].compute()
    assert torch.isfinite(mse) and mse > 0
    images, labels = next(iter(trainer.state.train_dataloader))
    assert images.shape == (16, 3, 32, 32) and labels.max() < 10


def test_two_rank_composer_launcher(demo_mds, tmp_path):
    recipe = tiny_recipe(
        demo_mds,
        max_duration="3ba",
        save_folder=str(tmp_path / "ckpt"),
        save_interval="3ba",
        eval_data={"remote": str(demo_mds), "split": "test", "batch_size": 20, "num_workers": 0},
        eval_interval="3ba",
        # the monitors gather features over both ranks, the online probe averages its head's gradients
        callbacks={"knn_monitor": {"linear_probe": True}, "online_probe": {"num_classes": 10}},
    )
    recipe["train_data"]["batch_size"] = 8
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(REPO / ".venv" / "bin" / "composer") if (REPO / ".venv" / "bin" / "composer").exists() else "composer",
        "-n",
        "2",
        "--master_port",
        str(free_port()),
        "--stdout",
        str(tmp_path / "rank{rank}.out"),
        "--stderr",
        str(tmp_path / "rank{rank}.err"),
        "-m",
        "magma_composer.train",
        str(path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("rank*.*")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    assert "checkpoint: " in proc.stdout  # rank 0 prints the summary; the launcher pipes it through
    assert "linear-probe top-1: init" in proc.stdout and "online probe top-1 (test): " in proc.stdout
    assert list((tmp_path / "ckpt").glob("ep*-ba3-rank0.pt"))


def test_optimizer_groups_and_adamw_weight_decay_convention():
    from magma_composer.models import ComposerMAE
    from magma_composer.train import build_optimizer
    from tests.conftest import TINY_MODEL

    model = ComposerMAE(**TINY_MODEL)
    opt = build_optimizer(model, global_batch=512, base_lr=1.5e-4, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["lr"] == pytest.approx(3e-4)  # base_lr x 512 / 256
    assert decay["weight_decay"] == pytest.approx(3e-4 * 0.05)  # torch AdamW: decay lr * wd per step
    assert no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "net.encoder.cls_token" in no_decay_names and "net.mask_token" in no_decay_names
    assert "net.encoder.blocks.0.norm1.weight" in no_decay_names and "net.decoder_pred.bias" in no_decay_names
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert "net.encoder.pos_embed" not in {names[id(p)] for g in opt.param_groups for p in g["params"]}


class TwoLayers(torch.nn.Module):
    """A weight matrix, its bias and a norm: one parameter of each kind LARS treats differently."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 3))


@pytest.mark.parametrize("trust_clip", [False, True])
def test_lars_step_equals_a_hand_computation(trust_clip):
    """Two steps of timm's Lars as built from a recipe, against LARS written out in float64: the weight matrix gets
    the trust ratio and coupled weight decay, the bias, the norm and the token plain SGD with momentum."""
    from timm.optim import Lars

    from magma_composer.train import build_optimizer

    model = TwoLayers()
    lr, wd, eta, mu = 0.3, 1e-2, 0.02, 0.9
    opt = build_optimizer(model, 256, name="lars", lr=lr, weight_decay=wd, trust_coefficient=eta,
                          trust_clip=trust_clip)  # fmt: skip
    assert isinstance(opt, Lars)
    params = dict(model.named_parameters())
    start = {n: p.detach().double().clone() for n, p in params.items()}
    buffers: dict = {}
    expected = dict(start)
    torch.manual_seed(1)
    steps = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(2)]
    for grads in steps:
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
        for n, w in expected.items():
            g = grads[n].double()
            if n == "fc.weight":
                ratio = eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
                if trust_clip:
                    ratio = min(ratio / lr, 1.0)
                u = ratio * (g + wd * w)
            else:  # excluded: no trust ratio, no decay
                u = g
            buffers[n] = u if n not in buffers else mu * buffers[n] + u
            expected[n] = w - lr * buffers[n]
    for n, p in params.items():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=1e-6, atol=1e-7, msg=n)
        assert not torch.allclose(expected[n], start[n])
    # the weight's step is not plain SGD with momentum (the trust ratio rescales it)
    g1, g2 = (grads["fc.weight"].double() for grads in steps)
    plain = start["fc.weight"] - lr * g1 - lr * (mu * g1 + g2)
    assert not torch.allclose(expected["fc.weight"], plain, atol=1e-3)


def test_lars_groups_and_defaults():
    from magma_composer.models import ComposerMAE
    from magma_composer.train import build_optimizer
    from tests.conftest import TINY_MODEL

    model = ComposerMAE(**TINY_MODEL)
    opt = build_optimizer(model, global_batch=512, name="lars", base_lr=0.3)
    adapted, plain = opt.param_groups
    assert adapted["lr"] == pytest.approx(0.6)  # base_lr x 512 / 256
    assert (adapted["weight_decay"], adapted["always_adapt"]) == (1e-6, True)
    assert (plain["weight_decay"], plain["always_adapt"]) == (0.0, False)
    assert adapted["momentum"] == 0.9 and adapted["trust_coeff"] == 0.001 and adapted["trust_clip"] is False
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"net.encoder.cls_token", "net.encoder.blocks.0.norm1.bias"} <= {names[id(p)] for p in plain["params"]}
    assert all(p.ndim >= 2 for p in adapted["params"])
    # every parameter adapted and decayed without the exclusion
    (only,) = build_optimizer(model, 256, name="lars", lr=0.1, no_decay_norm_bias=False).param_groups
    assert len(only["params"]) == sum(p.requires_grad for p in model.parameters()) and only["always_adapt"]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"name": "sgd", "lr": 0.1}, "name: 'sgd' is not valid; choose one of 'adamw', 'lars'"),
        ({"name": "lars", "lr": 0.1, "betas": [0.9, 0.99]}, "betas: applies to name: adamw only"),
        ({"lr": 0.1, "momentum": 0.9}, "momentum: applies to name: lars only, but name is 'adamw'"),
        ({"lr": 0.1, "trust_coefficient": 0.02}, "trust_coefficient: applies to name: lars only"),
        ({"lr": 0.1, "trust_clip": True}, "trust_clip: applies to name: lars only"),
        ({"name": "lars", "lr": 0.1, "momentum": 1.0}, r"momentum: must be in \[0.0, 1.0\)"),
        ({"name": "lars", "lr": 0.1, "trust_coefficient": 0}, "trust_coefficient: must be > 0.0"),
        ({"name": "lars", "lr": 0.1, "weight_decay": -1e-6}, "weight_decay: must be >= 0.0"),
        ({"name": "lars"}, "lr: give exactly one of 'lr'"),
    ],
)
def test_optimizer_options_are_checked_by_build_optimizer(options, message):
    from magma_composer.options import OptionError
    from magma_composer.train import build_optimizer

    with pytest.raises(OptionError, match=message):
        build_optimizer(TwoLayers(), 256, **options)


def test_callbacks_get_the_datas_pixel_statistics(demo_mds, tmp_path):
    """With normalize: pixel the pictures callback is given the data's statistics file and un-normalises with it."""
    from tests.test_pixel_normalize import write_stats

    stats = tmp_path / "stats.pt"
    mean, std = write_stats(stats)
    data = {
        "remote": str(demo_mds),
        "batch_size": 16,
        "num_workers": 0,
        "normalize": "pixel",
        "pixel_stats": str(stats),
    }
    recipe = tiny_recipe(
        demo_mds,
        train_data={**data, "split": "train"},
        eval_data={**data, "split": "test"},
        callbacks={"reconstruction_images": {"folder": str(tmp_path / "pictures"), "num_images": 2}},
        max_duration="1ba",
    )
    trainer = build_trainer(validate(recipe))
    pictures = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "ReconstructionImages")
    assert (pictures.normalize, pictures.pixel_stats) == ("pixel", str(stats))
    trainer.fit()
    assert (tmp_path / "pictures" / "reconstruction-final.png").stat().st_size > 0
    # the original row is back in [0, 1]: the images un-normalised with the file's mean and std
    images = pictures._fixed_images()
    torch.testing.assert_close(pictures._pixel.invert(images), images * std.float() + mean.float())
    trainer.close()
