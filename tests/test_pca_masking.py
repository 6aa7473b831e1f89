"""PCA masking: golden vectors, masks, projections, real Trainer.fit runs, errors, checkpoints, 224 px scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from composer import Callback, Event, Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader, TensorDataset

from magma_composer.algorithms.pca_masking import (
    PCAMasking,
    component_mask,
    mask_generator,
    pmae_loss,
    project_visible,
    sample_component_mask,
)
from magma_composer.data import StreamingImageDataset
from magma_composer.models import ComposerMAE, unpatchify
from magma_composer.pca import PCABasis, fit_basis, load_basis

SIZE, PATCH = 16, 4
TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def tiny_mae(img_size: int = SIZE, patch_size: int = PATCH) -> ComposerMAE:
    return ComposerMAE(TINY, img_size=img_size, patch_size=patch_size, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def as_mask(masked, k: int) -> torch.Tensor:
    mask = torch.zeros(k, dtype=torch.bool)
    mask[torch.as_tensor(masked, dtype=torch.long)] = True
    return mask


# ---------------------------------------------------------------------- golden vectors
def test_component_mask_golden(golden, subtests):
    assert golden["pc_mask"], "no component-mask cases in the golden vectors"
    for case in golden["pc_mask"]:
        with subtests.test(components=len(case["ratios"]), ratio=case["ratio"]):
            ratios = torch.tensor(case["ratios"], dtype=torch.float64)
            mask = component_mask(ratios, case["ratio"], torch.tensor(case["permutation"]))
            assert mask.dtype == torch.bool and torch.equal(mask, as_mask(case["expected_masked"], len(ratios)))
            assert torch.equal(component_mask(ratios.float(), case["ratio"], torch.tensor(case["permutation"])), mask)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_pmae_loss_golden(golden, subtests, dtype, rtol):
    assert golden["pmae_loss"], "no PMAE-loss cases in the golden vectors"
    for case in golden["pmae_loss"]:
        with subtests.test(dim=len(case["basis"])):
            z, z_hat, basis = (torch.tensor(case[k], dtype=dtype) for k in ("images", "predictions", "basis"))
            for masked in (torch.tensor(case["masked"]), as_mask(case["masked"], basis.shape[1])):
                loss = pmae_loss(z, z_hat, basis, masked)
                assert loss.dtype == dtype
                assert float(loss) == pytest.approx(case["expected"], rel=rtol)
            # one mask per sample, all rows equal, is the same loss
            rows = as_mask(case["masked"], basis.shape[1]).expand(z.shape[0], -1)
            assert float(pmae_loss(z, z_hat, basis, rows)) == pytest.approx(case["expected"], rel=rtol)


# ---------------------------------------------------------------------- masks and projections
def test_component_mask_rows_and_never_empty():
    g = torch.Generator().manual_seed(0)
    ratios = torch.rand(30, generator=g, dtype=torch.float64).sort(descending=True).values
    ratios /= ratios.sum()
    perms = torch.rand(5, 30, generator=g).argsort(1)
    r = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.99], dtype=torch.float64)
    batched = component_mask(ratios, r, perms)
    for i in range(5):
        assert torch.equal(batched[i], component_mask(ratios, float(r[i]), perms[i]))
    tiny = component_mask(ratios, 1e-9, perms[0])
    assert int(tiny.sum()) == 1 and bool(tiny[perms[0, 0]])  # t = max(t, 1): never an empty mask


def test_sampled_masks_are_a_pure_function_of_the_keys():
    ratios = torch.full((50,), 0.02, dtype=torch.float64)
    a = sample_component_mask(ratios, mask_generator(7, 3, 0, 1), ratio=0.2)
    assert torch.equal(a, sample_component_mask(ratios, mask_generator(7, 3, 0, 1), ratio=0.2))
    # the closest cumulative sum to 20 % is after 10 components (j = 9); the rule masks perm[:9]
    assert int(a.sum()) == 9
    others = {tuple(sample_component_mask(ratios, mask_generator(7, b, 0, 1)).tolist()) for b in range(20)}
    assert len(others) == 20
    per_sample = sample_component_mask(ratios, mask_generator(7, 3), batch_size=6)
    assert per_sample.shape == (6, 50) and len({tuple(m.tolist()) for m in per_sample}) == 6
    drawn = sample_component_mask(ratios, mask_generator(1), ratio_range=(0.1, 0.9), batch_size=400)
    fractions = drawn.double().sum(1) * 0.02
    assert fractions.min() >= 0.06 and fractions.max() <= 0.9 and 0.4 < float(fractions.mean()) < 0.6


@pytest.mark.parametrize("per_sample", [False, True])
def test_project_visible_drop_and_keep(per_sample):
    g = torch.Generator().manual_seed(1)
    d, k, b = 40, 12, 5
    v = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
    z = torch.randn(b, d, generator=g, dtype=torch.float64)
    masked = torch.rand(b if per_sample else 1, k, generator=g) < 0.3
    masked = masked if per_sample else masked[0]
    x_drop, coefficients = project_visible(z, v, masked, "drop")
    x_keep, _ = project_visible(z, v, masked, "keep")
    assert torch.allclose(coefficients, z @ v)
    for i in range(b):
        m = masked[i] if per_sample else masked
        vis, hid = v[:, ~m], v[:, m]
        assert torch.allclose(x_drop[i], vis @ (vis.T @ z[i]), atol=1e-12)
        assert torch.allclose(x_keep[i], z[i] - hid @ (hid.T @ z[i]), atol=1e-12)
    # nothing of the masked components reaches the input
    assert torch.allclose((x_keep @ v) * masked.double(), torch.zeros(b, k, dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------------- with the trainer
@pytest.fixture(scope="module")
def basis_path(demo_mds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pmae") / "demo16.pt"
    fit_basis(str(demo_mds), split="train", image_size=SIZE, out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def images(demo_mds) -> torch.Tensor:
    ds = StreamingImageDataset(
        str(demo_mds), split="train", image_size=SIZE, train=False, normalize="none", shuffle=False, batch_size=8
    )
    return torch.stack([ds[i][0] for i in range(32)])


def loader(images: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=batch_size)


class Batches(Callback):
    """Records the loader's images and the images that reached the model."""

    def __init__(self) -> None:
        self.loaded, self.fed, self.evaluated = [], [], []

    def run_event(self, event: Event, state, logger) -> None:
        if event == Event.AFTER_DATALOADER:
            self.loaded.append(state.batch[0].clone())
        elif event == Event.AFTER_FORWARD:
            self.fed.append(state.batch[0].clone())
        elif event == Event.EVAL_AFTER_FORWARD:  # what the model made of the batch (prepare_images)
            self.evaluated.append(state.outputs["input"].clone())


