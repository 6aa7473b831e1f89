"""ComposerSimCLR and ComposerVICReg on a tiny ViT and on timm's resnet18 at 32 px: forward, loss, gradients, taps,
features, checkpoints' extra state, options, evaluation, and real Composer Trainer runs on two-view batches."""

from __future__ import annotations

import math

import pytest
import torch
from composer import Callback
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.algorithms.magma import MAGMA, magma_loss
from magma_composer.losses import nt_xent_loss, vicreg_loss
from magma_composer.models.simclr import ComposerSimCLR
from magma_composer.models.taps import get_feature_tap
from magma_composer.models.two_view import build_backbone
from magma_composer.models.vicreg import ComposerVICReg
from magma_composer.options import OptionError
from tests.conftest import quick_trainer

VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
SMALL_HEAD = {"proj_hidden_dim": 64, "proj_output_dim": 32}
MODELS = [
    ("simclr", "vit"),
    ("simclr", "resnet18"),
    ("simclr", "resnet18-cifar"),
    ("vicreg", "vit"),
    ("vicreg", "resnet18"),
]


def make(method: str, encoder: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    cls = ComposerSimCLR if method == "simclr" else ComposerVICReg
    options = {**SMALL_HEAD, **kwargs}
    if encoder == "vit":
        return cls(VIT, img_size=32, patch_size=8, **options)
    return cls("resnet18", img_size=32, cifar_stem=encoder.endswith("-cifar"), **options)


def two_views(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, 3, 32, 32, generator=g), torch.zeros(b, dtype=torch.long)


# ---------------------------------------------------------------------- forward, loss, gradients
@pytest.mark.parametrize("method,encoder", MODELS)
def test_loss_is_the_functional_loss_of_the_projected_views(method, encoder):
    model = make(method, encoder)
    batch = two_views()
    outputs = model(batch)
    losses = model.loss(outputs, batch)
    # the same computation by hand: each view through the encoder and the head, then the functional loss
    z1 = model.projector(model.encoder(batch[0][:, 0]))
    z2 = model.projector(model.encoder(batch[0][:, 1]))
    torch.testing.assert_close(outputs["z1"], z1)
    torch.testing.assert_close(outputs["z2"], z2)
    width = 32 if encoder == "vit" else 512
    assert outputs["h1"].shape == outputs["h2"].shape == (4, width)
    assert z1.shape == (4, SMALL_HEAD["proj_output_dim"])
    if method == "simclr":
        assert list(losses) == ["simclr"]
        torch.testing.assert_close(losses["simclr"], nt_xent_loss(z1, z2, 0.2))
    else:
        assert list(losses) == ["vicreg_invariance", "vicreg_variance", "vicreg_covariance"]
        total, parts = vicreg_loss(z1, z2)
        torch.testing.assert_close(losses["vicreg_invariance"], 25.0 * parts["invariance"])
        torch.testing.assert_close(losses["vicreg_variance"], 25.0 * parts["variance"])
        torch.testing.assert_close(losses["vicreg_covariance"], parts["covariance"])
        torch.testing.assert_close(sum(losses.values()), total)


@pytest.mark.parametrize("method,encoder", MODELS)
def test_backward_reaches_every_encoder_parameter(method, encoder):
    model = make(method, encoder)
    batch = two_views()
    sum(model.loss(model(batch), batch).values()).backward()
    missing = [n for n, p in model.encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    first = model.encoder.patch_embed.proj.weight if encoder == "vit" else model.encoder.conv1.weight
    assert first.grad.abs().sum() > 0
    assert model.projector[0].weight.grad.abs().sum() > 0


def test_simclr_authors_head_with_batch_norm():
    model = make("simclr", "vit", projector_bn=True)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert model.projector[0].bias is None and model.projector[3].bias is None
    assert not model.projector[4].bias.requires_grad  # the output BN learns a scale only
    batch = two_views()
    model.loss(model(batch), batch)["simclr"].backward()
    assert model.projector[4].weight.grad.abs().sum() > 0 and model.projector[4].bias.grad is None


def test_vicreg_expander_is_three_layers_with_bn_and_relu():
    model = make("vicreg", "vit")
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [64, 64, 32]
    assert model.projector[-1].bias is None
    defaults = ComposerVICReg(VIT, img_size=32, patch_size=8)  # the paper's 8192-8192-8192
    assert [m.out_features for m in defaults.projector if isinstance(m, torch.nn.Linear)] == [8192] * 3


# ---------------------------------------------------------------------- the tap reads view 1 only
@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_feature_tap_records_the_first_view_only(method):
    model = make(method, "vit")
    tap = get_feature_tap(model)
    tap.request_blocks([0])
    tap.request_cls()
    batch = two_views()
    try:
        tap.arm()
        outputs = model(batch)
        tap.disarm()
        blocks, cls = tap.block_features(0), tap.final_cls()
    finally:
        tap.remove()
    assert len(blocks) == 1 and len(cls) == 1
    vit = model.encoder
    with torch.no_grad():
        view1 = batch[0][:, 0]
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(view1))))
        expected = vit.blocks[0](x)[:, vit.num_prefix_tokens :].mean(dim=1)
    torch.testing.assert_close(blocks[0].detach(), expected)
    torch.testing.assert_close(cls[0].detach(), outputs["h1"].detach())
    assert not torch.allclose(cls[0].detach(), outputs["h2"].detach())


