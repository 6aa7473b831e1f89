"""Two-view training data (SimCLR / VICReg): shapes, presets, overrides, determinism and exact resumption."""

import pytest
import torch
from PIL import Image

from magma_composer.data import StreamingImageDataset, build_image_dataloader
from magma_composer.data.views import VIEW_KEYS, blur_kernel_size, two_view_transform, view_settings
from magma_composer.options import OptionError


def views_data(demo_mds, views="simclr", **options):
    options = {"split": "train", "image_size": 32, "batch_size": 8, "views": views, **options}
    return StreamingImageDataset(str(demo_mds), **options)


def test_two_views_shape_labels_and_index(demo_mds):
    data = views_data(demo_mds, return_index=True, normalize="none")
    x, y, index = data[7]
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert y == 7 % 10 and index == 7
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert not torch.equal(x[0], x[1])  # two different augmentations of one image
    # ImageNet normalisation applies to each view
    normalised, _ = views_data(demo_mds)[7]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised, (x - mean) / std)


def test_collated_batch_is_b_x_2_x_c_x_s_x_s(demo_mds):
    loader = build_image_dataloader(
        batch_size=8, num_workers=0, remote=str(demo_mds), split="train", image_size=32, views="vicreg"
    )
    images, labels = next(iter(loader))
    assert images.shape == (8, 2, 3, 32, 32) and labels.shape == (8,)


def test_views_are_seeded_per_sample(demo_mds):
    a = views_data(demo_mds, augment_seed=5)
    forward = [a[i][0] for i in range(12)]
    backward = [a[i][0] for i in reversed(range(12))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x, y)  # reading order does not matter
    b = views_data(demo_mds, augment_seed=5)
    assert all(torch.equal(b[i][0], forward[i]) for i in range(12))  # nor the data set object
    other = views_data(demo_mds, augment_seed=6)
    assert not torch.equal(other[3][0], forward[3])  # the seed does
    # the global generator is left as it was (the data set draws from a forked one in the main process)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a[4]
    assert torch.equal(torch.rand(3), expected)


def _epoch(loader) -> dict[int, torch.Tensor]:
    out = {}
    for images, _, index in loader:
        for i, x in zip(index.tolist(), images):
            out[i] = x
    return out


def test_views_do_not_depend_on_worker_count(demo_mds):
    common = dict(remote=str(demo_mds), split="train", image_size=32, views="simclr", return_index=True)
    common.update(max_samples=48, augment_seed=1)
    serial = _epoch(build_image_dataloader(batch_size=8, num_workers=0, **common))
    parallel = _epoch(build_image_dataloader(batch_size=8, num_workers=2, **common))
    assert len(serial) == 48 and serial.keys() == parallel.keys()
    for i in serial:
        assert torch.equal(serial[i], parallel[i]), i


def test_resumed_mid_epoch_yields_the_same_views(demo_mds):
    """A loader restored from its state dict in epoch 1 continues with exactly the uninterrupted pass's batches."""

    def loader():
        return build_image_dataloader(
            batch_size=16, num_workers=0, remote=str(demo_mds), split="train", image_size=32, views="vicreg",
            return_index=True, shuffle_seed=7,
        )  # fmt: skip

    full = loader()
    epoch0 = list(full)
    reference = list(full)  # epoch 1: 10 batches
    assert len(epoch0) == len(reference) == 10
    # the epoch changes the views of a sample (the seed holds the epoch)
    first = {int(i): x for b in epoch0 for x, i in zip(b[0], b[2])}
    second = {int(i): x for b in reference for x, i in zip(b[0], b[2])}
    assert not torch.equal(first[0], second[0])

    interrupted = loader()
    list(interrupted)  # epoch 0
    seen = []
    for batch in interrupted:  # epoch 1, stopped after 4 batches
        seen.append(batch)
        if len(seen) == 4:
            break
    state = interrupted.state_dict()
    assert state["epoch"] == 1 and state["sample_in_epoch"] == 64

    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 6
    for got, want in zip(seen + rest, reference, strict=True):
        assert torch.equal(got[2], want[2])  # the same samples
        assert torch.equal(got[0], want[0])  # with the same two views
        assert torch.equal(got[1], want[1])


