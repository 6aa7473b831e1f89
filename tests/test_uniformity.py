"""Uniformity: the functional form against the golden vectors, both Gram shapes, and the Algorithm in a Trainer."""

import pytest
import torch
from composer import Callback
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.algorithms.uniformity import Uniformity, uniformity_loss
from magma_composer.models import ComposerMAE
from tests.conftest import TINY_MODEL, quick_trainer


def _pairwise_reference(f):
    """Mean over all B x B pairs of the squared cosine, pair by pair."""
    f = f.double()
    b = f.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            total += (torch.dot(f[i], f[j]) / (f[i].norm() * f[j].norm())).item() ** 2
    return total / b**2


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_golden_vectors(golden, subtests, dtype, rel):
    assert golden["uniformity"], "no uniformity cases in the golden vectors"
    for case in golden["uniformity"]:
        with subtests.test(batch=len(case["features"])):
            out = uniformity_loss(torch.tensor(case["features"], dtype=dtype))
            assert out.dtype == dtype
            assert out.item() == pytest.approx(case["expected"], rel=rel)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (8, 8)], ids=["BxB-gram", "DxD-gram", "square"])
def test_both_gram_shapes_match_the_pairwise_definition(shape):
    f = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value, stats = uniformity_loss(f, return_stats=True)
    assert value.item() == pytest.approx(_pairwise_reference(f), rel=1e-12)
    assert stats.feature_norm.item() == pytest.approx(f.norm(dim=1).mean().item(), rel=1e-12)
    assert bool(stats.valid)


@pytest.mark.parametrize("shape", [(5, 7), (9, 3)])
def test_gradcheck_float64(shape):
    f = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(uniformity_loss, (f,))


def test_computes_in_float32_under_autocast_and_for_half_inputs():
    f = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    expected = uniformity_loss(f).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = uniformity_loss(f)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(expected, rel=1e-6)
    half = f.bfloat16()
    assert uniformity_loss(half).dtype == torch.float32
    assert uniformity_loss(half).item() == pytest.approx(uniformity_loss(half.float()).item(), rel=1e-6)


def test_picks_the_cheaper_gram():
    # a B x B Gram of 100k rows or a D x D Gram of 100k columns would need 40 GB: only the right one fits
    g = torch.Generator().manual_seed(3)
    tall = torch.randn(100_000, 4, generator=g)
    wide = torch.randn(4, 100_000, generator=g)
    assert uniformity_loss(tall).item() == pytest.approx(0.25, rel=0.01)  # isotropic in 4 dims: E[cos^2] = 1/4
    assert uniformity_loss(wide).item() == pytest.approx(0.25, rel=0.01)  # diagonal 1, near-orthogonal rest


def test_constant_features_reach_the_maximum():
    f = torch.ones(8, 5)
    assert uniformity_loss(f).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="B x D"):
        uniformity_loss(torch.ones(8))


class _RecomputeUniformity(Callback):
    """Recomputes the term from an independent, unmasked encoder pass (mask_ratio 0 makes it identical)."""

    def __init__(self):
        self.pairs = []

    def after_loss(self, state, logger):
        with torch.no_grad():
            latent, _, _ = state.model.net.encode(state.batch[0], 0.0)
            expected = uniformity_loss(latent[:, 0])
        self.pairs.append((state.loss["uniformity"].item(), expected.item()))


def _trainer(model, algorithms, callbacks=(), max_duration="2ba"):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.zeros(16, dtype=torch.long))
    return quick_trainer(model, algorithms, DataLoader(data, batch_size=8), max_duration, callbacks)


def _mae(mask_ratio):
    torch.manual_seed(0)
    return ComposerMAE(**TINY_MODEL, mask_ratio=mask_ratio)


def test_adds_weighted_term_on_the_final_cls_token():
    probe = _RecomputeUniformity()
    trainer, logger = _trainer(_mae(0.0), [Uniformity()], callbacks=[probe])
    trainer.fit()
    assert len(probe.pairs) == 2
    for got, expected in probe.pairs:
        assert got == pytest.approx(0.01 * expected, rel=1e-5)
    terms = [v for _, v in logger.data["uniformity/term"]]
    assert [v for _, v in logger.data["loss/train/uniformity"]] == pytest.approx([0.01 * t for t in terms], rel=1e-6)
    assert [v for _, v in logger.data["uniformity/weight"]] == [0.01, 0.01]
    assert all(v > 0 for _, v in logger.data["uniformity/feature_norm"])


def test_uniformity_gradient_reaches_the_encoder():
    """One SGD step with a large uniformity weight moves the encoder differently than without it."""

    def encoder_after_one_step(algorithms):
        model = _mae(0.75)
        trainer, _ = _trainer(model, algorithms, max_duration="1ba")
        trainer.fit()
        return torch.cat([p.detach().flatten() for p in model.net.encoder.blocks.parameters()])

    plain = encoder_after_one_step([])
    regularised = encoder_after_one_step([Uniformity(weight=10.0)])
    assert not torch.allclose(plain, regularised)


def test_repr():
    assert repr(Uniformity()) == "Uniformity(weight=Constant(value=0.01), gather=False)"