# ---------------------------------------------------------------------- batches
@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_single_view_batch_says_to_set_views(method):
    model = make(method, "vit")
    images = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match=f"set train_data.views: {method} in the recipe"):
        model((images, torch.zeros(4)))


def test_other_view_counts_and_batch_types_are_refused():
    model = make("simclr", "vit")
    with pytest.raises(ValueError, match=r"B x 2 x C x S x S .* got shape \(4, 3, 3, 32, 32\)"):
        model((torch.randn(4, 3, 3, 32, 32), torch.zeros(4)))
    with pytest.raises(TypeError, match="expected \\(views, labels"):
        model({"image": torch.randn(4, 2, 3, 32, 32)})
    # (views, labels, indices) batches are fine, and so is a bare tensor
    views, labels = two_views()
    a = model((views, labels, torch.arange(4)))["z1"]
    torch.testing.assert_close(model(views)["z1"], a)


# ---------------------------------------------------------------------- features
def test_vit_features_cls_and_mean():
    model = make("simclr", "vit").eval()
    images = torch.randn(5, 3, 32, 32)
    cls, mean = model.extract_features(images), model.extract_features(images, pool="mean")
    assert cls.shape == mean.shape == (5, 32)
    tokens = model.encoder.forward_features(images)
    torch.testing.assert_close(cls, model.represent(images).detach())  # the training representation
    torch.testing.assert_close(model.extract_features(images, pool="cls"), cls)
    torch.testing.assert_close(mean, tokens[:, 1:].mean(dim=1).detach())
    assert not torch.allclose(cls, mean)
    assert not cls.requires_grad


@pytest.mark.parametrize("encoder", ["resnet18", "resnet18-cifar"])
def test_cnn_features_are_the_pooled_output_and_cls_is_refused(encoder):
    model = make("vicreg", encoder).eval()
    images = torch.randn(3, 3, 32, 32)
    features = model.extract_features(images)
    assert features.shape == (3, 512)
    torch.testing.assert_close(model.extract_features(images, pool="mean"), features)
    pooled = model.encoder.forward_features(images).mean(dim=(2, 3))
    torch.testing.assert_close(features, pooled.detach())
    with pytest.raises(OptionError, match="has none: use pool: mean") as info:
        model.extract_features(images, pool="cls")
    assert info.value.key == "pool"
    with pytest.raises(OptionError, match="'max' is not valid"):
        model.extract_features(images, pool="max")
    assert model.prepare_images(images) is images


def test_cifar_stem_keeps_32_px_maps():
    plain, _ = build_backbone("resnet18", img_size=32)
    cifar, width = build_backbone("resnet18", img_size=32, cifar_stem=True)
    assert width == 512
    conv = cifar.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    cifar.eval(), plain.eval()
    assert cifar.forward_features(x).shape[-2:] == (4, 4)  # stride 8 over the four stages
    assert plain.forward_features(x).shape[-2:] == (1, 1)  # stride 32


def test_vit_patch_size_defaults_to_the_name():
    vit, width = build_backbone("vit_tiny_patch16_224", img_size=48)
    assert width == 192 and vit.patch_embed.patch_size == (16, 16) and vit.patch_embed.grid_size == (3, 3)
    vit, _ = build_backbone(VIT, img_size=32)
    assert vit.patch_embed.patch_size == (16, 16)


