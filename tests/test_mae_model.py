"""ComposerMAE: masking invariants, the loss over masked patches, norm_pix, shapes, evaluation path."""

import pytest
import torch

from magma_composer.models import ComposerMAE, masked_mse_loss, patchify, random_masking, unpatchify
from magma_composer.models.pos_embed import sincos_2d
from tests.conftest import TINY_MODEL


def tiny_mae(**kw) -> ComposerMAE:
    return ComposerMAE(**{**TINY_MODEL, **kw})


@pytest.mark.parametrize("num_patches,ratio", [(16, 0.75), (49, 0.75), (196, 0.75), (64, 0.5), (10, 0.9)])
def test_random_masking_keeps_exact_count_per_sample(num_patches, ratio):
    g = torch.Generator().manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(7, num_patches, ratio, torch.device("cpu"), g)
    n_keep = num_patches - int(round(num_patches * ratio))
    assert ids_keep.shape == (7, n_keep)
    assert torch.equal(mask.sum(1), torch.full((7,), float(num_patches - n_keep)))
    for b in range(7):  # the kept ids are exactly the unmasked positions, no duplicates
        assert sorted(ids_keep[b].tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
    # ids_restore is a permutation
    assert torch.equal(ids_restore.sort(1).values, torch.arange(num_patches).expand(7, -1))


def test_masks_differ_between_samples():
    _, mask, _ = random_masking(4, 64, 0.75, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert len({tuple(m.tolist()) for m in mask}) == 4


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 32, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 12, 8 * 8 * 3)
    assert torch.equal(unpatchify(p, 8, (4, 3)), x)
    # patch (row 1, col 2), pixel (dy=3, dx=5), channel 1
    assert p[1, 1 * 3 + 2, (3 * 8 + 5) * 3 + 1] == x[1, 1, 8 + 3, 16 + 5]


def test_loss_counts_masked_patches_only():
    pred = torch.zeros(2, 4, 3)
    target = torch.zeros(2, 4, 3)
    target[0, 0] = 100.0  # a huge error on a visible patch must not count
    target[1, 2] = 3.0  # an error of 9 per value on a masked patch
    mask = torch.tensor([[0.0, 1, 1, 0], [0.0, 0, 1, 1]])
    loss = masked_mse_loss(pred, target, mask, norm_pix_loss=False)
    assert loss.item() == pytest.approx(9.0 / 4)


def test_norm_pix_loss_matches_hand_computation():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 5, 12), torch.randn(3, 5, 12) * 4 + 2
    mask = (torch.rand(3, 5) > 0.5).float()
    mask[0, 0] = 1
    expected, count = 0.0, 0
    for b in range(3):
        for n in range(5):
            if mask[b, n]:
                t = target[b, n]
                mu = sum(t.tolist()) / 12
                var = sum((v - mu) ** 2 for v in t.tolist()) / 11  # unbiased, as the MAE code
                tn = [(v - mu) / (var + 1e-6) ** 0.5 for v in t.tolist()]
                expected += sum((p - q) ** 2 for p, q in zip(pred[b, n].tolist(), tn)) / 12
                count += 1
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx(expected / count, rel=1e-5)


def test_forward_loss_and_encoder_sees_visible_tokens_only():
    model = tiny_mae(mask_ratio=0.75)
    seen = []
    model.net.encoder.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    images = torch.randn(5, 3, 32, 32)
    out = model((images, torch.zeros(5)))
    assert seen == [torch.Size([5, 1 + 4, 32])]  # CLS + 25 % of 16 patches
    assert out["pred"].shape == (5, 16, 8 * 8 * 3)
    assert torch.equal(out["mask"].sum(1), torch.full((5,), 12.0))
    loss = model.loss(out, (images, None))
    assert set(loss) == {"mae"} and torch.isfinite(loss["mae"])
    loss["mae"].backward()
    assert model.net.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert not model.net.encoder.pos_embed.requires_grad  # fixed sin-cos


def test_any_image_and_patch_size():
    model = ComposerMAE(
        {"embed_dim": 32, "depth": 1, "num_heads": 2},
        img_size=48,
        patch_size=16,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
    )
    out = model((torch.randn(2, 3, 48, 48), None))
    assert out["pred"].shape == (2, 9, 16 * 16 * 3)


def test_timm_model_name():
    model = ComposerMAE(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, decoder_dim=32, decoder_depth=1, decoder_heads=2
    )
    assert model.encoder.embed_dim == 192 and len(model.encoder.blocks) == 12


def test_eval_path_features_unmasked_and_deterministic():
    model = tiny_mae().eval()
    images = torch.randn(3, 3, 32, 32)
    seen = []
    model.net.encoder.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    feats = model.extract_features(images)
    assert feats.shape == (3, 32) and seen == [17]  # CLS + all 16 patches
    with torch.no_grad():
        manual = model.net.encoder.forward_features(images)[:, 0]  # timm's own path: CLS after final norm
    assert torch.allclose(feats, manual, atol=1e-5)
    a, b = model.eval_forward((images, None)), model.eval_forward((images, None))
    assert torch.equal(a["mask"], b["mask"])  # fixed-seed mask: comparable metric between evaluations
    metric = model.get_metrics(is_train=False)["ReconstructionMSE"]
    model.update_metric((images, None), a, metric)
    assert torch.isfinite(metric.compute())


def test_sincos_embedding_properties():
    table = sincos_2d(64, 4, 4, num_prefix_tokens=1)
    assert table.shape == (17, 64)
    assert torch.equal(table[0], torch.zeros(64))
    assert len({tuple(r.tolist()) for r in table[1:]}) == 16  # every position distinct
    assert torch.allclose(table[1:].pow(2).sum(1), torch.full((16,), 32.0))  # sin^2 + cos^2 per pair


def test_bad_options():
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="encoder.width: unknown key"):
        ComposerMAE({"embed_dim": 32, "depth": 1, "num_heads": 2, "width": 3}, img_size=32, patch_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 30), 8)
