"""SimCLR, M-SimCLR, VICReg and M-VICReg from their shipped recipes: real Trainer runs on the demo shards (ViT and
ResNet), MAGMA's gradient through the first view of the real ComposerSimCLR, exact resumption of a two-view run,
checkpoints evaluated with the evaluation command, the recipes' published settings, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from composer.core import Callback

from magma_composer.config import ConfigError, load_config, validate
from magma_composer.train import build_trainer, main
from tests.conftest import REPO, run_module, tiny_recipe
from tests.test_resume import fit

CIFAR = REPO / "yamls" / "cifar10"
IN100 = REPO / "yamls" / "imagenet100"
TINY_VIT = {"embed_dim": 32, "depth": 4, "num_heads": 2}

#: recipe -> (method, backbone kind)
RECIPES = {
    CIFAR / "simclr-vit-tiny.yaml": ("simclr", "vit"),
    CIFAR / "m-simclr-vit-tiny.yaml": ("simclr", "vit"),
    CIFAR / "vicreg-vit-tiny.yaml": ("vicreg", "vit"),
    CIFAR / "m-vicreg-vit-tiny.yaml": ("vicreg", "vit"),
    IN100 / "simclr-vits16.yaml": ("simclr", "vit"),
    IN100 / "m-simclr-vits16.yaml": ("simclr", "vit"),
    IN100 / "vicreg-vits16.yaml": ("vicreg", "vit"),
    IN100 / "m-vicreg-vits16.yaml": ("vicreg", "vit"),
    IN100 / "simclr-resnet50.yaml": ("simclr", "cnn"),
    IN100 / "m-simclr-resnet50.yaml": ("simclr", "cnn"),
    IN100 / "vicreg-resnet50.yaml": ("vicreg", "cnn"),
    IN100 / "m-vicreg-resnet50.yaml": ("vicreg", "cnn"),
}
LOSS_KEYS = {"simclr": {"simclr"}, "vicreg": {"vicreg_invariance", "vicreg_variance", "vicreg_covariance"}}


def tiny_overrides(recipe, data, batch: int = 16, steps: int = 3, **extra) -> list[str]:
    """Overrides that shrink a shipped SSL recipe to a few CPU steps on the demo shards (32 px, 10 classes)."""
    method, kind = RECIPES[recipe]
    cfg = load_config(recipe)
    model = {"img_size": 32, "proj_hidden_dim": 32, "proj_output_dim": 16 if method == "simclr" else 32}
    model["encoder"] = TINY_VIT if kind == "vit" else "resnet18"
    if kind == "vit":
        model["patch_size"] = 8
    out = [f"model.{k}={v}" for k, v in model.items()]
    out += [
        f"train_data.remote={data}",
        f"train_data.batch_size={batch}",
        "train_data.num_workers=0",
        f"eval_data={{remote: {data}, split: test, batch_size: 40, num_workers: 0}}",
        f"device_train_microbatch_size={batch}",
        f"max_duration={steps}ba",
        "precision=fp32",
        "save_folder=null",
        "save_interval=null",
        "autoresume=false",
        "eval_interval=null",
        "progress_bar=false",
        "callbacks={knn_monitor: {k: [5]}}",
        "loggers={in_memory: {}}",
    ]
    if "magma" in cfg.algorithms:  # the tiny ViT has 4 blocks; the published window lies outside 3 steps
        layers = ["reference_layers=[2]", "target_layer=3"] if kind == "vit" else []
        out += [f"algorithms.magma.{o}" for o in layers] + ["algorithms.magma.weight={type: constant, value: 1.0}"]
    return out + [f"{k}={v}" for k, v in extra.items()]


class Losses(Callback):
    def __init__(self):
        self.rows = []

    def after_loss(self, state, logger):
        self.rows.append({k: float(v) for k, v in state.loss.items()})


@pytest.mark.parametrize("recipe", list(RECIPES), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_recipe_trains_a_few_steps(recipe, demo_mds):
    method, kind = RECIPES[recipe]
    cfg = load_config(recipe, tiny_overrides(recipe, demo_mds))
    trainer = build_trainer(cfg)
    losses = Losses()
    trainer.state.callbacks.append(losses)
    trainer.fit()
    model = trainer.state.model
    assert type(model).__name__ == {"simclr": "ComposerSimCLR", "vicreg": "ComposerVICReg"}[method]
    assert (type(model.encoder).__name__ == "VisionTransformer") == (kind == "vit")
    magma = "magma" in cfg.algorithms
    assert len(losses.rows) == 3
    for row in losses.rows:
        assert set(row) == LOSS_KEYS[method] | ({"magma"} if magma else set())
        assert all(math.isfinite(v) for v in row.values())
    logged = next(d for d in trainer.logger.destinations if type(d).__name__ == "InMemoryLogger").data
    if magma:  # MAGMA's own log: its term, weight and gamma every step
        assert len(logged["magma/term"]) == 3 and all(v > 0 for _, v in logged["magma/term"])
        assert [v for _, v in logged["magma/weight"]] == [1.0, 1.0, 1.0]
    else:
        assert not any(key.startswith("magma/") for key in logged)
    knn = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "KNNMonitor")
    assert [label for label, _ in knn.history] == ["init", "final"]
    trainer.close()


def test_lars_is_the_recipes_optimizer(demo_mds):
    from timm.optim import Lars

    recipe = CIFAR / "m-simclr-vit-tiny.yaml"
    trainer = build_trainer(load_config(recipe, tiny_overrides(recipe, demo_mds)))
    (optimizer,) = trainer.state.optimizers
    assert isinstance(optimizer, Lars)
    adapted, plain = optimizer.param_groups
    assert (
        adapted["initial_lr"] == pytest.approx(0.4 * 16 / 256)
        and adapted["trust_coeff"] == 0.02
        and adapted["trust_clip"]
    )
    assert adapted["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0 and not plain["always_adapt"]
    trainer.close()


# ---------------------------------------------------------------------------------------------------- resumption


def ssl_recipe(data, method: str = "simclr", **overrides) -> dict:
    model = {"name": method, "encoder": TINY_VIT, "img_size": 32, "patch_size": 8, "proj_hidden_dim": 32}
    model["proj_output_dim"] = 16 if method == "simclr" else 32
    recipe = tiny_recipe(data, model=model, optimizer={"name": "lars", "base_lr": 0.3, "trust_coefficient": 0.02})
    recipe["train_data"]["views"] = method
    recipe.update(overrides)
    return recipe


def test_two_view_run_resumes_bit_identically(demo_mds, tmp_path):
    """A SimCLR + MAGMA run stopped mid-epoch and resumed from its checkpoint sees the same views (augmentations drawn
    per sample) and has the same loss terms, bit for bit, as an uninterrupted run; LARS's momentum is restored."""
    common = dict(
        scheduler={"warmup": "0ba", "alpha_f": 1.0},  # constant lr: the schedule does not depend on max_duration
        algorithms={"magma": {"reference_layers": [1], "target_layer": 3, "weight": 1.0}},
        seed=11,
    )
    full = fit(ssl_recipe(demo_mds, max_duration="13ba", **common))
    ckpt = tmp_path / "ckpt"
    first = fit(ssl_recipe(demo_mds, max_duration="6ba", save_folder=str(ckpt), save_interval="6ba", **common))
    (checkpoint,) = ckpt.glob("ep0-ba6-rank0.pt")
    second = fit(ssl_recipe(demo_mds, max_duration="13ba", load_path=str(checkpoint), **common))

    assert [r["batch"] for r in first.rows + second.rows] == list(range(13))
    assert first.rows == full.rows[:6]
    for resumed, reference in zip(second.rows, full.rows[6:], strict=True):
        assert resumed["samples"] == reference["samples"]
        assert resumed["loss"] == reference["loss"]
    assert set(second.rows[0]["loss"]) == {"simclr", "magma"}
    # two views per sample, and they differ (two draws of the augmentation)
    assert all(len(views) == 2 and views[0] != views[1] for _, views in full.rows[0]["samples"])