# ---------------------------------------------------------------------- extra state
@pytest.mark.parametrize("method,encoder", [("simclr", "vit"), ("vicreg", "resnet18-cifar")])
def test_extra_state_round_trip(method, encoder):
    source = make(method, encoder, seed=1)
    state = source.state_dict()
    extra = state["_extra_state"]
    assert extra["method"] == method
    if encoder == "vit":
        assert extra["encoder"] == {
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "patch_size": 8,
            "img_size": 32,
            "in_chans": 3,
            "mlp_ratio": 4.0,
            "qkv_bias": True,
        }
    else:
        assert extra["encoder"] == {"timm_model": "resnet18", "in_chans": 3, "img_size": 32, "cifar_stem": True}
    target = make(method, encoder, seed=2)
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(target.eval().extract_features(images), source.eval().extract_features(images))
    target.load_state_dict(state)
    torch.testing.assert_close(target.eval().extract_features(images), source.eval().extract_features(images))


def test_extra_state_refuses_another_architecture_or_method():
    state = make("simclr", "vit").state_dict()
    other_heads = ComposerSimCLR({**VIT, "num_heads": 4}, img_size=32, patch_size=8, **SMALL_HEAD)
    with pytest.raises(ValueError, match=r"num_heads 2 \(this model: 4\)"):
        other_heads.load_state_dict(state)
    with pytest.raises(ValueError, match="is a 'simclr' model, this one is 'vicreg'"):
        make("vicreg", "vit").load_state_dict(state)
    cnn_state = make("simclr", "resnet18-cifar").state_dict()
    with pytest.raises(ValueError, match=r"cifar_stem True \(this model: False\)"):
        make("simclr", "resnet18").load_state_dict(cnn_state)


# ---------------------------------------------------------------------- options
def _vit(**kwargs):
    return {"encoder": VIT, "img_size": 32, "patch_size": 8, **SMALL_HEAD, **kwargs}


BAD_OPTIONS = [
    (ComposerSimCLR, {"encoder": "resnet18", "img_size": 32, "patch_size": 8}, "patch_size", "ViT encoders only"),
    (ComposerSimCLR, _vit(cifar_stem=True), "cifar_stem", "timm ResNet only"),
    (ComposerSimCLR, {"encoder": "resnet18d", "img_size": 32, "cifar_stem": True}, "cifar_stem", "deep-stem"),
    (ComposerSimCLR, {"encoder": "not_a_model_name"}, "encoder", "not a timm model name"),
    (ComposerSimCLR, {"encoder": 3}, "encoder", "mapping of ViT sizes"),
    (ComposerSimCLR, {"encoder": {"embed_dim": 32}}, "encoder.depth", "missing"),
    (ComposerSimCLR, _vit(patch_size=5), "patch_size", "does not divide img_size 32"),
    (ComposerSimCLR, _vit(img_size=0), "img_size", ">= 1"),
    (ComposerSimCLR, _vit(temperature=0.0), "temperature", "> 0"),
    (ComposerSimCLR, _vit(proj_hidden_dim=0), "proj_hidden_dim", ">= 1"),
    (ComposerSimCLR, _vit(proj_output_dim=2.0), "proj_output_dim", "integer"),
    (ComposerSimCLR, _vit(projector_bn=1), "projector_bn", "true or false"),
    (ComposerSimCLR, _vit(gather="yes"), "gather", "true or false"),
    (ComposerVICReg, _vit(var_weight=-1.0), "var_weight", ">= 0"),
    (ComposerVICReg, _vit(sim_weight=float("nan")), "sim_weight", "finite"),
    (ComposerVICReg, _vit(eps=0.0), "eps", "> 0"),
    (ComposerVICReg, _vit(in_chans=0), "in_chans", ">= 1"),
]


@pytest.mark.parametrize("cls,kwargs,key,words", BAD_OPTIONS)
def test_bad_options_name_the_option(cls, kwargs, key, words):
    with pytest.raises(OptionError, match=words) as info:
        cls(**kwargs)
    assert info.value.key == key