def test_trainer_fit_masks_components_and_adds_the_loss(demo_mds, basis_path):
    data = StreamingImageDataset(
        str(demo_mds), split="train", image_size=SIZE, train=True, normalize="none", batch_size=8
    )
    model, spy, mem = tiny_mae(), Batches(), InMemoryLogger()
    eval_images = torch.rand(8, 3, SIZE, SIZE)
    algorithm = PCAMasking(str(basis_path), ratio=0.3, seed=5)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=8),
        eval_dataloader=loader(eval_images),
        eval_interval="3ba",
        max_duration="3ba",
        algorithms=[algorithm],
        callbacks=[spy],
        loggers=[mem],
        progress_bar=False,
        device="cpu",
        seed=1,
    )
    assert model.drops_patches is False and model.loss({}, None) == {}
    assert not model.net.mask_token.requires_grad  # unused without patch dropping
    trainer.fit()
    basis = load_basis(basis_path)
    v = basis.components
    for step, (x, x_in) in enumerate(zip(spy.loaded, spy.fed)):
        z = ((x.reshape(8, -1).double() - basis.mean) / basis.std).float()
        masked = sample_component_mask(basis.ratios, mask_generator(5, step, 0, 0), ratio=0.3)
        expected, _ = project_visible(z, v, masked)
        assert torch.allclose(x_in.reshape(8, -1), expected, atol=1e-4)
    losses = [float(v) for _, v in mem.data["loss/train/pmae"]]
    assert len(losses) == 3 and all(np.isfinite(losses)) and "loss/train/mae" not in mem.data
    zero = [float(v) for _, v in mem.data["pca_masking/predict_zero_loss"]]
    masked = sample_component_mask(basis.ratios, mask_generator(5, 0, 0, 0), ratio=0.3)
    assert zero[0] == pytest.approx(float(basis.eigenvalues[masked].mean()), rel=1e-12)
    variance = float(mem.data["pca_masking/masked_variance"][0][1])
    assert variance == pytest.approx(float(basis.ratios[masked].sum()), rel=1e-12)
    # evaluation sees the standardised whole images, through the model's prepare_images
    assert len(spy.evaluated) == 1
    expected = ((eval_images.reshape(8, -1).double() - basis.mean) / basis.std).float().reshape(eval_images.shape)
    assert torch.allclose(spy.evaluated[0], expected, atol=1e-5)