# ---------------------------------------------------------------------------------------------------- MAGMA's gradient
def hand_magma(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """MAGMA's term written out from docs/algorithms.md §1 (rbf_scale 1, gamma from the data)."""
    b = x.shape[0]
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    off = ~torch.eye(b, dtype=torch.bool)
    d2 = d2 * off
    values = d2[off]
    gamma = values[values != 0].std()  # unbiased
    w = torch.exp(-d2 / gamma) * off
    s = 1.0 / torch.sqrt(w.sum(1) + eps)
    lap = torch.eye(b) - s[:, None] * w * s[None, :]
    return (y * (lap @ y)).sum() / b**2


def hand_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2B projections: each one's positive is its other view, the other 2B - 2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    positive = torch.cat([torch.arange(n // 2, n), torch.arange(0, n // 2)])
    return F.cross_entropy(sim, positive)


def test_magma_gradient_on_simclr_equals_a_hand_computation_through_the_first_view():
    """One Trainer step of ComposerSimCLR + MAGMA (reference block 1, target block 3, lambda 0.7): the gradients equal
    autograd through a hand computation of NT-Xent + 0.7 R(X, Y) where X and Y are the mean patch tokens of the FIRST
    view's blocks (view 2 enters the contrastive loss only)."""
    from composer import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from magma_composer.algorithms.magma import MAGMA
    from magma_composer.models.simclr import ComposerSimCLR

    torch.manual_seed(0)
    model = ComposerSimCLR(TINY_VIT, img_size=32, patch_size=8, proj_hidden_dim=32, proj_output_dim=16)
    reference = copy.deepcopy(model)
    views = torch.randn(12, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(views, torch.zeros(12, dtype=torch.long)), batch_size=12)

    grads = {}

    class Grab(Callback):
        def after_backward(self, state, logger):
            grads.update({n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None})
            self.loss = {k: float(v) for k, v in state.loss.items()}

    grab = Grab()
    magma = MAGMA(reference_layers=[1], target_layer=3, weight=0.7)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="1ba", algorithms=[magma], callbacks=[grab],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.0), device="cpu", progress_bar=False,
                      seed=0)  # fmt: skip
    trainer.fit()

    # by hand: hooks on the copy's blocks 1 and 3, view 1 encoded with them on, view 2 without
    outputs = {}
    vit = reference.encoder
    hooks = [vit.blocks[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)) for i in (1, 3)]
    h1 = reference.represent(views[:, 0])
    for hook in hooks:
        hook.remove()
    h2 = reference.represent(views[:, 1])
    x = outputs[1][:, vit.num_prefix_tokens :].mean(1)  # CLS excluded
    y = outputs[3][:, vit.num_prefix_tokens :].mean(1)
    contrastive = hand_nt_xent(reference.projector(h1), reference.projector(h2), temperature=0.2)
    term = hand_magma(x, y)
    (contrastive + 0.7 * term).backward()

    assert grab.loss["simclr"] == pytest.approx(float(contrastive), rel=1e-5)
    assert grab.loss["magma"] == pytest.approx(0.7 * float(term), rel=1e-5)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # the term through view 2 would be another gradient: MAGMA really read view 1
    outputs.clear()
    hooks = [vit.blocks[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)) for i in (1, 3)]
    reference.represent(views[:, 1])
    for hook in hooks:
        hook.remove()
    other = hand_magma(outputs[1][:, 1:].mean(1), outputs[3][:, 1:].mean(1))
    assert abs(float(other) - float(term)) > 1e-4 * abs(float(term))


