"""PCA masking strategies 'random', 'top', 'bottom': the rules on hand-worked spectra, guards, real Trainer runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from composer import Callback, Event, Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

import magma_composer.algorithms.pca_masking.pca_masking as pca_masking_module
from magma_composer.algorithms.pca_masking import (
    PCAMasking,
    component_mask,
    mask_generator,
    ordered_component_mask,
    project_visible,
    sample_component_mask,
)
from magma_composer.data import StreamingImageDataset
from magma_composer.models import ComposerMAE
from magma_composer.options import OptionError
from magma_composer.pca import fit_basis, fit_pca, load_basis, save_basis
from tests.conftest import tiny_recipe

SIZE, PATCH = 16, 4

#: eigenvalues 8, 4, 2, 1, 1 of a full basis (total 16): rho = 0.5, 0.25, 0.125, 0.0625, 0.0625, cumulative
#: sums 0.5, 0.75, 0.875, 0.9375, 1 (all exact in binary, so no case depends on rounding)
PLANTED = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0], dtype=torch.float64) / 16

#: (ratio, t, 'top' masked, 'bottom' masked), worked by hand from the cumulative sums above:
#: t = max(argmin_j |c_j - r|, 1) with 0-based j; 'top' masks components 0..t-1, 'bottom' masks t..K-1
HAND_WORKED = [
    # closest sum 0.5 (j = 0): t = 0 is clamped to 1, so one component is masked ('top') / visible ('bottom')
    (0.2, 1, [0], [1, 2, 3, 4]),
    (0.01, 1, [0], [1, 2, 3, 4]),
    (0.6, 1, [0], [1, 2, 3, 4]),  # |0.5 - 0.6| = 0.1 < |0.75 - 0.6| = 0.15
    # closest sum 0.75 (j = 1): t = 1, the boundary component 1 is not in the head (visible for 'top')
    (0.7, 1, [0], [1, 2, 3, 4]),
    # a tie, |0.75 - 0.8125| = |0.875 - 0.8125|: the first j (1) wins
    (0.8125, 1, [0], [1, 2, 3, 4]),
    (0.9, 2, [0, 1], [2, 3, 4]),  # closest 0.875 (j = 2)
    (0.95, 3, [0, 1, 2], [3, 4]),  # closest 0.9375 (j = 3)
    # closest 1.0 (j = 4 = K - 1): t = 4, so one component stays visible ('top') / masked ('bottom')
    (0.99, 4, [0, 1, 2, 3], [4]),
]


def as_mask(indices, k: int) -> torch.Tensor:
    mask = torch.zeros(k, dtype=torch.bool)
    mask[torch.as_tensor(indices, dtype=torch.long)] = True
    return mask


# ---------------------------------------------------------------------- the rules
@pytest.mark.parametrize("ratio, t, top, bottom", HAND_WORKED, ids=[str(c[0]) for c in HAND_WORKED])
def test_top_and_bottom_on_the_planted_spectrum(ratio, t, top, bottom):
    masked_top = ordered_component_mask(PLANTED, ratio, "top")
    masked_bottom = ordered_component_mask(PLANTED, ratio, "bottom")
    assert masked_top.dtype == torch.bool and torch.equal(masked_top, as_mask(top, 5))
    assert torch.equal(masked_bottom, as_mask(bottom, 5))
    assert int(masked_top.sum()) == t and int((~masked_bottom).sum()) == t
    # the same rule as 'random' on the eigenvalue order (the identity here): 'top' is component_mask's head
    assert torch.equal(component_mask(PLANTED, ratio, torch.arange(5)), masked_top)


def test_masked_variance_of_each_strategy_by_hand():
    """What each mask hides, in shares of the variance (pca_masking/masked_variance), at the published 0.2 and 0.9."""
    assert float(PLANTED[ordered_component_mask(PLANTED, 0.9, "top")].sum()) == 0.75
    assert float(PLANTED[ordered_component_mask(PLANTED, 0.9, "bottom")].sum()) == 0.25  # visible head: 0.75
    # at 0.2 the first component alone (0.5) is closest: 'top' hides more than asked, 'bottom' keeps it only
    assert float(PLANTED[ordered_component_mask(PLANTED, 0.2, "top")].sum()) == 0.5
    assert float(PLANTED[ordered_component_mask(PLANTED, 0.2, "bottom")].sum()) == 0.5


def test_the_order_is_by_eigenvalue_not_by_index():
    """The cut follows decreasing variance (ties in the basis's order), wherever the components are stored."""
    ratios = torch.tensor([1.0, 8.0, 1.0, 4.0, 2.0], dtype=torch.float64) / 16  # order 1, 3, 4, 0, 2
    assert torch.equal(ordered_component_mask(ratios, 0.9, "top"), as_mask([1, 3], 5))
    assert torch.equal(ordered_component_mask(ratios, 0.9, "bottom"), as_mask([0, 2, 4], 5))
    # ties: of the two 1/16 components the first stored (0) is the earlier in the order
    assert torch.equal(ordered_component_mask(ratios, 0.95, "top"), as_mask([1, 3, 4], 5))
    assert torch.equal(ordered_component_mask(ratios, 0.99, "top"), as_mask([0, 1, 3, 4], 5))


def test_truncated_basis_and_two_components():
    # a truncated basis (sum(rho) = 0.875 < 1): a ratio above the sum still leaves the last component out
    truncated = PLANTED[:3]
    assert torch.equal(ordered_component_mask(truncated, 0.95, "top"), as_mask([0, 1], 3))
    assert torch.equal(ordered_component_mask(truncated, 0.95, "bottom"), as_mask([2], 3))
    # K = 2: always one masked and one visible, whatever the ratio
    two = torch.tensor([0.75, 0.25], dtype=torch.float64)
    for ratio in (1e-6, 0.5, 0.8, 1 - 1e-6):
        assert torch.equal(ordered_component_mask(two, ratio, "top"), as_mask([0], 2))
        assert torch.equal(ordered_component_mask(two, ratio, "bottom"), as_mask([1], 2))
    with pytest.raises(ValueError, match="at least 2 components"):
        ordered_component_mask(torch.tensor([1.0], dtype=torch.float64), 0.5, "top")
    with pytest.raises(OptionError, match="strategy: 'random' is not valid"):
        ordered_component_mask(two, 0.5, "random")  # the random strategy draws: sample_component_mask


def test_guards_and_complements_on_random_spectra():
    """On 200 random spectra and ratios: at least one masked and one visible, 'top' a prefix of the order,
    'bottom' its complement, and both the random rule applied to the eigenvalue order."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(2, 40, (1,), generator=g))
        ratios = torch.rand(k, generator=g, dtype=torch.float64) ** 4
        ratios = ratios / ratios.sum() * float(torch.rand(1, generator=g, dtype=torch.float64) * 0.5 + 0.5)
        ratio = float(torch.rand(1, generator=g, dtype=torch.float64).clamp(1e-6, 1 - 1e-6))
        top = ordered_component_mask(ratios, ratio, "top")
        bottom = ordered_component_mask(ratios, ratio, "bottom")
        for mask in (top, bottom):
            assert 1 <= int(mask.sum()) <= k - 1
        assert torch.equal(bottom, ~top)
        order = torch.sort(ratios, descending=True, stable=True).indices
        t = int(top.sum())
        assert bool(top[order[:t]].all()) and not bool(top[order[t:]].any())
        assert torch.equal(top, component_mask(ratios, ratio, order))


# ---------------------------------------------------------------------- the algorithm's options
@pytest.fixture(scope="module")
def small_basis(tmp_path_factory) -> Path:
    x = torch.rand(40, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    basis = fit_pca(lambda: x.split(20), SIZE, components=12, method="randomized", progress=False)
    return Path(save_basis(basis, tmp_path_factory.mktemp("b") / "b.pt").path)


def test_strategy_options_are_checked(small_basis):
    with pytest.raises(OptionError, match="strategy: 'highest' is not valid; choose one of 'random', 'top'") as e:
        PCAMasking(small_basis, strategy="highest")
    assert e.value.key == "strategy"
    for strategy in ("top", "bottom"):
        with pytest.raises(OptionError, match=f"strategy {strategy!r} masks a fixed cut") as e:
            PCAMasking(small_basis, strategy=strategy, ratio_range=(0.1, 0.9))
        assert e.value.key == "ratio_range"
        with pytest.raises(OptionError, match=f"strategy {strategy!r} gives every sample the same fixed mask") as e:
            PCAMasking(small_basis, strategy=strategy, per_sample=True)
        assert e.value.key == "per_sample"
    assert "strategy='top'" in repr(PCAMasking(small_basis, strategy="top"))
    # a one-component basis cannot leave one component visible and mask another
    basis = load_basis(small_basis)
    one = replace(
        basis, components=basis.components[:, :1], eigenvalues=basis.eigenvalues[:1], ratios=basis.ratios[:1]
    ).with_hash()
    with pytest.raises(OptionError, match="has 1 component; masking needs at least 2") as e:
        PCAMasking(one)
    assert e.value.key == "basis"


# ---------------------------------------------------------------------- real Trainer runs on the demo data
@pytest.fixture(scope="module")
def basis_path(demo_mds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("strategies") / "demo16.pt"
    fit_basis(str(demo_mds), split="train", image_size=SIZE, out=out, progress=False)
    return out


class Batches(Callback):
    """Records the loader's images and the images that reached the model."""

    def __init__(self) -> None:
        self.loaded, self.fed = [], []

    def run_event(self, event: Event, state, logger) -> None:
        if event == Event.AFTER_DATALOADER:
            self.loaded.append(state.batch[0].clone())
        elif event == Event.AFTER_FORWARD:
            self.fed.append(state.batch[0].clone())


def _no_draws(*args, **kwargs):
    raise AssertionError("a fixed strategy must not draw a mask")


@pytest.mark.parametrize("strategy", ["random", "top", "bottom"])
def test_trainer_runs_each_strategy_on_the_demo_data(strategy, demo_mds, basis_path, monkeypatch):
    if strategy != "random":  # the fixed strategies never build a generator nor draw a mask
        monkeypatch.setattr(pca_masking_module, "mask_generator", _no_draws)
        monkeypatch.setattr(pca_masking_module, "sample_component_mask", _no_draws)
    data = StreamingImageDataset(
        str(demo_mds), split="train", image_size=SIZE, train=True, normalize="none", batch_size=8
    )
    model = ComposerMAE(
        {"embed_dim": 32, "depth": 2, "num_heads": 2},
        img_size=SIZE,
        patch_size=PATCH,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
    )
    spy, mem = Batches(), InMemoryLogger()
    ratio = 0.3
    algorithm = PCAMasking(str(basis_path), ratio=ratio, seed=5, strategy=strategy)
    Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=8),
        max_duration="3ba",
        algorithms=[algorithm],
        callbacks=[spy],
        loggers=[mem],
        progress_bar=False,
        device="cpu",
        seed=1,
    ).fit()
    basis = load_basis(basis_path)
    order = torch.argsort(basis.ratios, descending=True, stable=True)
    cumulative = torch.cumsum(basis.ratios[order], 0)
    t = max(int((cumulative - ratio).abs().argmin()), 1)  # the rule, computed here from the spectrum
    head = torch.zeros(basis.num_components, dtype=torch.bool)
    head[order[:t]] = True
    expected_mask = {"top": head, "bottom": ~head}.get(strategy)
    assert len(spy.loaded) == len(spy.fed) == 3
    for step, (x, x_in) in enumerate(zip(spy.loaded, spy.fed)):
        if strategy == "random":
            masked = sample_component_mask(basis.ratios, mask_generator(5, step, 0, 0), ratio=ratio)
        else:
            masked = expected_mask
        z = ((x.reshape(8, -1).double() - basis.mean) / basis.std).float()
        expected, _ = project_visible(z, basis.components, masked)
        assert torch.allclose(x_in.reshape(8, -1), expected, atol=1e-4)
        # nothing of the masked components reaches the encoder
        leaked = (x_in.reshape(8, -1).double() @ basis.components.double())[:, masked]
        assert float(leaked.abs().max()) < 1e-3
    losses = [float(v) for _, v in mem.data["loss/train/pmae"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    variances = [float(v) for _, v in mem.data["pca_masking/masked_variance"]]
    if strategy == "random":
        assert len(set(variances)) > 1  # a new random mask each step
    else:
        assert variances == pytest.approx([float(basis.ratios[expected_mask].sum())] * 3, rel=1e-12)
        assert [float(v) for _, v in mem.data["pca_masking/masked_components"]] == [float(expected_mask.sum())] * 3
        # the masks are what the strategy says: 'top' hides the largest eigenvalue, 'bottom' the smallest
        assert bool(expected_mask[order[0]]) == (strategy == "top")
        assert bool(expected_mask[order[-1]]) == (strategy == "bottom")


def test_a_recipe_selects_the_strategy(demo_mds, tmp_path, capsys):
    """As a user runs the ablation: a recipe with `pca_masking: {strategy: bottom}` trains for a few steps."""
    from magma_composer.train import main

    basis = tmp_path / "demo32.pt"
    fit_basis(
        str(demo_mds), split="train", image_size=32, components=24, method="randomized", out=basis, progress=False
    )
    recipe = tiny_recipe(
        demo_mds,
        max_duration="2ba",
        algorithms={"pca_masking": {"basis": str(basis), "ratio": 0.8, "strategy": "bottom"}},
    )
    recipe["train_data"]["normalize"] = "none"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    state = main([str(path)]).state
    assert int(state.timestamp.batch) == 2
    algorithm = next(a for a in state.algorithms if isinstance(a, PCAMasking))
    assert algorithm.strategy == "bottom" and algorithm.ratio == 0.8
    ratios = load_basis(basis).ratios
    assert torch.equal(algorithm._fixed_mask, ordered_component_mask(ratios, 0.8, "bottom"))
    recipe["algorithms"]["pca_masking"]["strategy"] = "middle"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: algorithms.pca_masking.strategy: 'middle' is not valid; choose one of 'random', 'top'" in err
