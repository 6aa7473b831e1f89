"""ComposerMAE: masking invariants, the loss over masked patches, norm_pix, shapes, evaluation path."""

import pytest
import torch
from composer.core import Callback

from magma_composer.models import ComposerMAE, masked_mse_loss, patchify, random_masking, unpatchify
from magma_composer.models.mae import draw_mask_ratio
from magma_composer.models.pos_embed import sincos_2d
from magma_composer.options import OptionError
from tests.conftest import TINY_MODEL, tiny_recipe


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


# ---------------------------------------------------------------------- MAE_rd: a random mask ratio per forward
def test_default_ratio_and_exclusive_options():
    assert tiny_mae().mask_ratio == 0.75 and tiny_mae().mask_ratio_range is None
    assert tiny_mae(mask_ratio=0.5).mask_ratio == 0.5
    model = tiny_mae(mask_ratio_range=[0.2, 0.6])
    assert model.mask_ratio_range == (0.2, 0.6) and model.mask_ratio == pytest.approx(0.4)  # the midpoint
    with pytest.raises(OptionError, match=r"mask_ratio_range: .*cannot be combined with mask_ratio \(0.75\)"):
        tiny_mae(mask_ratio=0.75, mask_ratio_range=[0.1, 0.9])  # explicit, even if equal to the default


@pytest.mark.parametrize(
    "value, message",
    [
        ([0.0, 0.5], r"mask_ratio_range\[0\]: must be in \(0.0, 1.0\), got 0.0"),
        ([0.1, 1.0], r"mask_ratio_range\[1\]: must be in \(0.0, 1.0\), got 1.0"),
        ([0.6, 0.4], "low 0.6 is above high 0.4"),
        ([0.1], r"expected \[low, high\]"),
        ("0.1, 0.9", r"expected \[low, high\]"),
        ([0.1, True], r"mask_ratio_range\[1\]: expected a finite number"),
        ([0.03, 0.5], "the lowest ratio 0.03 masks no patch of 16"),  # round(16 x 0.03) = 0
    ],
)
def test_bad_mask_ratio_range(value, message):
    with pytest.raises(OptionError, match=message):
        tiny_mae(mask_ratio_range=value)


def test_random_ratio_per_forward_exact_counts_and_rectangular_batch():
    model = tiny_mae(patch_size=4, mask_ratio_range=[0.1, 0.9], mask_seed=5).train()  # 64 patches
    seen = []
    model.net.encoder.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    images = torch.randn(6, 3, 32, 32)
    ratios = []
    for _ in range(12):
        out = model((images, None))
        ratio = out["mask_ratio"]
        assert 0.1 <= ratio <= 0.9
        n_masked = int(round(64 * ratio))
        # every sample drops exactly that many patches; the encoder saw CLS + the kept ones (one shape for all)
        assert torch.equal(out["mask"].sum(1), torch.full((6,), float(n_masked)))
        assert seen[-1] == 1 + 64 - n_masked
        assert torch.isfinite(model.loss(out, (images, None))["mae"])
        ratios.append(ratio)
    assert len(set(ratios)) == 12  # a new ratio every forward
    # the same seed gives the same ratios and masks (a pure function of seed, rank and forward count)
    again = tiny_mae(patch_size=4, mask_ratio_range=[0.1, 0.9], mask_seed=5).train()
    assert [again((images, None))["mask_ratio"] for _ in range(12)] == ratios


def test_degenerate_range_gives_the_fixed_ratio_masks():
    """[r, r] draws r every time and leaves the mask stream alone: the masks equal those of mask_ratio=r."""
    torch.manual_seed(0)
    fixed = tiny_mae(mask_ratio=0.5, mask_seed=3).train()
    ranged = tiny_mae(mask_ratio_range=[0.5, 0.5], mask_seed=3).train()
    ranged.load_state_dict(fixed.state_dict())
    images = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        a, b = fixed((images, None)), ranged((images, None))
        assert b["mask_ratio"] == a["mask_ratio"] == 0.5
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["pred"], b["pred"])


def test_draw_mask_ratio_is_uniform_and_pure():
    draws = torch.tensor([draw_mask_ratio(0.1, 0.9, 7, 0, step) for step in range(4000)], dtype=torch.float64)
    assert draws.min() >= 0.1 and draws.max() <= 0.9
    assert abs(draws.mean().item() - 0.5) < 0.02  # uniform on [0.1, 0.9]: mean 0.5, sd of the mean 0.0037
    counts = torch.histc(draws, bins=8, min=0.1, max=0.9)
    assert counts.min() > 400 and counts.max() < 600  # 500 expected per bin
    assert draw_mask_ratio(0.1, 0.9, 7, 1, 3) == draw_mask_ratio(0.1, 0.9, 7, 1, 3)
    assert draw_mask_ratio(0.1, 0.9, 7, 1, 3) != draw_mask_ratio(0.1, 0.9, 7, 0, 3)  # each rank its own
    assert draw_mask_ratio(0.3, 0.3, 1, 2, 3) == 0.3


def test_evaluation_uses_the_midpoint():
    model = tiny_mae(mask_ratio_range=[0.25, 0.75], mask_seed=0).eval()
    images = torch.randn(3, 3, 32, 32)
    out = model.eval_forward((images, None))
    assert torch.equal(out["mask"].sum(1), torch.full((3,), 8.0))  # 0.5 of 16
    masked, _ = model.reconstruct(images)
    assert masked.shape == images.shape
    assert model._mask_step == 0  # evaluation draws nothing from the training stream


class _Ratios(Callback):
    """Per batch: the loss terms and the drawn mask ratio."""

    def __init__(self):
        self.rows = []

    def after_loss(self, state, logger):
        self.rows.append((int(state.timestamp.batch), float(state.loss["mae"]), state.outputs["mask_ratio"]))


def _fit(recipe: dict):
    from composer.loggers import InMemoryLogger

    from magma_composer.config import validate
    from magma_composer.train import build_trainer

    trainer = build_trainer(validate(recipe))
    ratios = _Ratios()
    trainer.state.callbacks.append(ratios)
    trainer.fit()
    (memory,) = [d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger)]
    logged = [value for _, value in memory.data.get("mae/mask_ratio", [])]
    trainer.close()
    return ratios.rows, logged


def test_random_ratio_resumes_exactly_mid_epoch(demo_mds, tmp_path):
    """A run stopped at batch 7 (mid-epoch) and resumed draws the same ratios and masks as an uninterrupted one."""
    model = {**TINY_MODEL, "mask_ratio_range": [0.1, 0.9]}
    common = dict(
        model=model,
        scheduler={"warmup": "0ba", "alpha_f": 1.0},
        loggers={"in_memory": {}},
        seed=11,
    )
    full, logged = _fit(tiny_recipe(demo_mds, max_duration="12ba", **common))
    assert [r[2] for r in full] == logged  # the logged ratio is the one the forward used
    assert len({r[2] for r in full}) == 12 and all(0.1 <= r[2] <= 0.9 for r in full)
    ckpt = tmp_path / "ckpt"
    first, _ = _fit(tiny_recipe(demo_mds, max_duration="7ba", save_folder=str(ckpt), save_interval="7ba", **common))
    (checkpoint,) = ckpt.glob("ep0-ba7-rank0.pt")
    second, _ = _fit(tiny_recipe(demo_mds, max_duration="12ba", load_path=str(checkpoint), **common))
    assert first + second == full  # batch index, loss (bit-identical) and ratio