# ---------------------------------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def ssl_checkpoints(tmp_path_factory, demo_mds):
    """A tiny SimCLR ViT and a VICReg ResNet-18, each trained 3 steps with a kNN monitor; their checkpoints."""
    out = {}
    for method, encoder in (("simclr", TINY_VIT), ("vicreg", "resnet18")):
        folder = tmp_path_factory.mktemp(method)
        recipe = ssl_recipe(demo_mds, method, max_duration="3ba", save_folder=str(folder), save_interval="3ba",
                            eval_data={"remote": str(demo_mds), "split": "test", "batch_size": 40, "num_workers": 0},
                            callbacks={"knn_monitor": {"k": [5], "pool": "mean"}})  # fmt: skip
        recipe["model"]["encoder"] = encoder
        if encoder == "resnet18":
            del recipe["model"]["patch_size"]
        trainer = build_trainer(validate(recipe))
        trainer.fit()
        knn = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == "KNNMonitor")
        out[method] = (folder / "ep0-ba3-rank0.pt", knn.history[-1][1][5], trainer.state.model)
        trainer.close()
    return out


def evaluate_knn(checkpoint, data, *extra):
    return run_module(
        "magma_composer.evaluate",
        "knn",
        "yamls/eval/knn.yaml",
        f"encoder.path={checkpoint}",
        f"train_data.remote={data}",
        f"test_data.remote={data}",
        "train_data.num_workers=0",
        "test_data.num_workers=0",
        "knn.k=[5]",
        "knn.temperature=[0.07]",
        "knn.distance=[cosine]",
        "features.cache=false",
        "output=null",
        "progress_bar=false",
        *extra,
    )


