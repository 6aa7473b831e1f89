"""MAGMA: the functional form against the golden vectors and its guards, and the Algorithm in a real Trainer."""

import logging

import pytest
import torch
from composer import Callback
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.algorithms.magma import MAGMA, magma_loss
from magma_composer.models import ComposerMAE
from tests.conftest import TINY_MODEL, quick_trainer


# ---------------------------------------------------------------------- functional form
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_golden_vectors(golden, subtests, dtype, rel):
    assert golden["magma"], "no MAGMA cases in the golden vectors"
    for case in golden["magma"]:
        with subtests.test(batch=len(case["target"]), kwargs=case["kwargs"]):
            x = torch.tensor(case["reference"], dtype=dtype)
            y = torch.tensor(case["target"], dtype=dtype)
            out = magma_loss(x, y, **case["kwargs"])
            assert out.dtype == dtype
            assert out.item() == pytest.approx(case["expected"], rel=rel)


def _dense_reference(x, y, rbf_scale=1.0, eps=1e-4, gamma=None):
    """docs/algorithms.md §1 written out with explicit differences and a dense B x B Laplacian."""
    b = x.shape[0]
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) * (1 - torch.eye(b, dtype=torch.float64))
    if gamma is None:
        gamma = d2[d2 > 0].std(unbiased=True).item()
    w = torch.exp(-rbf_scale * d2 / gamma) * (1 - torch.eye(b, dtype=torch.float64))
    s = torch.diag(1 / torch.sqrt(w.sum(1) + eps))
    lap = torch.eye(b, dtype=torch.float64) - s @ w @ s
    return torch.trace(y.T @ lap @ y).item() / b**2, gamma, (w.sum() / (b * (b - 1))).item()


def test_stats_report_gamma_and_mean_affinity():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randn(10, 5, generator=g, dtype=torch.float64)
    value, stats = magma_loss(x, y, return_stats=True)
    expected, gamma, mean_w = _dense_reference(x, y)
    assert bool(stats.valid)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert stats.gamma.item() == pytest.approx(gamma, rel=1e-12)
    assert stats.mean_affinity.item() == pytest.approx(mean_w, rel=1e-12)
    assert not stats.gamma.requires_grad and not stats.mean_affinity.requires_grad


@pytest.mark.parametrize("kwargs", [{}, {"rbf_scale": 2.0, "eps": 1e-2}, {"gamma": 3.0}])
def test_gradcheck_float64(kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: magma_loss(a, b, **kwargs), (x, y))


def test_gradient_reaches_reference_through_w_and_gamma():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    value, stats = magma_loss(x, y, return_stats=True)
    gx, gy = torch.autograd.grad(value, (x, y))
    assert gx.abs().sum() > 0 and gy.abs().sum() > 0
    # with gamma frozen at the same value the X gradient changes: gamma is not a stop-gradient constant
    (gx_frozen,) = torch.autograd.grad(magma_loss(x, y, gamma=stats.gamma.item()), x)
    assert not torch.allclose(gx, gx_frozen, rtol=1e-6, atol=0)


def test_computes_in_float32_under_autocast_and_for_half_inputs():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    expected = magma_loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = magma_loss(x, y)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(expected.item(), rel=1e-6)
    xb, yb = x.bfloat16(), y.bfloat16()
    from_half = magma_loss(xb, yb)
    assert from_half.dtype == torch.float32
    assert from_half.item() == pytest.approx(magma_loss(xb.float(), yb.float()).item(), rel=1e-6)


def test_never_builds_a_d_by_d_matrix():
    # D = 200k: a D x D float32 matrix would need 160 GB, so this only runs with B x D products
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 200_000, generator=g), torch.randn(6, 200_000, generator=g)
    assert torch.isfinite(magma_loss(x, y))