def test_presets_as_published():
    simclr = view_settings("simclr", 224)
    assert simclr[0] == simclr[1]  # symmetric
    assert simclr[0].jitter == (0.8, 0.8, 0.8, 0.2) and simclr[0].jitter_prob == 0.8
    assert simclr[0].crop_scale == (0.08, 1.0) and simclr[0].grayscale_prob == 0.2 and simclr[0].hflip_prob == 0.5
    assert simclr[0].blur_prob == 0.5 and simclr[0].blur_sigma == (0.1, 2.0) and simclr[0].solarize_prob == 0
    small = view_settings("simclr", 32)[0]  # SimCLR's CIFAR-10 setting: no blur, colour strength 0.5
    assert small.blur_prob == 0 and small.jitter == (0.4, 0.4, 0.4, 0.1)
    v1, v2 = view_settings("vicreg", 224)
    assert v1.jitter == v2.jitter == (0.4, 0.4, 0.2, 0.1)
    assert (v1.blur_prob, v2.blur_prob) == (1.0, 0.1) and (v1.solarize_prob, v2.solarize_prob) == (0.0, 0.2)
    v1, v2 = view_settings("vicreg", 32)
    assert v1.blur_prob == v2.blur_prob == 0 and (v1.solarize_prob, v2.solarize_prob) == (0.0, 0.2)
    assert blur_kernel_size(0.1, 224) == 23 and blur_kernel_size(0.1, 32) == 3  # SimCLR's odd kernel


def test_vicreg_pipelines_are_asymmetric():
    t = two_view_transform("vicreg", 224)
    names = [[type(step).__name__ for step in p.transforms] for p in t.pipelines]
    applied = [[type(s.transforms[0]).__name__ for s in p.transforms if type(s).__name__ == "RandomApply"]
               for p in t.pipelines]  # fmt: skip
    assert "_GaussianBlur" in names[0] and "_Solarize" not in names[0] + applied[0]  # view 1: always blurred
    assert "_GaussianBlur" in applied[1] and "_Solarize" in applied[1]  # view 2: sometimes blurred, solarised


def test_solarisation_only_in_view_two_at_its_rate():
    """Every other augmentation switched off: view 1 is the image, view 2 is it or its solarisation (p = 0.2)."""
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8)
    image = Image.fromarray(pixels.numpy())
    x = torch.from_numpy(pixels.numpy()).permute(2, 0, 1).float() / 255
    solarised = torch.where(x >= 0.5, 1 - x, x)
    off = dict(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hflip_prob=0, jitter_prob=0, grayscale_prob=0)
    t = two_view_transform({"preset": "vicreg", **off}, 32, normalize="none")
    hits = 0
    for seed in range(300):
        torch.manual_seed(seed)
        v1, v2 = t(image)
        torch.testing.assert_close(v1, x, atol=1e-6, rtol=0)
        if torch.allclose(v2, solarised, atol=1e-6, rtol=0):
            hits += 1
        else:
            torch.testing.assert_close(v2, x, atol=1e-6, rtol=0)
    assert 35 <= hits <= 85  # binomial(300, 0.2): mean 60, sd 6.9


def test_overrides_apply_per_view_and_to_both():
    v1, v2 = view_settings({"preset": "simclr", "crop_scale": [0.2, 1.0], "blur_prob": [0.0, 1.0]}, 224)
    assert v1.crop_scale == v2.crop_scale == (0.2, 1.0)
    assert (v1.blur_prob, v2.blur_prob) == (0.0, 1.0)
    assert v1.jitter == (0.8, 0.8, 0.8, 0.2)  # the rest from the preset
    v1, v2 = view_settings({"preset": "vicreg", "solarize_prob": 0.1, "jitter": [0.4, 0.4, 0.4, 0.1]}, 32)
    assert v1.solarize_prob == v2.solarize_prob == 0.1 and v1.jitter == (0.4, 0.4, 0.4, 0.1)


