"""The feature guards of magma_loss and uniformity_loss: dtypes, non-finite and overflowing input, no sync."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from magma_composer.algorithms.magma import magma_loss
from magma_composer.algorithms.uniformity import uniformity_loss

NAN, INF = float("nan"), float("inf")


def _features(b: int = 8, d: int = 6, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _magma(reference, target, **kwargs):
    return magma_loss(reference, target, **kwargs)


def _uniformity(reference, target, **kwargs):
    return uniformity_loss(target, **kwargs)


class HostReads(TorchDispatchMode):
    """Records the operators that copy a tensor's value to the host (a device synchronisation on a GPU)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("which", ["reference", "target", "features"])
def test_non_float_features_are_refused_naming_function_and_dtype(which, dtype):
    good = _features(dtype=torch.float32)
    bad = torch.ones(8, 6, dtype=dtype)
    if which == "features":
        call, fn = (lambda: uniformity_loss(bad)), "uniformity_loss"
    elif which == "reference":
        call, fn = (lambda: magma_loss(bad, good)), "magma_loss"
    else:
        call, fn = (lambda: magma_loss(good, bad)), "magma_loss"
    with pytest.raises(TypeError, match=rf"{fn}: {which} must hold real floating-point features.*dtype {dtype}"):
        call()


def test_non_tensor_features_are_refused():
    with pytest.raises(TypeError, match="magma_loss: reference must be a torch.Tensor, got list"):
        magma_loss([[1.0, 2.0]] * 4, torch.ones(4, 2))
    with pytest.raises(TypeError, match="uniformity_loss: features must be a torch.Tensor, got ndarray"):
        uniformity_loss(torch.ones(4, 2).numpy())


# ---------------------------------------------------------------------- check_finite=True: a clear error
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["reference", "target", "features"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_non_finite_input_is_a_clear_error(which, value, dtype):
    x, y = _features(dtype=dtype), _features(seed=1, dtype=dtype)
    (y if which != "reference" else x)[2, 3] = value
    fn = "uniformity_loss" if which == "features" else "magma_loss"
    call = _uniformity if which == "features" else _magma
    with pytest.raises(ValueError, match=rf"{fn}: {which} has 1 NaN or infinite value\(s\) among its 48"):
        call(x, y)
    with pytest.raises(ValueError, match="check_finite=False to skip"):
        call(x, y, return_stats=True)


def test_non_finite_input_is_an_error_even_when_the_term_would_be_skipped():
    x = torch.tensor([[NAN, 1.0], [0.0, 1.0]])  # B < 3: skipped anyway, but the input is still wrong
    with pytest.raises(ValueError, match="magma_loss: reference has 1 NaN"):
        magma_loss(x, torch.ones(2, 2))


@pytest.mark.parametrize("which", ["reference", "target", "features"])
def test_features_that_would_overflow_float32_are_a_clear_error(which):
    x, y = _features(dtype=torch.float32), _features(seed=1, dtype=torch.float32)
    (y if which != "reference" else x)[0, 0] = 1e30
    call = _uniformity if which == "features" else _magma
    with pytest.raises(ValueError, match=rf"{which} holds values up to 1e\+30, above .* overflow torch.float32"):
        call(x, y)
    # the same values in float64 are fine
    value = call(x.double(), y.double())
    assert torch.isfinite(value)


# ---------------------------------------------------------------------- check_finite=False: a skipped term
@pytest.mark.parametrize("value", [NAN, INF, -INF, 1e30], ids=["nan", "inf", "-inf", "overflow"])
@pytest.mark.parametrize("which", ["reference", "target"])
@pytest.mark.parametrize("kwargs", [{}, {"gamma": 2.0}], ids=["derived-gamma", "fixed-gamma"])
def test_magma_sync_free_path_skips_with_zero_gradient(which, value, kwargs):
    x = _features(dtype=torch.float32).requires_grad_(True)
    y = _features(seed=1, dtype=torch.float32).requires_grad_(True)
    with torch.no_grad():
        (y if which == "target" else x)[2, 3] = value
    out, stats = magma_loss(x, y, check_finite=False, return_stats=True, **kwargs)
    assert out.item() == 0.0 and not bool(stats.valid)
    assert stats.gamma.item() == 0.0 and stats.mean_affinity.item() == 0.0
    assert out.requires_grad  # the zero is part of the graph, so backward runs through the guard
    gx, gy = torch.autograd.grad(out, (x, y))
    for grad in (gx, gy):
        assert torch.isfinite(grad).all() and grad.abs().sum() == 0


@pytest.mark.parametrize("value", [NAN, INF, -INF, 1e30], ids=["nan", "inf", "-inf", "overflow"])
def test_uniformity_sync_free_path_skips_with_zero_gradient(value):
    f = _features(dtype=torch.float32).requires_grad_(True)
    with torch.no_grad():
        f[5, 0] = value
    out, stats = uniformity_loss(f, check_finite=False, return_stats=True)
    assert out.item() == 0.0 and not bool(stats.valid) and stats.feature_norm.item() == 0.0
    (grad,) = torch.autograd.grad(out, f)
    assert torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_a_skipped_term_leaves_the_other_losses_gradient_intact():
    """In a training step the skipped term is added to the task loss: the sum's gradient stays finite."""
    weight = torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(2)))
    inputs = _features(dtype=torch.float32)
    feats = inputs @ weight
    poisoned = torch.cat([feats[:7], torch.full((1, 6), NAN)])  # one sample's features overflowed upstream
    loss = feats.square().mean() + magma_loss(feats, poisoned, check_finite=False)
    loss = loss + uniformity_loss(poisoned, check_finite=False)
    expected = torch.autograd.grad(feats.square().mean(), weight, retain_graph=True)[0]
    loss.backward()
    assert torch.isfinite(weight.grad).all()
    assert torch.allclose(weight.grad, expected)