# ---------------------------------------------------------------------- evaluation
def test_eval_metrics_on_single_and_two_view_batches():
    model = make("vicreg", "vit").eval()
    assert sorted(model.get_metrics(is_train=False)) == [
        "VICRegCovariance",
        "VICRegInvariance",
        "VICRegLoss",
        "VICRegVariance",
    ]
    assert model.get_metrics(is_train=True) == {}
    assert list(make("simclr", "vit").get_metrics()) == ["SimCLRLoss"]
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        single = model.eval_forward((images, torch.zeros(6)))
        z = model.projector(model.encoder(images))
        total, parts = vicreg_loss(z, z)
        torch.testing.assert_close(single["figures"]["Loss"], total)
        assert single["figures"]["Invariance"].item() == 0.0  # identical views
        views = two_views(6)
        double = model.eval_forward(views)
        z1, z2 = (model.projector(model.encoder(views[0][:, i])) for i in (0, 1))
        torch.testing.assert_close(double["figures"]["Invariance"], vicreg_loss(z1, z2)[1]["invariance"])
        assert model.eval_forward(views, double) is double  # outputs given: passed through
        tiny = model.eval_forward((images[:1], torch.zeros(1)))  # the losses need 2 samples
    metrics = model.get_metrics()
    for metric in metrics.values():
        model.update_metric(None, single, metric)
        model.update_metric(None, tiny, metric)  # left out, not a crash
    expected = {"VICRegLoss": total, "VICRegInvariance": 0.0, "VICRegVariance": parts["variance"]}
    for name, value in expected.items():
        assert metrics[name].compute().item() == pytest.approx(float(value), rel=1e-6)


# ---------------------------------------------------------------------- Trainer runs
class _Record(Callback):
    def __init__(self):
        self.losses = []

    def before_backward(self, state, logger):
        self.losses.append({k: float(v) for k, v in state.loss.items()})


def _loaders(n_train: int = 12, n_eval: int = 5):
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(n_train, 2, 3, 32, 32, generator=g), torch.zeros(n_train, dtype=torch.long))
    evaluation = TensorDataset(torch.rand(n_eval, 3, 32, 32, generator=g), torch.zeros(n_eval, dtype=torch.long))
    # 5 evaluation images in batches of 2: the last batch holds one image
    return DataLoader(train, batch_size=4, drop_last=True), DataLoader(evaluation, batch_size=2)


@pytest.mark.parametrize(
    "method,encoder,keys,metric",
    [
        ("simclr", "vit", ["simclr"], "SimCLRLoss"),
        ("vicreg", "resnet18-cifar", ["vicreg_invariance", "vicreg_variance", "vicreg_covariance"], "VICRegLoss"),
    ],
)
def test_trainer_fits_on_two_view_batches_and_evaluates_single_views(method, encoder, keys, metric):
    model = make(method, encoder)
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    train, evaluation = _loaders()
    record = _Record()
    trainer, logger = quick_trainer(model, [], train, "3ba", [record], eval_dataloader=evaluation, eval_interval="3ba")
    trainer.fit()
    assert trainer.state.timestamp.batch.value == 3
    assert [sorted(r) for r in record.losses] == [sorted(keys)] * 3
    for key in keys:
        values = [float(v) for _, v in logger.data[f"loss/train/{key}"]]
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
    evaluated = [float(v) for _, v in logger.data[f"metrics/eval/{metric}"]]
    assert len(evaluated) == 1 and math.isfinite(evaluated[0])
    changed = [n for n, p in model.encoder.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) > len(before) // 2


def test_magma_on_simclr_reads_the_first_view():
    model = make("simclr", "vit")

    class Expected(Callback):
        def __init__(self):
            self.pairs = []

        def before_backward(self, state, logger):
            vit = state.model.encoder
            with torch.no_grad():
                x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(state.batch[0][:, 0]))))
                x0 = vit.blocks[0](x)
                x1 = vit.blocks[1](x0)
                means = [t[:, vit.num_prefix_tokens :].mean(dim=1) for t in (x0, x1)]
            self.pairs.append((float(state.loss["magma"]), float(magma_loss(means[0], means[1]))))

    probe = Expected()
    train, _ = _loaders(8)
    trainer, logger = quick_trainer(model, [MAGMA(reference_layers=[0], target_layer=1)], train, "2ba", [probe])
    trainer.fit()
    assert len(probe.pairs) == 2
    for got, expected in probe.pairs:
        assert got == pytest.approx(expected, rel=1e-5) and expected > 0
    assert len(logger.data["loss/train/magma"]) == 2 and len(logger.data["loss/train/simclr"]) == 2