@pytest.mark.parametrize(
    "views, key, words",
    [
        ("byol", "views.preset", "choose one of 'simclr', 'vicreg'"),
        ({"crop_scale": [0.2, 1]}, "views", "needs 'preset'"),
        ({"preset": "simclr", "blurr_prob": 0.5}, "views.blurr_prob", "unknown key; a views mapping takes preset and"),
        ({"preset": "simclr", "blur_prob": [0.5, 0.5, 0.5]}, "views.blur_prob", "[view 1, view 2]"),
        ({"preset": "simclr", "blur_prob": 1.5}, "views.blur_prob", "must be in"),
        ({"preset": "simclr", "crop_scale": [0.9, 0.2]}, "views.crop_scale", "lo <= hi"),
        ({"preset": "simclr", "crop_scale": [0, 1]}, "views.crop_scale[0]", "must be in"),
        ({"preset": "simclr", "jitter": [0.4, 0.4, 0.4, 0.6]}, "views.jitter[3]", "must be in"),
        ({"preset": "simclr", "jitter": [0.4, 0.4]}, "views.jitter", "brightness, contrast, saturation, hue"),
        (3, "views", "expected a preset name"),
    ],
)
def test_bad_views_are_named(views, key, words):
    with pytest.raises(OptionError) as info:
        view_settings(views, 32)
    assert info.value.key == key and words in str(info.value)
    if key == "views.blurr_prob":
        assert all(k in str(info.value) for k in VIEW_KEYS)


@pytest.mark.parametrize(
    "options, key, words",
    [
        ({"train": False}, "views", "training data only"),
        ({"crop_scale": [0.2, 1.0]}, "crop_scale", "set them inside views"),
        ({"hflip": False}, "hflip", "set them inside views"),
        ({"auto_augment": "rand-m9"}, "auto_augment", "no effect beside views"),
        ({"random_erase": 0.25}, "random_erase", "no effect beside views"),
        ({"transform": lambda im: im}, "views", "replaced by 'transform'"),
        ({"views": {"preset": "simclr", "hflip": 0.5}}, "views.hflip", "unknown key"),
    ],
)
def test_dataset_refuses_what_views_would_ignore(demo_mds, options, key, words):
    with pytest.raises(OptionError) as info:
        views_data(demo_mds, **options)
    assert info.value.key == key and words in str(info.value)


def test_recipe_reader_accepts_views(demo_mds):
    from magma_composer.config import check_options
    from magma_composer.data.loader import build_image_dataloader as owner

    views = {"preset": "vicreg", "blur_prob": [1.0, 0.1]}
    checked = check_options(
        owner, {"remote": str(demo_mds), "split": "train", "batch_size": 8, "views": views}, "train_data"
    )
    assert checked["views"] == views
    loader = owner(**checked, image_size=32, num_workers=0)
    assert loader.dataset.transform.settings[1].blur_prob == 0.1 and loader.dataset.views == views


@pytest.mark.parametrize("kernel, side", [(23, 224), (5, 32)])
def test_separable_blur_equals_torchvisions(kernel, side):
    """The two 1-D passes equal torchvision's GaussianBlur with the same sigma draw and kernel."""
    from torchvision.transforms import GaussianBlur

    from magma_composer.data.views import _GaussianBlur

    x = torch.rand(3, side, side, generator=torch.Generator().manual_seed(side))
    torch.manual_seed(4)
    ours = _GaussianBlur(kernel, (0.1, 2.0))(x)
    torch.manual_seed(4)
    theirs = GaussianBlur(kernel, (0.1, 2.0))(x)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