@pytest.mark.parametrize(
    "reference",
    [
        torch.randn(2, 4, dtype=torch.float64),  # B < 3
        torch.ones(5, 4, dtype=torch.float64),  # every distance 0
        torch.eye(3, dtype=torch.float64),  # all distances equal: gamma = 0
    ],
    ids=["B<3", "all-D2-zero", "gamma-zero"],
)
def test_guards_skip_the_term_without_nan(reference):
    x = reference.clone().requires_grad_(True)
    y = torch.randn(x.shape[0], 3, dtype=torch.float64, requires_grad=True)
    value, stats = magma_loss(x, y, return_stats=True)
    assert not bool(stats.valid)
    assert value.item() == 0.0
    if value.requires_grad:
        gx, gy = torch.autograd.grad(value, (x, y), allow_unused=True)
        for grad in (gx, gy):
            assert grad is None or (torch.isfinite(grad).all() and grad.abs().sum() == 0)


def test_fixed_gamma_is_defined_on_identical_references():
    x = torch.ones(5, 4, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    value, stats = magma_loss(x, y, gamma=1.0, return_stats=True)
    assert bool(stats.valid) and stats.mean_affinity.item() == pytest.approx(1.0)
    assert value.item() == pytest.approx(_dense_reference(x, y, gamma=1.0)[0], rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rbf_scale": 0.0}, "rbf_scale must be a finite number > 0"),
        ({"eps": -1e-4}, "eps must be a finite number > 0"),
        ({"gamma": 0.0}, "gamma must be a finite number > 0"),
    ],
)
def test_functional_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        magma_loss(torch.randn(4, 3), torch.randn(4, 3), **kwargs)


def test_functional_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same B"):
        magma_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="B x D"):
        magma_loss(torch.randn(4, 3, 2), torch.randn(4, 3))


# ---------------------------------------------------------------------- the Algorithm
def _mae(mask_ratio=0.75):
    torch.manual_seed(0)
    return ComposerMAE(**TINY_MODEL, mask_ratio=mask_ratio)


def _loader(n=16, batch_size=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long)), batch_size=batch_size
    )


def _trainer(model, algorithms, batch_size=8, max_duration="2ba", callbacks=(), **kwargs):
    return quick_trainer(model, algorithms, _loader(batch_size=batch_size), max_duration, callbacks, **kwargs)


def _series(logger, key):
    return [float(v) for _, v in logger.data.get(key, [])]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"reference_layers": []}, ValueError, "at least one block"),
        ({"reference_layers": "10"}, ValueError, "reference_layers: expected a list of block indices"),
        ({"reference_layers": [1.5]}, ValueError, r"reference_layers\[0\]: expected an integer"),
        ({"target_layer": True}, ValueError, "target_layer: expected an integer"),
        ({"rbf_scale": -1}, ValueError, "rbf_scale"),
        ({"eps": 0}, ValueError, "eps"),
        ({"weight": "1.0"}, ValueError, "weight: weight must be a number or a mapping"),
        ({"weight": {"type": "warmup", "start": "1ep"}}, ValueError, "missing"),
        ({"gather": "yes"}, ValueError, "gather: expected true or false"),
    ],
)
def test_algorithm_rejects_bad_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        MAGMA(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reference_layers": [4]}, r"reference_layers=4 is out of range: the ViT has 4 blocks"),
        ({"reference_layers": [1], "target_layer": -5}, "target_layer=-5 is out of range"),
        (
            {"reference_layers": [1, 3], "target_layer": 2},
            r"must come after every reference block, but reference_layers \[3\]",
        ),
        ({"reference_layers": [-1]}, r"reference_layers \[-1\] do not come before it"),
        ({"reference_layers": [1, -3]}, "names a block twice"),
    ],
)
def test_layer_indices_are_checked_at_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _trainer(_mae(), [MAGMA(**kwargs)])


