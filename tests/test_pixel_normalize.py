"""normalize: pixel -- per-pixel standardisation (x - mean) / std from a statistics file, for every transform."""

import pytest
import torch

from magma_composer.data import StreamingImageDataset, build_image_dataloader
from magma_composer.data.transforms import PixelStandardize, normalization, unnormalize
from magma_composer.options import OptionError
from magma_composer.pca import PixelStats, save_pixel_stats


def write_stats(path, image_size=32, seed=0):
    """A statistics file with varied per-pixel means and standard deviations (C-major, D = 3 S^2)."""
    gen = torch.Generator().manual_seed(seed)
    dim = 3 * image_size * image_size
    mean = torch.rand(dim, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    std = torch.rand(dim, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    save_pixel_stats(PixelStats(mean, std, image_size, 3), path, num_images=10)
    return mean.view(3, image_size, image_size), std.view(3, image_size, image_size)


def data(demo_mds, **options):
    options = {"split": "train", "image_size": 32, "batch_size": 8, "augment_seed": 4, **options}
    return StreamingImageDataset(str(demo_mds), **options)


def by_hand(x, mean, std):
    return ((x.double() - mean) / std).float()


@pytest.mark.parametrize("kind", ["eval", "train", "views"])
def test_pixel_standardisation_equals_the_hand_computation(demo_mds, tmp_path, kind):
    stats = tmp_path / "stats.pt"
    mean, std = write_stats(stats)
    options = {"eval": {"train": False}, "train": {}, "views": {"views": "vicreg"}}[kind]
    raw = data(demo_mds, normalize="none", **options)
    standardised = data(demo_mds, normalize="pixel", pixel_stats=str(stats), **options)
    assert standardised.normalize == "pixel" and standardised.pixel_stats == str(stats)
    for i in (0, 5, 17):
        x, z = raw[i][0], standardised[i][0]
        assert z.shape == x.shape
        torch.testing.assert_close(z, by_hand(x, mean, std), atol=1e-5, rtol=1e-5)  # each view when there are two
        torch.testing.assert_close(unnormalize(z, "pixel", str(stats)), x, atol=1e-5, rtol=0)  # pictures


def test_pixel_standardisation_in_loader_workers(demo_mds, tmp_path):
    stats = tmp_path / "stats.pt"
    mean, std = write_stats(stats)
    common = dict(remote=str(demo_mds), split="test", image_size=32, train=False, max_samples=16, shuffle=False)
    (raw, _), = build_image_dataloader(batch_size=16, num_workers=0, normalize="none", **common)  # fmt: skip
    loader = build_image_dataloader(batch_size=16, num_workers=2, normalize="pixel", pixel_stats=str(stats), **common)
    (z, _), = loader  # fmt: skip
    torch.testing.assert_close(z, by_hand(raw, mean, std), atol=1e-5, rtol=1e-5)


def test_statistics_of_another_size_are_refused(demo_mds, tmp_path):
    stats = tmp_path / "stats16.pt"
    write_stats(stats, image_size=16)
    with pytest.raises(OptionError) as info:
        data(demo_mds, normalize="pixel", pixel_stats=str(stats))
    message = str(info.value)
    assert info.value.key == "pixel_stats"
    assert str(stats) in message and "3 x 16 x 16" in message and "3 x 32 x 32" in message


def test_missing_or_corrupted_statistics_file(demo_mds, tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(OptionError) as info:
        data(demo_mds, normalize="pixel", pixel_stats=str(missing))
    assert info.value.key == "pixel_stats" and str(missing) in str(info.value) and "pca stats" in str(info.value)
    broken = tmp_path / "broken.pt"
    write_stats(broken)
    broken.write_bytes(broken.read_bytes()[:-100])
    with pytest.raises(OptionError) as info:
        data(demo_mds, train=False, normalize="pixel", pixel_stats=str(broken))
    assert info.value.key == "pixel_stats" and str(broken) in str(info.value)


def test_pixel_needs_its_file_and_the_file_needs_pixel(demo_mds, tmp_path):
    stats = tmp_path / "stats.pt"
    write_stats(stats)
    with pytest.raises(OptionError) as info:
        data(demo_mds, normalize="pixel")
    assert info.value.key == "normalize" and "pixel_stats" in str(info.value)
    for normalize in ("imagenet", "none"):
        with pytest.raises(OptionError) as info:
            data(demo_mds, normalize=normalize, pixel_stats=str(stats))
        assert info.value.key == "pixel_stats" and "normalize: pixel" in str(info.value)
    with pytest.raises(OptionError) as info:  # a replaced transform would ignore both
        data(demo_mds, normalize="pixel", pixel_stats=str(stats), transform=lambda im: im)
    assert info.value.key in ("normalize", "pixel_stats")


def test_constant_pixels_are_divided_by_one():
    """A zero std (a pixel constant in the data set) divides by 1, as the PCA basis fitter does: no inf or NaN."""
    mean = torch.full((3, 2, 2), 0.5, dtype=torch.float64)
    std = torch.full((3, 2, 2), 0.25, dtype=torch.float64)
    std[0, 0, 0] = 0.0
    step = PixelStandardize(mean, std, image_size=2)
    x = torch.rand(3, 2, 2)
    z = step(x)
    assert torch.isfinite(z).all()
    assert float(z[0, 0, 0]) == pytest.approx(float(x[0, 0, 0]) - 0.5)
    assert float(z[1, 1, 1]) == pytest.approx((float(x[1, 1, 1]) - 0.5) / 0.25)
    torch.testing.assert_close(step.invert(z), x)
    with pytest.raises(ValueError, match="finite"):
        PixelStandardize(mean, -std, image_size=2)
    with pytest.raises(ValueError, match="3 x 4 x 4 = 48"):
        PixelStandardize(mean, std, image_size=4)


def test_unnormalize_every_normalisation():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(unnormalize(x, "none"), x)
    imagenet = normalization("imagenet")
    torch.testing.assert_close(unnormalize(imagenet(x), "imagenet"), x)
    step = PixelStandardize(torch.full((3, 8, 8), 0.3), torch.full((3, 8, 8), 0.2), image_size=8)
    torch.testing.assert_close(unnormalize(step(x), "pixel", step), x)