def test_masks_follow_the_trainers_seed_unless_one_is_given(images, basis_path):
    """Without ``seed`` the masks come from the Trainer's seed: runs with different seeds draw different masks."""
    basis = load_basis(basis_path)

    def drawn(trainer_seed: int, **options) -> list[float]:
        mem = InMemoryLogger()
        algorithm = PCAMasking(str(basis_path), ratio=0.3, **options)
        trainer = Trainer(
            model=tiny_mae(),
            train_dataloader=loader(images),
            max_duration="3ba",
            algorithms=[algorithm],
            loggers=[mem],
            progress_bar=False,
            device="cpu",
            seed=trainer_seed,
        )
        trainer.fit()
        assert algorithm.state_dict()["seed"] == options.get("seed", trainer_seed)
        return [float(v) for _, v in mem.data["pca_masking/masked_variance"]]

    def expected(seed: int) -> list[float]:
        masks = [sample_component_mask(basis.ratios, mask_generator(seed, step, 0, 0), ratio=0.3) for step in range(3)]
        return [float(basis.ratios[m].sum()) for m in masks]

    assert expected(1) != expected(2)
    assert drawn(1) == pytest.approx(expected(1), rel=1e-12)
    assert drawn(2) == pytest.approx(expected(2), rel=1e-12)
    assert drawn(2, seed=1) == pytest.approx(expected(1), rel=1e-12)  # an explicit seed wins


def test_loss_goes_below_predict_zero_on_a_tiny_overfit(images, basis_path):
    """Two images, four copies each, a mask per sample: the loss on fresh masks ends far below predicting zero.

    (With one mask per batch the same run is much noisier: a mask holding a top component moves every input far.)
    """
    two = images[:2].repeat(4, 1, 1, 1)
    torch.manual_seed(0)
    model = tiny_mae()
    algorithm = PCAMasking(str(basis_path), ratio=0.2, per_sample=True)
    mem = InMemoryLogger()
    Trainer(
        model=model,
        train_dataloader=loader(two),
        max_duration="120ba",
        algorithms=[algorithm],
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        loggers=[mem],
        progress_bar=False,
        device="cpu",
        seed=0,
    ).fit()
    v = algorithm.basis.components
    z = algorithm.standardize(two).reshape(8, -1)
    model.eval()
    learned, zero = [], []
    with torch.no_grad():
        for s in range(20):  # fresh masks
            masked = sample_component_mask(algorithm.basis.ratios, mask_generator(99, s), ratio=0.2, batch_size=8)
            x_in, _ = project_visible(z, v, masked)
            pred = model.net(x_in.reshape(two.shape), 0.0)["pred"]
            z_hat = unpatchify(pred, PATCH, model.net.grid, 3).reshape(8, -1)
            learned.append(float(pmae_loss(z, z_hat, v, masked)))
            zero.append(float(pmae_loss(z, torch.zeros_like(z), v, masked)))
    assert np.mean(learned) < 0.5 * np.mean(zero)
    # the logged training loss fell from about the predict-zero level
    losses = [float(v) for _, v in mem.data["loss/train/pmae"]]
    monitor = [float(v) for _, v in mem.data["pca_masking/predict_zero_loss"]]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:10])
    assert len(monitor) == 120 and all(m > 0 for m in monitor)


