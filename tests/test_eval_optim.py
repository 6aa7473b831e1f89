"""Layer-wise decay groups against a hand computation; the SGD / LARS / AdamW builder and its checks."""

from __future__ import annotations

import pytest
import torch
from timm.optim import Lars

from magma_composer.evaluate.classifier import EncoderClassifier
from magma_composer.evaluate.optim import build_eval_optimizer, layer_decay_groups
from magma_composer.models import ComposerMAE
from magma_composer.options import OptionError
from tests.conftest import TINY_MODEL


def classifier(**options) -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(ComposerMAE(**TINY_MODEL, mask_seed=0).encoder, num_classes=10, **options)


def hand_layer(name: str) -> int:
    """The MAE/BEiT rule written out for the tiny ViT (depth 4): 0 embeddings, 1..4 blocks, 5 the rest."""
    if name in ("encoder.cls_token", "encoder.pos_embed") or name.startswith("encoder.patch_embed."):
        return 0
    for i in range(4):
        if name.startswith(f"encoder.blocks.{i}."):
            return i + 1
    return 5


def test_layer_decay_groups_against_a_hand_computation():
    model = classifier(freeze_encoder=False, pool="mean", fc_norm=True)
    groups = layer_decay_groups(model.named_parameters(), depth=4, weight_decay=0.05, layer_decay=0.5)
    found = {}
    for group in groups:
        for name, param in zip(group["names"], group["params"]):
            assert name not in found
            found[name] = (group["layer"], group["lr_scale"], group["weight_decay"])
            assert param is dict(model.named_parameters())[name]
    assert set(found) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, (layer, scale, wd) in found.items():
        assert layer == hand_layer(name), name
        assert scale == pytest.approx(0.5 ** (5 - layer)), name
        matrix = name.endswith(".weight") and dict(model.named_parameters())[name].ndim > 1
        assert wd == (0.05 if matrix else 0.0), name
    # spot checks, spelled out
    assert found["encoder.patch_embed.proj.weight"] == (0, 0.5**5, 0.05)
    assert found["encoder.cls_token"] == (0, 0.5**5, 0.0)
    assert found["encoder.pos_embed"] == (0, 0.5**5, 0.0)
    assert found["encoder.blocks.0.attn.qkv.weight"] == (1, 0.5**4, 0.05)
    assert found["encoder.blocks.3.mlp.fc2.bias"] == (4, 0.5, 0.0)
    assert found["encoder.blocks.2.norm1.weight"] == (3, 0.25, 0.0)
    assert found["fc_norm.weight"] == (5, 1.0, 0.0)
    assert found["head.0.weight"] == (5, 1.0, 0.05)
    assert found["head.0.bias"] == (5, 1.0, 0.0)


def test_groups_without_layer_decay_and_with_a_frozen_encoder():
    model = classifier(freeze_encoder=False)
    groups = layer_decay_groups(model.named_parameters(), depth=4, weight_decay=0.1)
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]
    frozen = classifier(batch_norm=True)  # the BatchNorm has no affine parameters
    groups = layer_decay_groups(frozen.named_parameters(), depth=4, weight_decay=0.1)
    assert sorted(n for g in groups for n in g["names"]) == ["head.1.bias", "head.1.weight"]


def test_adamw_learning_rates_follow_the_layers_and_the_batch():
    model = classifier(freeze_encoder=False, pool="mean", fc_norm=True)
    opt = build_eval_optimizer(model, 512, name="adamw", base_lr=5e-4, weight_decay=0.05, layer_decay=0.65)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    peak = 5e-4 * 512 / 256
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        layer = hand_layer(names[id(group["params"][0])])
        assert group["lr"] == pytest.approx(peak * 0.65 ** (5 - layer))
        assert all(hand_layer(names[id(p)]) == layer for p in group["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_composer_schedulers_keep_the_layer_ratios():
    import datetime

    from composer.core import State
    from composer.optim import CosineAnnealingWithWarmupScheduler, compile_composer_scheduler

    model = classifier(freeze_encoder=False)
    opt = build_eval_optimizer(model, 256, name="adamw", lr=1.0, layer_decay=0.5)
    state = State(model=model, rank_zero_seed=0, run_name="x", device="cpu", max_duration="10ba", optimizers=opt)
    scheduler = compile_composer_scheduler(CosineAnnealingWithWarmupScheduler(t_warmup="2ba"), state)
    state.timestamp = state.timestamp.to_next_batch(samples=1, tokens=0, duration=datetime.timedelta(0))
    opt.step()  # no gradients: changes nothing, keeps torch from warning about the call order
    scheduler.step()
    lrs = [g["lr"] for g in opt.param_groups]
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert lrs[-1] < 1.0  # the schedule acts
    for lr, scale in zip(lrs, scales):
        assert lr == pytest.approx(lrs[-1] * scale / scales[-1])


def test_lars_step_equals_maes_rule_by_hand():
    model = classifier()  # frozen encoder: the head's weight (a matrix) and bias train
    opt = build_eval_optimizer(model, 256, name="lars", lr=0.5, momentum=0.9)
    assert isinstance(opt, Lars)
    assert sorted(g["always_adapt"] for g in opt.param_groups) == [False, True]
    weight, bias = model.head[0].weight, model.head[0].bias
    with torch.no_grad():
        weight.normal_()
        bias.normal_()
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    weight.grad = torch.randn_like(weight)
    bias.grad = torch.randn_like(bias)
    opt.step()
    # MAE's LARS with weight decay 0: matrices scaled by 0.001 * |w| / |g|, biases plain SGD (first step: buf = g)
    trust = 0.001 * w0.norm() / weight.grad.norm()
    torch.testing.assert_close(weight.detach(), w0 - 0.5 * trust * weight.grad)
    torch.testing.assert_close(bias.detach(), b0 - 0.5 * bias.grad)


def test_sgd_base_lr_momentum_and_nesterov():
    model = classifier()
    opt = build_eval_optimizer(model, 1024, name="sgd", base_lr=0.1, nesterov=True, weight_decay=1e-4)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["lr"] == pytest.approx(0.4) and g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-4]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"lr": 0.1, "base_lr": 0.1}, "lr"),
        ({}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": 0.1, "name": "adam"}, "name"),
        ({"lr": 0.1, "betas": [0.9, 0.99]}, "betas"),
        ({"lr": 0.1, "name": "adamw", "momentum": 0.9}, "momentum"),
        ({"lr": 0.1, "name": "adamw", "nesterov": True}, "nesterov"),
        ({"lr": 0.1, "name": "adamw", "betas": [0.9]}, "betas"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "layer_decay": 0.75}, "layer_decay"),  # frozen encoder
        ({"lr": 0.1, "weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_options_name_their_key(options, key):
    with pytest.raises(OptionError) as info:
        build_eval_optimizer(classifier(), 256, **options)
    assert info.value.key == key


def test_layer_decay_out_of_range_on_a_trainable_encoder():
    with pytest.raises(OptionError, match="layer_decay"):
        build_eval_optimizer(classifier(freeze_encoder=False), 256, name="adamw", lr=1e-3, layer_decay=1.5)
