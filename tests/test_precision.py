"""bf16 on CPUs: the default precision, the models' own autocast, float32 regularisers, and bad precisions."""

import pytest
import torch
from composer import Callback

from magma_composer import precision as prec
from magma_composer.algorithms.magma import magma_loss
from magma_composer.algorithms.uniformity import uniformity_loss
from magma_composer.config import ConfigError, validate
from magma_composer.models import ComposerMAE
from magma_composer.train import build_trainer
from tests.conftest import TINY_MODEL, tiny_recipe


def test_default_precision_follows_the_device_and_the_cpu(monkeypatch):
    assert prec.default_precision("gpu") == "amp_bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert prec.default_precision("cpu") == "amp_bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not prec.cpu_supports_bf16()
    assert prec.default_precision("cpu") == "fp32"


def test_cpu_autocast_runs_the_model_in_bf16_and_off_again():
    torch.manual_seed(0)
    model = ComposerMAE(**TINY_MODEL, mask_seed=0)
    images = torch.randn(4, 3, 32, 32)
    prec.cpu_autocast(model, "amp_bf16")
    out = model((images, None))
    assert out["pred"].dtype == torch.bfloat16  # the decoder head ran under autocast
    assert model.loss(out, (images, None))["mae"].dtype == torch.float32
    assert model.extract_features(images).dtype == torch.float32  # features are handed out in float32
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the model's calls
    prec.cpu_autocast(model, "fp32")
    assert model((images, None))["pred"].dtype == torch.float32


@pytest.mark.parametrize("value", ["amp_fp16", "amp_fp8", "bf16"])
def test_cpu_autocast_refuses_what_a_cpu_cannot_run(value):
    with pytest.raises(
        ValueError, match=f"precision: '{value}' is not available on a CPU; choose one of fp32, amp_bf16"
    ):
        prec.cpu_autocast(ComposerMAE(**TINY_MODEL), value)


def test_cpu_autocast_refuses_a_model_that_does_not_autocast_itself():
    with pytest.raises(TypeError, match="Linear does not autocast itself"):
        prec.cpu_autocast(torch.nn.Linear(2, 2), "amp_bf16")


def test_a_recipe_asking_for_fp16_on_a_cpu_is_a_config_error(demo_mds):
    recipe = tiny_recipe(demo_mds, precision="amp_fp16", device="cpu")
    with pytest.raises(ConfigError, match="^precision: 'amp_fp16' is not available on a CPU"):
        build_trainer(validate(recipe))


class _Record(Callback):
    """The forward's output dtype, the loss dict, and the terms recomputed in float32 from the recorded blocks."""

    def __init__(self):
        self.pred_dtypes, self.losses, self.expected = [], [], []

    def after_forward(self, state, logger):
        self.pred_dtypes.append(state.outputs["pred"].dtype)

    def before_backward(self, state, logger):
        self.losses.append({k: v.detach().clone() for k, v in state.loss.items()})


def _run(demo_mds, precision, steps=4, algorithms=None, seed=3):
    recipe = tiny_recipe(
        demo_mds, max_duration=f"{steps}ba", seed=seed, **({} if precision is None else {"precision": precision})
    )
    recipe["train_data"]["batch_size"] = 16
    recipe["device_train_microbatch_size"] = 16
    recipe["algorithms"] = algorithms or {}
    trainer = build_trainer(validate(recipe))
    record = _Record()
    trainer.state.callbacks.append(record)
    trainer.fit()
    return trainer, record


def test_the_cpu_default_trains_in_bf16_with_float32_regularisers(demo_mds):
    algorithms = {
        "magma": {"reference_layers": [1], "target_layer": 3, "weight": 1.0},
        "uniformity": {"weight": 0.5},
    }
    trainer, record = _run(demo_mds, None, steps=2, algorithms=algorithms)
    model = trainer.state.model
    expected_dtype = torch.bfloat16 if prec.cpu_supports_bf16() else torch.float32
    assert model.cpu_autocast_dtype == (torch.bfloat16 if prec.cpu_supports_bf16() else None)
    assert trainer.state.precision.value == "fp32"  # Composer's own precision: the model autocasts itself
    assert record.pred_dtypes == [expected_dtype] * 2
    for losses in record.losses:
        assert losses["magma"].dtype == torch.float32 and losses["uniformity"].dtype == torch.float32


def test_bf16_regularisers_equal_the_float32_formulas_on_the_bf16_run_features(demo_mds):
    """Under CPU autocast the terms are computed in float32 from the features the bf16 forward produced."""
    algorithms = {
        "magma": {"reference_layers": [1], "target_layer": 3, "weight": 1.0},
        "uniformity": {"weight": 0.5},
    }
    recipe = tiny_recipe(demo_mds, max_duration="1ba", seed=5, precision="amp_bf16")
    recipe["train_data"]["batch_size"] = 16
    recipe["device_train_microbatch_size"] = 16
    recipe["algorithms"] = algorithms
    trainer = build_trainer(validate(recipe))
    captured = {}
    net = trainer.state.model.net
    hooks = [
        net.encoder.blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out)) for i in (1, 3)
    ]
    hooks.append(net.encoder.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("norm", out)))
    record = _Record()
    trainer.state.callbacks.append(record)
    trainer.fit()
    for hook in hooks:
        hook.remove()
    prefix = net.encoder.num_prefix_tokens
    x, y = (captured[i][:, prefix:].float().mean(dim=1) for i in (1, 3))
    losses = record.losses[0]
    assert losses["magma"].item() == pytest.approx(magma_loss(x, y).item(), rel=1e-5)
    assert losses["uniformity"].item() == pytest.approx(
        0.5 * uniformity_loss(captured["norm"][:, 0].float()).item(), rel=1e-5
    )


def test_bf16_training_follows_the_float32_loss_curve(demo_mds):
    """Same seed, data and initialisation: the bf16 run's MAE losses stay within a few per cent of float32's."""
    _, fp32 = _run(demo_mds, "fp32", steps=8)
    _, bf16 = _run(demo_mds, "amp_bf16", steps=8)
    a = torch.tensor([float(step["mae"]) for step in fp32.losses])
    b = torch.tensor([float(step["mae"]) for step in bf16.losses])
    assert not torch.equal(a, b)  # the two runs did compute differently
    torch.testing.assert_close(b, a, rtol=0.03, atol=0.0)
