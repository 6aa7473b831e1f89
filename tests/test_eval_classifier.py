"""EncoderClassifier: poolings and heads against hand computations, the frozen encoder, the loss, label checks."""

from __future__ import annotations

import pytest
import torch
from composer.loss import soft_cross_entropy
from torch import nn

from magma_composer.evaluate.classifier import EncoderClassifier, EvalDataError, soft_target_cross_entropy
from magma_composer.models import ComposerMAE
from magma_composer.options import OptionError
from tests.conftest import TINY_MODEL


def tiny_mae(seed: int = 0) -> ComposerMAE:
    torch.manual_seed(seed)
    return ComposerMAE(**TINY_MODEL, mask_seed=0)


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_cls_features_equal_the_mae_features_and_the_encoder_is_frozen():
    mae = tiny_mae()
    x = images()
    expected = mae.extract_features(x)
    model = EncoderClassifier(mae.encoder, num_classes=10)
    model.train()
    assert not model.encoder.training and model.head.training  # a frozen encoder stays in eval mode
    assert not any(p.requires_grad for p in model.encoder.parameters())
    torch.testing.assert_close(model.features(x), expected, rtol=1e-5, atol=1e-5)
    logits = model((x, torch.arange(6)))
    assert logits.shape == (6, 10)
    logits.sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head[0].weight.grad is not None


def test_mean_pool_and_fc_norm_against_hand_computation():
    mae = tiny_mae()
    x = images()
    vit = mae.encoder
    with torch.no_grad():
        tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))  # before the final norm
        mean_after_norm = vit.norm(tokens)[:, 1:].mean(1)
    model = EncoderClassifier(vit, num_classes=10, pool="mean")
    torch.testing.assert_close(model.features(x), mean_after_norm, rtol=1e-5, atol=1e-5)

    mae = tiny_mae()
    model = EncoderClassifier(mae.encoder, num_classes=10, pool="mean", fc_norm=True, freeze_encoder=False)
    assert isinstance(model.encoder.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    with torch.no_grad():
        model.fc_norm.weight.uniform_(0.5, 1.5)  # a non-trivial norm, so that the test sees where it applies
        model.fc_norm.bias.uniform_(-0.5, 0.5)
        pooled = tokens[:, 1:].mean(1)
        expected = nn.functional.layer_norm(pooled, (32,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
        torch.testing.assert_close(model.features(x), expected, rtol=1e-5, atol=1e-5)


def test_heads_layers_and_initialisation():
    linear = EncoderClassifier(tiny_mae().encoder, num_classes=10, batch_norm=True, head_init_std=0.01)
    bn, fc = linear.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert fc.weight.shape == (10, 32) and torch.all(fc.bias == 0)
    big = EncoderClassifier(tiny_mae().encoder, num_classes=400, head_init_std=0.01)
    std = float(big.head[0].weight.std())  # 12800 draws: the estimate is within a few percent
    assert 0.0095 < std < 0.0105

    mlp = EncoderClassifier(tiny_mae().encoder, num_classes=10, head="mlp", mlp_hidden_dim=16)
    kinds = [type(m).__name__ for m in mlp.head]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [m.weight.shape for m in mlp.head if isinstance(m, nn.Linear)] == [(16, 32), (16, 16), (10, 16)]
    two = EncoderClassifier(tiny_mae().encoder, num_classes=10, head="mlp", mlp_hidden_dim=16, mlp_layers=2)
    assert [type(m).__name__ for m in two.head] == ["Linear", "ReLU", "Linear"]
    default = EncoderClassifier(tiny_mae().encoder, num_classes=10, head="mlp")
    assert default.head[0].out_features == 2048 and len(default.head) == 5


def test_drop_path_follows_the_linear_depth_rule():
    model = EncoderClassifier(tiny_mae().encoder, num_classes=10, freeze_encoder=False, drop_path=0.3)
    blocks = model.encoder.blocks
    assert isinstance(blocks[0].drop_path1, nn.Identity)
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    assert blocks[2].drop_path2.drop_prob == pytest.approx(0.2)
    assert all(p.requires_grad for p in model.encoder.parameters())  # position embedding included (MAE)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"drop_path": 0.1}, "drop_path"),  # frozen encoder: no effect
        ({"mlp_hidden_dim": 64}, "mlp_hidden_dim"),  # linear head
        ({"head": "mlp", "mlp_layers": 1}, "mlp_layers"),
        ({"pool": "max"}, "pool"),
        ({"head": "conv"}, "head"),
        ({"num_classes": 1}, "num_classes"),
        ({"head_init_std": 0.0}, "head_init_std"),
    ],
)
def test_bad_options_name_their_key(options, key):
    kwargs = {"num_classes": 10, **options}
    with pytest.raises(OptionError) as info:
        EncoderClassifier(tiny_mae().encoder, **kwargs)
    assert info.value.key == key


def test_soft_target_loss_matches_composer_and_index_targets():
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    one_hot = nn.functional.one_hot(labels, 5).float()
    soft = torch.softmax(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, labels), nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot), nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft), soft_cross_entropy(logits, soft))
    by_hand = -(soft * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft), by_hand)


@pytest.mark.parametrize(("bad", "words"), [(-1, "no labels"), (10, "num_classes=10"), (-3, "outside [0, 10)")])
def test_bad_labels_are_clear_errors_in_training_and_evaluation(bad, words):
    model = EncoderClassifier(tiny_mae().encoder, num_classes=10)
    labels = torch.tensor([0, 1, bad, 2])
    model.train()
    with pytest.raises(EvalDataError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        model((images(4), labels))
    model.eval()
    outputs = model.eval_forward((images(4), labels))
    with pytest.raises(EvalDataError, match="test data"):
        model.update_metric((images(4), labels), outputs, model.get_metrics()["top1"])


def test_classes_seen_are_recorded_per_split():
    model = EncoderClassifier(tiny_mae().encoder, num_classes=10)
    model.train()
    model((images(4), torch.tensor([0, 3, 3, 5])))
    model.eval()
    batch = (images(2), torch.tensor([1, 3]))
    model.update_metric(batch, model.eval_forward(batch), model.get_metrics()["top5"])
    assert torch.nonzero(model.seen_classes("training")).flatten().tolist() == [0, 3, 5]
    assert torch.nonzero(model.seen_classes("test")).flatten().tolist() == [1, 3]


def test_an_image_size_other_than_the_encoders_is_a_clear_error():
    model = EncoderClassifier(tiny_mae().encoder, num_classes=10)
    with pytest.raises(EvalDataError, match="image_size to 32"):
        model.features(torch.zeros(2, 3, 64, 64))


def test_prepare_is_applied_before_the_encoder():
    mae = tiny_mae()
    x = images()
    expected = mae.extract_features(2.0 * x + 1.0)
    model = EncoderClassifier(mae.encoder, num_classes=10, prepare=lambda t: 2.0 * t + 1.0)
    torch.testing.assert_close(model.features(x), expected, rtol=1e-5, atol=1e-5)
