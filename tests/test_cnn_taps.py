"""Feature taps on named modules: a timm ResNet under MAGMA, reduction by rank, tap_paused, clear errors."""

import pytest
import timm
import torch
import torch.nn.functional as F
from composer import Callback
from composer.models import ComposerClassifier, ComposerModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.algorithms.magma import MAGMA, magma_loss
from magma_composer.algorithms.uniformity import Uniformity
from magma_composer.config import ConfigError, build_section
from magma_composer.models.taps import find_encoder, get_feature_tap, tap_paused
from tests.conftest import quick_trainer


class _ResNetModel(ComposerModel):
    """A tiny classifier on a timm resnet18, exposing the backbone as ``.encoder`` like the SSL models.

    With ``two_views``, a batch is ``(B x 2 x C x S x S, labels)``: view 1 is encoded normally, view 2 inside
    ``tap_paused`` (or not, with ``pause=False``); the views are kept (as leaves with gradient) for the tests.
    """

    def __init__(self, two_views: bool = False, pause: bool = True) -> None:
        super().__init__()
        self.encoder = timm.create_model("resnet18", pretrained=False, num_classes=0)
        self.head = nn.Linear(self.encoder.num_features, 10)
        self.two_views, self.pause = two_views, pause
        self.views: tuple[torch.Tensor, ...] = ()

    def forward(self, batch):
        images = batch[0]
        if not self.two_views:
            return self.head(self.encoder(images))
        first, second = images[:, 0].clone().requires_grad_(), images[:, 1].clone().requires_grad_()
        self.views = (first, second)
        z1 = self.encoder(first)
        if self.pause:
            with tap_paused(self):
                z2 = self.encoder(second)
        else:
            z2 = self.encoder(second)
        return self.head(z1), self.head(z2)

    def loss(self, outputs, batch, *args, **kwargs):
        if self.two_views:
            return F.mse_loss(outputs[0], outputs[1])
        return F.cross_entropy(outputs, batch[1])


def _resnet_model(**kwargs):
    torch.manual_seed(0)
    return _ResNetModel(**kwargs)


def _gap_layer3_layer4(encoder, images):
    """The hand computation: the ResNet's stem and stages called one by one, then global average pooling."""
    x = encoder.maxpool(encoder.act1(encoder.bn1(encoder.conv1(images))))
    x3 = encoder.layer3(encoder.layer2(encoder.layer1(x)))
    x4 = encoder.layer4(x3)
    return x3.mean(dim=(2, 3)), x4.mean(dim=(2, 3))


def _loader(n=16, batch_size=8, views=False):
    g = torch.Generator().manual_seed(0)
    shape = (n, 2, 3, 32, 32) if views else (n, 3, 32, 32)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(torch.randn(*shape, generator=g), labels), batch_size=batch_size)


def _series(logger, key):
    return [float(v) for _, v in logger.data.get(key, [])]


# ---------------------------------------------------------------------- the tap on a ResNet
def test_finds_the_encoder_attribute():
    model = _resnet_model()
    encoder, where = find_encoder(model)
    assert encoder is model.encoder and "`encoder` attribute (a ResNet)" in where
    assert get_feature_tap(model) is get_feature_tap(model)
    assert get_feature_tap(model).vit is None


def test_layer_records_equal_gap_of_a_manual_forward():
    model = _resnet_model()
    tap = get_feature_tap(model)
    tap.request_blocks(["layer3", "layer4", "global_pool"])
    images = torch.randn(6, 3, 32, 32)
    tap.arm()
    logits = model((images, None))
    tap.disarm()
    (l3,), (l4,), (pooled,) = (
        tap.block_features("layer3"),
        tap.block_features("layer4"),
        tap.block_features("global_pool"),
    )
    with torch.no_grad():
        gap3, gap4 = _gap_layer3_layer4(model.encoder, images)
        features = model.encoder(images)
    assert l3.shape == (6, 256) and l4.shape == (6, 512) and l3.dtype == torch.float32
    assert l3.requires_grad and l4.requires_grad and logits.requires_grad
    torch.testing.assert_close(l3.detach(), gap3)
    torch.testing.assert_close(l4.detach(), gap4)
    # the GAP of layer4 is the ResNet's pooled output, which the 2-D global_pool output records as is
    torch.testing.assert_close(l4.detach(), features)
    torch.testing.assert_close(pooled.detach(), features)