def test_model_without_a_vit_is_a_clear_error():
    from composer.models import ComposerClassifier

    model = ComposerClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2)), num_classes=2)
    with pytest.raises(ValueError, match="MAGMA: ComposerClassifier holds no timm VisionTransformer"):
        _trainer(model, [MAGMA(reference_layers=[1])])


class _RecomputeMagma(Callback):
    """At AFTER_LOSS (after the algorithm), recomputes the term from an independent unmasked encoder pass."""

    def __init__(self, reference, target):
        self.reference, self.target, self.pairs = reference, target, []

    def after_loss(self, state, logger):
        images = state.batch[0]
        enc = state.model.net.encoder
        with torch.no_grad():
            x = enc.patch_embed(images) + enc.pos_embed[:, 1:]
            x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(len(x), -1, -1), x], dim=1)
            outputs = []
            for block in enc.blocks:
                x = block(x)
                outputs.append(x[:, 1:].mean(dim=1))  # patch tokens only, CLS excluded
            expected = magma_loss(outputs[self.reference], outputs[self.target])
        self.pairs.append((state.loss["magma"].item(), expected.item(), state.loss["magma"].requires_grad))


def test_adds_weighted_term_to_mae_loss_and_logs_diagnostics():
    probe = _RecomputeMagma(reference=1, target=3)
    trainer, logger = _trainer(
        _mae(mask_ratio=0.0), [MAGMA(reference_layers=[1], target_layer=-1, weight=0.5)], callbacks=[probe]
    )
    trainer.fit()
    assert len(probe.pairs) == 2
    for got, expected, requires_grad in probe.pairs:
        assert requires_grad
        assert got == pytest.approx(0.5 * expected, rel=1e-5)
    terms = _series(logger, "magma/term")
    assert _series(logger, "loss/train/magma") == pytest.approx([0.5 * t for t in terms], rel=1e-6)
    assert _series(logger, "magma/weight") == [0.5, 0.5]
    total = _series(logger, "loss/train/total")
    assert total == pytest.approx(
        [m + g for m, g in zip(_series(logger, "loss/train/mae"), _series(logger, "loss/train/magma"))]
    )
    for key in ("magma/gamma", "magma/mean_affinity", "magma/target_norm"):
        values = _series(logger, key)
        assert len(values) == 2 and all(v > 0 for v in values), key
    assert all(0 < v < 1 for v in _series(logger, "magma/mean_affinity"))
    assert _series(logger, "magma/skipped") == [0, 0]


def test_several_reference_layers_are_averaged():
    probe1, probe2 = _RecomputeMagma(0, 3), _RecomputeMagma(1, 3)
    trainer, _ = _trainer(
        _mae(mask_ratio=0.0), [MAGMA(reference_layers=[0, 1], target_layer=3)], callbacks=[probe1, probe2]
    )
    trainer.fit()
    for (got, e1, _), (_, e2, _) in zip(probe1.pairs, probe2.pairs):
        assert got == pytest.approx((e1 + e2) / 2, rel=1e-5)


class _TapRecords(Callback):
    def __init__(self):
        self.keys, self.recorded = [], []

    def after_loss(self, state, logger):
        from magma_composer.models import get_feature_tap

        self.keys.append(sorted(state.loss))
        self.recorded.append(sum(len(v) for v in get_feature_tap(state.model).block_means.values()))


def test_zero_weight_skips_all_work():
    probe = _TapRecords()
    magma = MAGMA(reference_layers=[1], weight={"type": "warmup", "start": "1ba", "end": "2ba", "value": 1.0})
    trainer, logger = _trainer(_mae(), [magma], max_duration="3ba", batch_size=4, callbacks=[probe])
    trainer.fit()
    assert probe.keys == [["mae"], ["mae", "magma"], ["mae"]]
    # nothing recorded while the weight is 0 (the tap stays disarmed); the second batch's records remain
    assert probe.recorded[0] == 0 and probe.recorded[1] == 2
    assert _series(logger, "magma/weight") == [0.0, 1.0, 0.0]
    assert len(_series(logger, "magma/term")) == 1