@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_checkpoint_evaluated_with_the_knn_command(method, ssl_checkpoints, demo_mds):
    """The evaluation command reads a SimCLR (ViT) and a VICReg (ResNet-18) checkpoint and gives exactly the kNN top-1
    the run's own monitor measured on the same images with the same features (mean pooling; a CNN's pooled output)."""
    checkpoint, monitor_top1, _ = ssl_checkpoints[method]
    proc = evaluate_knn(checkpoint, demo_mds, "features.pool=mean")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("knn: top-1"))
    assert float(line.split()[2]) == pytest.approx(monitor_top1, abs=1e-9)


def test_cls_features_of_a_cnn_are_a_clear_error(ssl_checkpoints, demo_mds):
    proc = evaluate_knn(ssl_checkpoints["vicreg"][0], demo_mds)  # the shipped knn.yaml pools the CLS token
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "features.pool: 'cls' needs a ViT's CLS token; this encoder (ResNet) has none: set pool: mean" in proc.stderr


def test_linear_probe_command_on_a_cnn_checkpoint(ssl_checkpoints, demo_mds):
    checkpoint = ssl_checkpoints["vicreg"][0]
    common = [
        f"encoder.path={checkpoint}",
        f"train_data.remote={demo_mds}",
        f"test_data.remote={demo_mds}",
        "train_data.num_workers=0",
        "test_data.num_workers=0",
        "train_data.batch_size=32",
        "max_duration=1ep",
        "scheduler.warmup=0ba",
        "output=null",
        "progress_bar=false",
    ]
    proc = run_module("magma_composer.evaluate", "linear", "yamls/eval/linear-pmae.yaml", *common, "model.pool=mean")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(x.startswith("linear: top-1") for x in proc.stdout.splitlines())
    proc = run_module("magma_composer.evaluate", "linear", "yamls/eval/linear-pmae.yaml", *common)
    assert proc.returncode == 2 and "model.pool: 'cls' needs a ViT's CLS token; the ResNet encoder has none" in (
        proc.stderr
    )


def test_export_encoder_of_two_view_models(demo_mds, tmp_path):
    """A SimCLR run exports its encoder, ViT or CNN, which the evaluation reads back with the run's features."""
    from magma_composer.evaluate.encoders import load_encoder
    from magma_composer.evaluate.features import encode
    from magma_composer.precision import cpu_autocast

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for encoder in (TINY_VIT, "resnet18"):
        path = tmp_path / f"{'vit' if encoder is TINY_VIT else 'cnn'}.pt"
        recipe = ssl_recipe(demo_mds, max_duration="2ba", export_encoder=str(path))
        recipe["model"]["encoder"] = encoder
        if encoder == "resnet18":
            del recipe["model"]["patch_size"]
        recipe_file = tmp_path / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump(recipe))
        trainer = main([str(recipe_file)])
        model = trainer.state.model.eval()
        cpu_autocast(model, "fp32")  # compare with the float32 evaluation path below
        loaded = load_encoder(str(path))
        assert loaded.kind == ("vit" if encoder is TINY_VIT else "cnn")
        pool = "cls" if encoder is TINY_VIT else "mean"
        with torch.no_grad():
            torch.testing.assert_close(encode(loaded.net, images, pool), model.extract_features(images, pool=pool))
        trainer.close()