@pytest.mark.parametrize("call", [_magma, _uniformity], ids=["magma", "uniformity"])
def test_sync_free_path_matches_the_checked_path_on_good_input(call):
    x, y = _features(), _features(seed=1)
    assert call(x, y, check_finite=False).item() == call(x, y).item()


def test_large_but_representable_reference_features_keep_the_term():
    """gamma is scale-free: 1e9-sized reference features (whose squared distances squared overflow float32)
    give the same term as the same features at unit scale."""
    x, y = _features(b=64, d=64, dtype=torch.float32), _features(b=64, d=16, seed=1, dtype=torch.float32)
    out, stats = magma_loss(x * 1e9, y, return_stats=True)
    assert bool(stats.valid)
    assert out.item() == pytest.approx(magma_loss(x, y).item(), rel=1e-5)


# ---------------------------------------------------------------------- no device synchronisation
@pytest.mark.parametrize("call", [_magma, _uniformity], ids=["magma", "uniformity"])
@pytest.mark.parametrize("poison", [None, NAN], ids=["finite", "nan"])
def test_sync_free_path_reads_nothing_back_from_the_device(call, poison):
    x = _features(dtype=torch.float32).requires_grad_(True)
    y = _features(seed=1, dtype=torch.float32).requires_grad_(True)
    if poison is not None:
        with torch.no_grad():
            y[0, 0] = poison
    with HostReads() as mode:
        out, stats = call(x, y, check_finite=False, return_stats=True)
        out.backward()
    assert mode.reads == []
    with HostReads() as checked:  # the check that the default performs is visible to this probe
        if poison is None:
            call(x, y)
        else:
            with pytest.raises(ValueError):
                call(x, y)
    assert checked.reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("call", [_magma, _uniformity], ids=["magma", "uniformity"])
def test_sync_free_path_does_not_synchronise_cuda(call):
    x = _features(b=32, d=16, dtype=torch.float32).cuda().requires_grad_(True)
    y = _features(b=32, d=16, seed=1, dtype=torch.float32).cuda()
    y[3, 3] = NAN
    y.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = call(x, y, check_finite=False, return_stats=True)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.item() == 0.0 and not bool(stats.valid)
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all() and y.grad.abs().sum() == 0