def test_works_with_magma_and_uniformity(images, basis_path):
    magma = pytest.importorskip("magma_composer.algorithms.magma")
    uniformity = pytest.importorskip("magma_composer.algorithms.uniformity")
    mem = InMemoryLogger()
    algorithms = [
        PCAMasking(str(basis_path)),
        magma.MAGMA(reference_layers=[2], target_layer=3, weight=1.0),
        uniformity.Uniformity(weight=0.01),
    ]
    model = tiny_mae()
    trainer = Trainer(
        model=model,
        train_dataloader=loader(images[:16]),
        max_duration="2ba",
        algorithms=algorithms,
        loggers=[mem],
        progress_bar=False,
        device="cpu",
    )
    trainer.fit()
    for key in ("pmae", "magma", "uniformity"):
        values = [float(v) for _, v in mem.data[f"loss/train/{key}"]]
        assert len(values) == 2 and all(np.isfinite(values)), key
    total = float(mem.data["loss/train/total"][-1][1])
    parts = sum(float(mem.data[f"loss/train/{k}"][-1][1]) for k in ("pmae", "magma", "uniformity"))
    assert total == pytest.approx(parts, rel=1e-5)


# ---------------------------------------------------------------------- errors
def test_option_errors():
    for ratio in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"ratio: must be in \(0.0, 1.0\)"):
            PCAMasking("b.pt", ratio=ratio)
    with pytest.raises(ValueError, match="ratio: expected a finite number"):
        PCAMasking("b.pt", ratio=True)
    with pytest.raises(ValueError, match="ratio_range: must be"):
        PCAMasking("b.pt", ratio_range=(0.5, 0.1))
    with pytest.raises(ValueError, match="residual: 'none' is not valid"):
        PCAMasking("b.pt", residual="none")
    with pytest.raises(ValueError, match="basis: expected a basis file path or a PCABasis"):
        PCAMasking(3)


def make_trainer(model, algorithm, images, **kw) -> Trainer:
    return Trainer(
        model=model,
        train_dataloader=loader(images),
        max_duration="1ba",
        algorithms=[algorithm],
        progress_bar=False,
        device="cpu",
        **kw,
    )


def test_basis_and_model_errors(demo_mds, basis_path, images, tmp_path):
    with pytest.raises(ValueError, match="basis: PCA basis file .* does not exist"):
        PCAMasking(tmp_path / "missing.pt")  # when the algorithm is made, not at the first step
    payload = torch.load(basis_path, weights_only=True)
    payload["mean"][0] += 0.01
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="basis: .*(corrupted|truncated)"):
        PCAMasking(tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="3 x 16 x 16 images, but the model .* uses 3 x 32 x 32"):
        make_trainer(tiny_mae(img_size=32, patch_size=8), PCAMasking(basis_path), images)
    with pytest.raises(ValueError, match="needs a magma_composer.models.ComposerMAE"):
        from composer.models import ComposerClassifier

        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 2))
        make_trainer(ComposerClassifier(net, num_classes=2), PCAMasking(basis_path), images)
    normalised = (images - 0.45) / 0.225  # ImageNet-style normalisation: not pixels in [0, 1]
    with pytest.raises(ValueError, match="set the data set's `normalize: none`"):
        make_trainer(tiny_mae(), PCAMasking(basis_path), normalised).fit()


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("mask_seed", [3, None])
def test_save_and_resume_reloads_the_basis(images, basis_path, demo_mds, tmp_path, mask_seed):
    def run(duration, **kw):
        mem = InMemoryLogger()
        torch.manual_seed(11)
        model = tiny_mae()
        trainer = Trainer(
            model=model,
            train_dataloader=loader(images, batch_size=4),
            max_duration=duration,
            optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
            algorithms=[PCAMasking(str(basis_path), per_sample=True, seed=mask_seed)],
            loggers=[mem],
            progress_bar=False,
            device="cpu",
            seed=11,
            **kw,
        )
        trainer.fit()
        return [float(v) for _, v in mem.data["loss/train/pmae"]]

    straight = run("4ba")
    first = run("2ba", save_folder=str(tmp_path / "ckpt"), save_interval="2ba", save_filename="ep{epoch}-ba{batch}.pt")
    assert first == straight[:2]
    checkpoint = tmp_path / "ckpt" / "ep0-ba2.pt"
    saved = dict(torch.load(checkpoint, weights_only=False)["state"]["algorithms"])["PCAMasking"]
    assert saved["basis_path"] == str(basis_path) and saved["basis_sha256"] == load_basis(basis_path).sha256
    assert not any(isinstance(v, torch.Tensor) for v in saved.values())  # a reference, not the arrays
    resumed = run("4ba", load_path=str(checkpoint))
    assert resumed == pytest.approx(straight[2:], rel=1e-5)  # same masks, same data, same weights

    other = fit_basis(str(demo_mds), split="train", image_size=SIZE, max_images=100, out=tmp_path / "other.pt")
    with pytest.raises(ValueError, match="resume with the same basis"):
        Trainer(
            model=tiny_mae(),
            train_dataloader=loader(images, batch_size=4),
            max_duration="4ba",
            algorithms=[PCAMasking(other.path)],
            load_path=str(checkpoint),
            progress_bar=False,
            device="cpu",
        )