class _Ranks(nn.Module):
    """An encoder whose modules return a 4-D map, 3-D tokens, 2-D features and (``flat``) a 1-D tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.tokens = nn.Linear(4, 5)
        self.head = nn.Linear(5, 6)
        self.flat = nn.Flatten(0)

    def forward(self, x):
        maps = self.conv(x)
        tokens = self.tokens(maps.flatten(2).transpose(1, 2))
        out = self.head(tokens.mean(dim=1))
        self.flat(out[:, :1])
        self.seen = (maps, tokens, out)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reduction_by_rank_in_float32_or_float64(dtype):
    torch.manual_seed(0)
    encoder = _Ranks().to(dtype)
    tap = get_feature_tap(nn.Sequential(encoder), encoder=encoder)
    tap.request_blocks(["conv", "tokens", "head"])
    tap.arm()
    encoder(torch.randn(3, 3, 5, 5, dtype=dtype))
    tap.disarm()
    maps, tokens, out = (t.detach().double() for t in encoder.seen)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype != torch.bfloat16 else {"rtol": 1e-2, "atol": 1e-2}
    for name, expected in [("conv", maps.mean(dim=(2, 3))), ("tokens", tokens.mean(dim=1)), ("head", out)]:
        (record,) = tap.block_features(name)
        assert record.dtype == want and record.requires_grad, name
        torch.testing.assert_close(record.detach().double(), expected, **tol)  # no prefix tokens outside a ViT


def test_an_output_of_another_rank_is_a_clear_error():
    encoder = _Ranks()
    tap = get_feature_tap(encoder)
    tap.request_blocks(["flat"])
    tap.arm()
    with pytest.raises(RuntimeError, match=r"tapped module 'flat' returned a torch.float32 tensor of shape \(3,\)"):
        encoder(torch.randn(3, 3, 5, 5))


# ---------------------------------------------------------------------- MAGMA on a ResNet, in a real Trainer
class _HandMagma(Callback):
    """At AFTER_LOSS (after the algorithm): the term and its parameter gradients, by hand and through the tap."""

    def __init__(self, weight):
        self.weight, self.checked = weight, 0

    def after_loss(self, state, logger):
        encoder = state.model.encoder
        names, params = zip(*[(n, p) for n, p in encoder.named_parameters() if p.requires_grad])
        term = state.loss["magma"]
        got = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        x, y = _gap_layer3_layer4(encoder, state.batch[0])
        expected = self.weight * magma_loss(x, y)
        want = torch.autograd.grad(expected, params, allow_unused=True)
        torch.testing.assert_close(term.detach(), expected.detach(), rtol=1e-5, atol=0)
        for name, g, w in zip(names, got, want):
            assert (g is None) == (w is None), name
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()) + 1e-12, msg=name)
        # the gradient reaches the stem (through X and Y) and the last stage (through Y)
        grads = dict(zip(names, want))
        assert grads["conv1.weight"].abs().sum() > 0 and grads["layer4.0.downsample.0.weight"].abs().sum() > 0
        self.checked += 1


def test_magma_on_a_resnet_equals_the_hand_computation_in_a_trainer():
    model = _resnet_model()
    probe = _HandMagma(weight=0.5)
    magma = MAGMA(reference_layers=["layer3"], target_layer="layer4", weight=0.5)
    trainer, logger = quick_trainer(model, [magma], _loader(), "2ba", [probe])
    trainer.fit()
    assert probe.checked == 2
    terms = _series(logger, "magma/term")
    assert len(terms) == 2 and all(t > 0 for t in terms)
    assert _series(logger, "loss/train/magma") == pytest.approx([0.5 * t for t in terms], rel=1e-6)
    assert _series(logger, "magma/skipped") == [0, 0]
    total = [c + m for c, m in zip(_series(logger, "loss/train/loss"), _series(logger, "loss/train/magma"))]
    assert _series(logger, "loss/train/total") == pytest.approx(total, rel=1e-6)
    assert not model.encoder.layer3._forward_hooks  # removed at FIT_END


# ---------------------------------------------------------------------- tap_paused on a two-view model
class _FirstViewMagma(Callback):
    """Checks the term against the first view's features and the views' gradients against autograd by hand."""

    def __init__(self):
        self.checked = 0

    def after_loss(self, state, logger):
        model = state.model
        first, second = model.views
        term = state.loss["magma"]
        g_first, g_second = torch.autograd.grad(term, (first, second), retain_graph=True, allow_unused=True)
        expected = magma_loss(*_gap_layer3_layer4(model.encoder, first))
        (want,) = torch.autograd.grad(expected, first)
        torch.testing.assert_close(term.detach(), expected.detach(), rtol=1e-5, atol=0)
        assert want.abs().sum() > 0
        torch.testing.assert_close(g_first, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
        assert g_second is None  # the second view does not reach the term at all
        assert len(get_feature_tap(model).block_features("layer3")) == 1
        self.checked += 1


def test_tap_paused_magma_reads_only_the_first_view():
    model = _resnet_model(two_views=True)
    probe = _FirstViewMagma()
    magma = MAGMA(reference_layers=["layer3"], target_layer="layer4")
    trainer, logger = quick_trainer(model, [magma], _loader(views=True), "2ba", [probe])
    trainer.fit()
    assert probe.checked == 2 and len(_series(logger, "magma/term")) == 2


class _BothViews(Callback):
    def __init__(self):
        self.pairs = []

    def after_loss(self, state, logger):
        model = state.model
        terms = [magma_loss(*_gap_layer3_layer4(model.encoder, view)).item() for view in model.views]
        self.pairs.append((state.loss["magma"].item(), terms, len(get_feature_tap(model).block_features("layer3"))))


def test_without_tap_paused_both_views_are_averaged():
    # the control for the test above: unpaused, the tap records both calls and the term is their mean
    model = _resnet_model(two_views=True, pause=False)
    probe = _BothViews()
    trainer, _ = quick_trainer(
        model, [MAGMA(reference_layers=["layer3"], target_layer="layer4")], _loader(views=True), "1ba", [probe]
    )
    trainer.fit()
    ((got, (t1, t2), calls),) = probe.pairs
    assert calls == 2 and abs(t1 - t2) > 1e-6 * abs(t1)
    assert got == pytest.approx((t1 + t2) / 2, rel=1e-5)


# ---------------------------------------------------------------------- errors at the recipe check
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"reference_layers": [2], "target_layer": 3},
            r"MAGMA: _ResNetModel holds no timm VisionTransformer, so reference_layers=2 \(a ViT block index\) "
            r"names no module: the tap reads _ResNetModel's `encoder` attribute \(a ResNet\).*"
            r"conv1, bn1, act1, maxpool, layer1, layer2, layer3, layer4, global_pool, fc.*"
            r"`reference_layers: \[layer3\], target_layer: layer4`",
        ),
        (
            {"reference_layers": ["layer3"], "target_layer": "layer5"},
            r"target_layer='layer5' names no module of the tapped encoder.*layer3, layer4, global_pool, fc",
        ),
        (
            {"reference_layers": ["layer4"], "target_layer": "layer3"},
            r"target_layer='layer3' must come after every reference module.*reference_layers \['layer4'\]",
        ),
        (
            {"reference_layers": ["layer3"], "target_layer": "layer3.1"},
            r"lie inside none of them, but reference_layers \['layer3'\]",
        ),
        ({"reference_layers": ["layer2", "layer2"], "target_layer": "layer4"}, "names a block twice"),
    ],
)
def test_magma_options_that_do_not_fit_a_resnet(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAGMA(**kwargs).check_model(_resnet_model())


def test_errors_come_at_the_recipe_check_before_training():
    model = _resnet_model()
    with pytest.raises(ConfigError, match=r"^algorithms.magma: MAGMA: .*reference_layers=10"):
        build_section("algorithms.magma", MAGMA().check_model, model)
    with pytest.raises(ConfigError, match=r"algorithms.uniformity: Uniformity: the tapped encoder, .*has no CLS token"):
        build_section("algorithms.uniformity", Uniformity().check_model, model)
    # nothing was hooked by the failed checks
    assert not any(m._forward_hooks for m in model.modules())


def test_a_model_with_neither_a_vit_nor_an_encoder():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model = ComposerClassifier(net, num_classes=2)
    with pytest.raises(ValueError, match=r"holds no timm VisionTransformer.*the tap reads the model itself"):
        MAGMA(reference_layers=[0], target_layer=1).check_model(model)
    # its modules can still be named, by their dotted path inside the model
    tap = MAGMA(reference_layers=["module.0"], target_layer="module.4").check_model(model)
    assert tap.encoder is model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reference_layers": [""]}, r"reference_layers\[0\]: expected a module name such as 'layer3'"),
        ({"target_layer": 1.0}, r"target_layer: expected an integer \(a ViT block index\) or a module name"),
        ({"reference_layers": "layer3"}, r"expected a list of block indices or module names"),
    ],
)
def test_layer_options_are_checked_by_the_constructor(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAGMA(**kwargs)
