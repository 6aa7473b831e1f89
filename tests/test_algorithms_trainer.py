"""MAGMA and Uniformity on a model that is not the MAE (a two-view SimCLR-style ViT), and across a checkpoint."""

import pytest
import torch
import torch.nn.functional as F
from composer import Callback
from composer.models import ComposerModel
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.algorithms.magma import MAGMA, magma_loss
from magma_composer.algorithms.uniformity import Uniformity, uniformity_loss
from tests.conftest import quick_trainer

REFERENCE, TARGET, MAGMA_WEIGHT, UNIFORMITY_WEIGHT = 1, 3, 1.0, 0.5


class TinySimCLR(ComposerModel):
    """A SimCLR-style model: a timm ViT run once per view, a projector, an NT-Xent loss returned as a plain tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0)
        self.projector = torch.nn.Linear(32, 16)

    @staticmethod
    def views(images):
        return images, images.flip(-1)  # two deterministic "augmentations"

    def forward(self, batch):
        return [self.projector(self.encoder(view)) for view in self.views(batch[0])]

    def loss(self, outputs, batch):
        z = F.normalize(torch.cat(outputs), dim=1)
        b = outputs[0].shape[0]
        logits = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
        positives = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
        return F.cross_entropy(logits, positives)


def _expected_terms(encoder, images):
    """MAGMA and uniformity recomputed from independent passes over both views, averaged over the views."""
    magma, uniformity = [], []
    for view in TinySimCLR.views(images):
        x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(encoder.patch_embed(view))))
        means = []
        for block in encoder.blocks:
            x = block(x)
            means.append(x[:, encoder.num_prefix_tokens :].mean(dim=1))
        magma.append(magma_loss(means[REFERENCE], means[TARGET]))
        uniformity.append(uniformity_loss(encoder.norm(x)[:, 0]))
    return sum(magma) / 2, sum(uniformity) / 2


class _Probe(Callback):
    """Records the loss dict, the terms recomputed independently, and the gradients of the first batch."""

    def __init__(self):
        self.losses, self.expected, self.grads = [], [], None

    def before_backward(self, state, logger):
        loss = state.loss if isinstance(state.loss, dict) else {"plain": state.loss}
        self.losses.append({k: v.detach().clone() for k, v in loss.items()})
        with torch.no_grad():
            self.expected.append(_expected_terms(state.model.encoder, state.batch[0]))

    def after_backward(self, state, logger):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None}


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long))


def _fit(algorithms, max_duration="2ba", **kwargs):
    model, probe = TinySimCLR(), _Probe()
    trainer, logger = quick_trainer(
        model, algorithms, DataLoader(_data(), batch_size=4), max_duration, [probe], **kwargs
    )
    trainer.fit()
    return trainer, probe, logger


def _algorithms(**magma_kwargs):
    magma_kwargs.setdefault("weight", MAGMA_WEIGHT)
    return [
        MAGMA(reference_layers=[REFERENCE], target_layer=TARGET, **magma_kwargs),
        Uniformity(weight=UNIFORMITY_WEIGHT),
    ]


def test_two_view_simclr_model_gets_both_terms_averaged_over_the_views():
    _, probe, logger = _fit(_algorithms())
    assert len(probe.losses) == 2
    for losses, (magma, uniformity) in zip(probe.losses, probe.expected):
        # the model's plain tensor loss became {'loss': ...}, and the algorithms added their keys
        assert sorted(losses) == ["loss", "magma", "uniformity"]
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["magma"].item() == pytest.approx(MAGMA_WEIGHT * magma.item(), rel=1e-5)
        assert losses["uniformity"].item() == pytest.approx(UNIFORMITY_WEIGHT * uniformity.item(), rel=1e-5)
    assert len(logger.data["magma/term"]) == 2 and len(logger.data["uniformity/term"]) == 2


def test_regularisers_change_the_gradients_by_exactly_their_own_gradient():
    _, plain, _ = _fit([], max_duration="1ba")
    _, regularised, _ = _fit(_algorithms(), max_duration="1ba")
    # the gradient of the two terms alone, at the same initial weights and batch
    model = TinySimCLR()
    images = next(iter(DataLoader(_data(), batch_size=4)))[0]
    magma, uniformity = _expected_terms(model.encoder, images)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(MAGMA_WEIGHT * magma + UNIFORMITY_WEIGHT * uniformity, params, allow_unused=True)
    changed = 0
    for name, grad in zip(names, grads):
        delta = regularised.grads[name] - plain.grads[name]
        expected = torch.zeros_like(delta) if grad is None else grad
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)
        changed += int(delta.abs().max() > 1e-6)
    assert changed > 10  # blocks, norms and embeddings of the encoder all feel the terms
    assert torch.equal(regularised.grads["projector.weight"], plain.grads["projector.weight"])


def test_checkpoint_resume_keeps_the_schedule_and_the_terms(tmp_path):
    window = {"type": "warmup", "start": "1ba", "end": "3ba", "value": 1.0}
    _, _, full = _fit(_algorithms(weight=window), max_duration="4ba")
    _fit(_algorithms(weight=window), max_duration="2ba", save_folder=str(tmp_path), save_interval="1ba")
    checkpoint = tmp_path / "ep0-ba2-rank0.pt"
    assert checkpoint.exists()
    saved = torch.load(checkpoint, weights_only=False)["state"]["algorithms"]
    assert [name for name, _ in saved] == ["MAGMA", "Uniformity"]
    assert saved[0][1]["repr"].startswith("MAGMA(reference_layers=[1], target_layer=3, weight=Warmup(start='1ba'")

    resumed_trainer, _, resumed = _fit(_algorithms(weight=window), max_duration="4ba", load_path=str(checkpoint))
    assert resumed_trainer.state.timestamp.batch.value == 4

    def series(logger, key):
        return [float(v) for _, v in logger.data[key]]

    assert series(full, "magma/weight") == [0.0, 1.0, 1.0, 0.0]
    assert series(resumed, "magma/weight") == [1.0, 0.0]  # batches 2 and 3
    # the resumed run computes the same terms and losses as the uninterrupted one
    assert series(resumed, "magma/term") == pytest.approx(series(full, "magma/term")[1:], rel=1e-5)
    for key in ("loss/train/total", "loss/train/uniformity"):
        assert series(resumed, key) == pytest.approx(series(full, key)[2:], rel=1e-5), key