# ---------------------------------------------------------------------------------------------------- the recipes
@pytest.mark.parametrize("recipe", [p for p in RECIPES if not p.stem.startswith("m-")], ids=lambda p: p.stem)
def test_recipes_carry_solo_learns_settings(recipe):
    method, kind = RECIPES[recipe]
    cfg = load_config(recipe)
    cifar = recipe.parent.name == "cifar10"
    o = cfg.optimizer
    assert o["name"] == "lars" and o["momentum"] == 0.9 and o["weight_decay"] == 1e-4
    assert o["trust_coefficient"] == 0.02 and o["trust_clip"] is True and "lr" not in o
    assert o["base_lr"] == (0.4 if cifar and method == "simclr" else 0.3)
    assert o.get("no_decay_norm_bias", True) is True  # solo-learn's exclude_bias_n_norm
    assert cfg.scheduler == {"warmup": "10ep"} and cfg.max_duration == ("1000ep" if cifar else "400ep")
    assert cfg.train_data["batch_size"] == 256 and cfg.device_train_microbatch_size == 256
    m = cfg.model
    assert m["name"] == method and m["img_size"] == (32 if cifar else 224) and m["gather"] is True
    if kind == "vit":
        assert (m["encoder"], m["patch_size"]) == (
            ("vit_tiny_patch16_224", 4) if cifar else ("vit_small_patch16_224", 16)
        )
    else:
        assert m["encoder"] == "resnet50" and "patch_size" not in m
    if method == "simclr":
        assert m["temperature"] == 0.2
        assert (m["proj_hidden_dim"], m["proj_output_dim"]) == ((2048, 256) if cifar else (4096, 512))
    else:
        assert (m["proj_hidden_dim"], m["proj_output_dim"]) == (2048, 2048)
        assert (m["sim_weight"], m["var_weight"], m["cov_weight"]) == (25.0, 25.0, 1.0)
    views = cfg.train_data["views"]
    if method == "simclr":
        assert views == ({"preset": "simclr", "jitter": [0.8, 0.8, 0.8, 0.2], "blur_prob": 0.5} if cifar else "simclr")
    else:
        assert views == {"preset": "vicreg", "crop_scale": [0.2, 1.0], "blur_prob": 0.0 if cifar else 0.5,
                         "solarize_prob": 0.1}  # fmt: skip
    assert cfg.eval_data["split"] == ("test" if cifar else "val")


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.stem.startswith("m-")], ids=lambda p: p.stem)
def test_m_recipes_are_their_base_plus_magma(recipe):
    method, kind = RECIPES[recipe]
    cfg = load_config(recipe)
    base = load_config(recipe.parent / recipe.name.removeprefix("m-"))
    for key in ("model", "train_data", "eval_data", "optimizer", "scheduler", "max_duration", "callbacks"):
        assert getattr(cfg, key) == getattr(base, key), key
    assert list(cfg.algorithms) == ["magma"] and not base.algorithms
    magma = cfg.algorithms["magma"]
    if kind == "vit":
        assert (magma["reference_layers"], magma["target_layer"]) == ([10], 11)
    else:
        assert (magma["reference_layers"], magma["target_layer"]) == (["layer3"], "layer4")
    cifar = recipe.parent.name == "cifar10"
    window = ("0.025dur", "0.275dur") if cifar else ("10ep", "110ep")
    assert magma["weight"] == {"type": "warmup", "start": window[0], "end": window[1], "value": 1.0}