# ---------------------------------------------------------------------- pictures
def test_reconstruction_panels(images, basis_path):
    model = tiny_mae()
    algorithm = PCAMasking(str(basis_path), ratio=0.5)
    make_trainer(model, algorithm, images[:8])  # INIT loads and checks the basis
    panels = algorithm.reconstruction_panels(model, images[:4])
    assert [name for name, _ in panels] == ["original", "visible components", "prediction"]
    assert torch.equal(panels[0][1], images[:4])
    for _, picture in panels:
        assert picture.shape == (4, 3, SIZE, SIZE) and picture.min() >= 0 and picture.max() <= 1
    assert not torch.allclose(panels[1][1], images[:4], atol=1e-2)  # half the variance is missing


# ---------------------------------------------------------------------- scale
def disjoint_orthonormal_basis(size: int, k: int, seed: int = 0) -> PCABasis:
    """A random ``D x K`` orthonormal basis built without a QR: columns on disjoint random pixel sets."""
    d = 3 * size * size
    g = torch.Generator().manual_seed(seed)
    per_column = d // k
    pixels = torch.randperm(d, generator=g)[: k * per_column].reshape(k, per_column)
    signs = torch.randint(0, 2, (k, per_column), generator=g).float() * 2 - 1
    components = torch.zeros(d, k)
    components[pixels, torch.arange(k)[:, None].expand(-1, per_column)] = signs / per_column**0.5
    eigenvalues = torch.linspace(2.0, 0.1, k, dtype=torch.float64)
    return PCABasis(
        mean=torch.full((d,), 0.45, dtype=torch.float64),
        std=torch.full((d,), 0.25, dtype=torch.float64),
        components=components,
        eigenvalues=eigenvalues,
        ratios=eigenvalues / d,
        image_size=size,
        channels=3,
        num_images=1,
        total_variance=float(d),
        method="randomized",
    )


def test_224px_step_with_2048_components():
    basis = disjoint_orthonormal_basis(224, 2048)  # D = 150,528: 1.2 GB of float32 components
    model = ComposerMAE(TINY, img_size=224, patch_size=16, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    spy, mem = Batches(), InMemoryLogger()
    algorithm = PCAMasking(basis, ratio=0.2)
    pixels = torch.rand(2, 3, 224, 224)
    make_trainer(model, algorithm, pixels, callbacks=[spy], loggers=[mem], seed=0).fit()  # masks from seed 0
    assert np.isfinite(float(mem.data["loss/train/pmae"][0][1]))
    masked = sample_component_mask(basis.ratios, mask_generator(0, 0, 0, 0))
    coefficients = spy.fed[0].reshape(2, -1) @ basis.components
    assert coefficients[:, masked].abs().max() < 1e-4  # the masked components are gone from the input
    assert coefficients[:, ~masked].abs().max() > 1e-2