# ---------------------------------------------------------------------- gather on two ranks
def _gather_rank(rank: int, world: int, port: int, out: str) -> None:
    import os
    from datetime import timedelta

    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # a deadline: a rank that fails must not leave the other waiting in a collective
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        model = make("simclr", "vit", gather=True)  # the same seed: the same weights on every rank
        views, labels = two_views(8)
        share = slice(rank * 4, (rank + 1) * 4)
        ddp = DistributedDataParallel(model)  # kept alive through backward: its reducer averages the gradients
        outputs = ddp((views[share], labels[share]))
        loss = model.loss(outputs, None)["simclr"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save({"loss": loss.item(), "grads": grads}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gather_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    # SimCLR on the ViT has no batch norm, so two ranks that gather see exactly the single-process batch
    from tests.conftest import free_port

    out = str(tmp_path / "rank")
    torch.multiprocessing.spawn(_gather_rank, args=(2, free_port(), out), nprocs=2, join=True)
    model = make("simclr", "vit")
    batch = two_views(8)
    loss = model.loss(model(batch), batch)["simclr"]
    loss.backward()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)  # every rank: the global loss
        for name, param in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    # without gathering, each rank's loss would have only its own 2 x 4 - 2 negatives
    local = make("simclr", "vit")
    half = (batch[0][:4], batch[1][:4])
    assert abs(local.loss(local(half), half)["simclr"].item() - loss.item()) > 1e-3


def test_magma_on_a_resnet_vicreg_reads_layer3_and_layer4_of_the_first_view():
    model = make("vicreg", "resnet18-cifar")

    class Expected(Callback):
        def __init__(self):
            self.pairs = []

        def before_backward(self, state, logger):
            net = state.model.encoder
            # BN in training mode normalises with the batch's statistics: the same view-1 batch gives the same maps
            with torch.no_grad():
                x = net.maxpool(net.act1(net.bn1(net.conv1(state.batch[0][:, 0]))))
                x3 = net.layer3(net.layer2(net.layer1(x)))
                x4 = net.layer4(x3)
            expected = magma_loss(x3.mean(dim=(2, 3)), x4.mean(dim=(2, 3)))
            self.pairs.append((float(state.loss["magma"]), float(expected)))

    probe = Expected()
    train, _ = _loaders(8)
    magma = MAGMA(reference_layers=["layer3"], target_layer="layer4")
    trainer, logger = quick_trainer(model, [magma], train, "2ba", [probe])
    trainer.fit()
    assert len(probe.pairs) == 2
    for got, expected in probe.pairs:
        assert got == pytest.approx(expected, rel=1e-4) and expected > 0
    assert len(logger.data["loss/train/vicreg_variance"]) == 2


@pytest.mark.parametrize("method", ["simclr", "vicreg"])
def test_trainer_on_the_streaming_two_view_data_set(demo_mds, method):
    from magma_composer.data.loader import build_image_dataloader

    common = {"remote": str(demo_mds), "image_size": 32, "num_workers": 0}
    train = build_image_dataloader(8, split="train", views=method, max_samples=32, **common)
    evaluation = build_image_dataloader(8, split="test", train=False, max_samples=16, **common)
    views, labels = next(iter(train))
    assert views.shape == (8, 2, 3, 32, 32) and labels.shape == (8,)
    assert not torch.equal(views[:, 0], views[:, 1])  # two different augmentations of each image
    model = make(method, "vit")
    metric = "SimCLRLoss" if method == "simclr" else "VICRegLoss"
    trainer, logger = quick_trainer(model, [], train, "2ba", eval_dataloader=evaluation, eval_interval="2ba")
    trainer.fit()
    loss_key = "loss/train/simclr" if method == "simclr" else "loss/train/vicreg_covariance"
    assert len(logger.data[loss_key]) == 2 and all(math.isfinite(float(v)) for _, v in logger.data[loss_key])
    assert math.isfinite(float(logger.data[f"metrics/eval/{metric}"][-1][1]))