# ---------------------------------------------------------------------------------------------------- bad input
def base_ssl(**overrides) -> dict:
    return ssl_recipe("/nonexistent/data", **overrides)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda r: r["model"].update(name="byol"),
            "model.name: unknown model 'byol'; valid names are: mae, simclr, vicreg",
        ),
        (lambda r: r["model"].update(name=3), "model.name: unknown model 3; valid names are"),
        (
            lambda r: r["model"].update(mask_ratio=0.5),
            r"unknown key 'model.mask_ratio'; valid keys of model \(ComposerSimCLR\)",
        ),
        (
            lambda r: r["model"].update(name="vicreg", temperature=0.1),
            r"unknown key 'model.temperature'.*\(ComposerVICReg\)",
        ),
        (lambda r: r["model"].update(temperature="hot"), "model.temperature: expected float"),
        (lambda r: r["train_data"].pop("views"), "train_data.views: model 'simclr' .ComposerSimCLR. trains on two"),
        (
            lambda r: r.update(model={"encoder": TINY_VIT, "img_size": 32}),
            "train_data.views: model 'mae' .ComposerMAE. takes one",
        ),
        (
            lambda r: r.update(callbacks={"reconstruction_images": {}}),
            "callbacks.reconstruction_images: model 'simclr'",
        ),
        (lambda r: r.update(device_train_microbatch_size=8), "device_train_microbatch_size: 8, but the loss of model"),
        (lambda r: r.update(device_train_microbatch_size="auto"), "device_train_microbatch_size: 'auto', but the loss"),
    ],
)
def test_recipe_errors_before_anything_is_built(mutate, message):
    recipe = base_ssl()
    mutate(recipe)
    with pytest.raises(ConfigError, match=message):
        validate(recipe)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name=byol", "model.name: unknown model 'byol'; valid names are: mae, simclr, vicreg"),
        ("model.patch_size=5", "model.patch_size: 5 does not divide img_size 32"),
        ("model.temperature=0", "model.temperature: must be > 0.0"),
        ("train_data.views=moco", "train_data.views"),
        ("optimizer.name=sgd", "optimizer.name: 'sgd' is not valid; choose one of 'adamw', 'lars'"),
        ("optimizer.betas=[0.9, 0.99]", "optimizer.betas: applies to name: adamw only, but name is 'lars'"),
        ("optimizer.trust_coefficient=-1", "optimizer.trust_coefficient: must be > 0.0"),
        ("algorithms.magma.reference_layers=[layer3]", "algorithms.magma"),
    ],
)
def test_cli_errors_exit_2_with_the_key_path(override, message, demo_mds, tmp_path, capsys):
    recipe = ssl_recipe(demo_mds, algorithms={"magma": {"reference_layers": [1], "target_layer": 3}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as exc:
        main([str(path), override])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("magma_composer.train: error: ") and message in line, line


def test_classifier_on_a_cnn_encoder():
    """The supervised protocols' classifier takes a CNN: its pooled output under the head, BatchNorm frozen with the
    encoder; what only a ViT has is refused by name."""
    import timm

    from magma_composer.evaluate.classifier import EncoderClassifier
    from magma_composer.options import OptionError

    torch.manual_seed(0)
    cnn = timm.create_model("resnet18", num_classes=0)
    probe = EncoderClassifier(cnn, num_classes=10, pool="mean")
    probe.train()
    assert not cnn.training  # a frozen encoder keeps its running statistics
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = cnn(x)
    torch.testing.assert_close(probe.features(x), expected)
    assert probe.head[-1].in_features == 512 and probe((x, torch.zeros(4, dtype=torch.long))).shape == (4, 10)
    for options, message in (
        ({"pool": "cls"}, "pool: 'cls' needs a ViT's CLS token; the ResNet encoder has none: set pool: mean"),
        ({"pool": "mean", "fc_norm": True}, "fc_norm: replaces a ViT's final norm; the ResNet encoder has none"),
        ({"pool": "mean", "drop_path": 0.1, "freeze_encoder": False}, "drop_path: sets a ViT's stochastic depth"),
    ):
        with pytest.raises(OptionError, match=message):
            EncoderClassifier(timm.create_model("resnet18", num_classes=0), num_classes=10, **options)
    with pytest.raises(OptionError, match="expected a headless encoder"):
        EncoderClassifier(timm.create_model("resnet18", num_classes=5), num_classes=10, pool="mean")


def test_online_probe_reads_the_first_view_of_two_view_batches(demo_mds):
    """The online probe trains on view 1 of a two-view run (the view the regularisers read) and reports accuracy."""
    recipe = ssl_recipe(
        demo_mds,
        max_duration="4ba",
        callbacks={"online_probe": {"num_classes": 10, "interval": "2ba"}},
        loggers={"in_memory": {}},
        eval_data={"remote": str(demo_mds), "split": "test", "batch_size": 40, "num_workers": 0},
        eval_interval="4ba",
    )
    trainer = build_trainer(validate(recipe))
    seen = []
    probe = next(c for c in trainer.state.callbacks if type(c).__name__ == "OnlineLinearProbe")
    original = probe._features

    def spy(state, images, device):
        if len(images) == 16:  # a training batch (the test loader's batches hold 40)
            seen.append((tuple(images.shape), images.clone(), state.batch[0][:, 0].clone()))
        return original(state, images, device)

    probe._features = spy
    trainer.fit()
    logged = next(d for d in trainer.logger.destinations if type(d).__name__ == "InMemoryLogger").data
    trainer.close()
    assert len(seen) == 4
    for shape, images, first_view in seen:
        assert shape[1:] == (3, 32, 32)
        assert torch.equal(images, first_view)
    assert {"online_probe/train_top1", "online_probe/test_top1"} <= set(logged), sorted(logged)
