"""FeatureTap: records only while armed, keeps the gradient, survives wrapping and checkpointing."""

import pytest
import timm
import torch
from torch.utils.checkpoint import checkpoint

from magma_composer.models import ComposerMAE, find_vit, get_feature_tap
from tests.conftest import TINY_MODEL


def test_records_only_while_armed_and_reduces_to_means():
    model = ComposerMAE(**TINY_MODEL)
    tap = get_feature_tap(model)
    tap.request_blocks([1, -1])
    tap.request_cls()
    images = torch.randn(4, 3, 32, 32)
    model((images, None))  # not armed: nothing recorded
    assert not tap.block_means and not tap.cls_tokens
    tap.arm()
    tokens = {}
    h = model.net.encoder.blocks[3].register_forward_hook(lambda m, a, o: tokens.setdefault("b3", o))
    out = model((images, None))
    tap.disarm()
    model.eval_forward((images, None))  # an evaluation forward after disarming must not leak in
    (b3,) = tap.block_features(3)
    assert b3.shape == (4, 32) and b3.dtype == torch.float32
    assert torch.allclose(b3, tokens["b3"][:, 1:].mean(1))  # CLS excluded
    assert len(tap.block_features(1)) == 1
    (cls,) = tap.final_cls()
    assert torch.allclose(cls, out["cls"])
    assert b3.requires_grad and cls.requires_grad
    h.remove()
    tap.remove()
    tap.arm()
    model((images, None))
    assert not tap.block_means


def test_one_tap_per_vit_shared_by_algorithms():
    model = ComposerMAE(**TINY_MODEL)
    assert get_feature_tap(model) is get_feature_tap(model)


def test_index_errors_and_no_vit():
    model = ComposerMAE(**TINY_MODEL)
    tap = get_feature_tap(model)
    with pytest.raises(ValueError, match="out of range.*4 blocks"):
        tap.request_blocks([4])
    with pytest.raises(ValueError, match="no timm VisionTransformer"):
        find_vit(torch.nn.Linear(2, 2))


def test_generic_timm_vit_in_ddp_like_wrapper():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=0)
    wrapper = torch.nn.Sequential(vit)  # any module holding a timm ViT
    tap = get_feature_tap(wrapper)
    tap.request_blocks([0])
    tap.arm()
    wrapper(torch.randn(2, 3, 32, 32))
    tap.disarm()
    assert tap.block_features(0)[0].shape == (2, 192)


def _checkpointed_forward(model, images, reentrant):
    enc = model.net.encoder
    x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
    for block in enc.blocks:
        x = checkpoint(block, x, use_reentrant=reentrant)
    return enc.norm(x)


def test_non_reentrant_checkpointing_keeps_gradient_and_recompute_does_not_leak():
    model = ComposerMAE(**TINY_MODEL)
    tap = get_feature_tap(model)
    tap.request_blocks([1])
    tap.arm()
    out = _checkpointed_forward(model, torch.randn(3, 3, 32, 32), reentrant=False)
    tap.disarm()
    (feat,) = tap.block_features(1)
    (feat.pow(2).sum() + out.sum()).backward()  # recomputation in backward runs while disarmed
    assert len(tap.block_means[1]) == 1
    assert model.net.encoder.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_reentrant_checkpointing_is_reported():
    model = ComposerMAE(**TINY_MODEL)
    tap = get_feature_tap(model)
    tap.request_blocks([1])
    tap.arm()
    _checkpointed_forward(model, torch.randn(3, 3, 32, 32).requires_grad_(), reentrant=True)
    tap.disarm()
    with pytest.raises(RuntimeError, match="non-reentrant"):
        tap.block_features(1)


def test_tap_paused_skips_forwards_nested_and_without_a_tap():
    from magma_composer.models.taps import tap_paused

    model = ComposerMAE(**TINY_MODEL)
    with tap_paused(model):  # no tap yet: a no-op
        model((torch.randn(2, 3, 32, 32), None))
    tap = get_feature_tap(model)
    tap.request_blocks([1])
    tap.request_cls()
    first, second = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    tap.arm()
    out = model((first, None))
    with tap_paused(model):
        with tap_paused(model):  # nested
            model((second, None))
        model((second, None))  # still paused in the outer context
    assert tap.recording
    tap.disarm()
    assert len(tap.block_features(1)) == 1 and len(tap.final_cls()) == 1
    assert torch.allclose(tap.final_cls()[0], out["cls"])
    tap.arm()
    model((second, None))  # after the context, recording again
    assert len(tap.block_features(1)) == 1


def test_vit_modules_by_dotted_name():
    model = ComposerMAE(**TINY_MODEL)
    tap = get_feature_tap(model)
    assert tap.resolve("blocks.3") == 3 and tap.resolve(-1) == 3 and tap.resolve("norm") == "norm"
    tap.request_blocks(["blocks.3", 3, "norm", "patch_embed", "blocks.1.mlp"])
    assert len(model.net.encoder.blocks[3]._forward_hooks) == 1  # one hook for the int and the name
    seen = {}
    vit = model.net.encoder
    handles = [
        getattr(vit, name).register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, o))
        for name in ("norm", "patch_embed")
    ]
    handles.append(vit.blocks[1].mlp.register_forward_hook(lambda m, a, o: seen.setdefault("mlp", o)))
    tap.arm()
    model((torch.randn(4, 3, 32, 32), None))
    tap.disarm()
    assert len(tap.block_features("blocks.3")) == 1 and tap.block_features("blocks.3") == tap.block_features(3)
    # token outputs inside the ViT: CLS excluded; patch_embed runs before the CLS token is prepended
    torch.testing.assert_close(tap.block_features("norm")[0], seen["norm"][:, 1:].mean(1))
    torch.testing.assert_close(tap.block_features("blocks.1.mlp")[0], seen["mlp"][:, 1:].mean(1))
    torch.testing.assert_close(tap.block_features("patch_embed")[0], seen["patch_embed"].mean(1))
    assert seen["patch_embed"].shape[1] == 16 and seen["norm"].shape[1] <= 17
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match=r"layer='layer3' names no module of the tapped encoder, ComposerMAE's timm "):
        tap.resolve("layer3")