def test_guard_skips_small_batches_with_a_warning(caplog):
    trainer, logger = _trainer(_mae(), [MAGMA(reference_layers=[1])], batch_size=2, max_duration="1ba")
    with caplog.at_level(logging.WARNING, logger="magma_composer"):
        trainer.fit()
    assert "MAGMA: term skipped for 1 of 1" in caplog.text
    assert "at least 3 samples" in caplog.text
    assert _series(logger, "loss/train/magma") == [0.0]
    assert _series(logger, "magma/skipped") == [1.0]
    assert "magma/term" not in logger.data
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())


def test_warns_when_the_microbatch_is_smaller_than_the_batch():
    trainer, _ = _trainer(_mae(), [MAGMA(reference_layers=[1])], max_duration="1ba", device_train_microbatch_size=4)
    with pytest.warns(UserWarning, match=r"MAGMA: the microbatch \(4\) is smaller than the per-device batch \(8\)"):
        trainer.fit()


def test_hooks_removed_at_fit_end_and_restored_for_the_next_fit():
    magma = MAGMA(reference_layers=[1])
    trainer, logger = _trainer(_mae(), [magma], max_duration="1ba")
    vit = trainer.state.model.net.encoder
    trainer.fit()
    assert all(not block._forward_hooks for block in vit.blocks)
    trainer.fit(duration="1ba")
    assert len(_series(logger, "magma/term")) == 2
    assert all(not block._forward_hooks for block in vit.blocks)


def test_repr_names_the_configuration():
    magma = MAGMA(reference_layers=[10], target_layer=11, weight={"type": "warmup", "start": "10ep", "end": "110ep"})
    assert repr(magma) == (
        "MAGMA(reference_layers=[10], target_layer=11, weight=Warmup(start='10ep', end='110ep', value=1.0), "
        "rbf_scale=1.0, eps=0.0001, gamma=None, gather=False)"
    )
    assert magma.state_dict() == {"repr": repr(magma)}


class _MAEWithTotal(ComposerMAE):
    """A model whose loss dict has its own 'total' entry, which the trainer then uses alone."""

    def loss(self, outputs, batch, *args, **kwargs):
        losses = super().loss(outputs, batch)
        return {**losses, "total": 2.0 * losses["mae"]}


def test_a_models_total_entry_gets_the_term_too():
    torch.manual_seed(0)
    trainer, logger = _trainer(_MAEWithTotal(**TINY_MODEL), [MAGMA(reference_layers=[1], weight=0.5)])
    trainer.fit()
    expected = [2 * m + g for m, g in zip(_series(logger, "loss/train/mae"), _series(logger, "loss/train/magma"))]
    assert _series(logger, "loss/train/total") == pytest.approx(expected, rel=1e-6)


def test_vit_blocks_by_dotted_name_give_the_same_term():
    probe = _RecomputeMagma(reference=1, target=3)
    magma = MAGMA(reference_layers=["blocks.1"], target_layer="blocks.3", weight=0.5)
    trainer, _ = _trainer(_mae(mask_ratio=0.0), [magma], callbacks=[probe])
    trainer.fit()
    assert len(probe.pairs) == 2
    for got, expected, requires_grad in probe.pairs:
        assert requires_grad and got == pytest.approx(0.5 * expected, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reference_layers": ["blocks.1", 1]}, "names a block twice"),
        ({"reference_layers": ["norm"], "target_layer": 2}, r"must come after every reference module.*\['norm'\]"),
        ({"reference_layers": ["blocks.4"]}, r"reference_layers='blocks.4' names no module.*blocks, norm"),
        ({"reference_layers": ["layer3"], "target_layer": "layer4"}, r"names no module.*patch_embed"),
    ],
)
def test_names_are_checked_against_the_vit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAGMA(**kwargs).check_model(_mae())
