"""StreamingImageDataset, transforms and the demo data set."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from magma_composer.data import StreamingImageDataset, eval_transform, train_transform
from magma_composer.data.demo import CLASSES, render, write_demo_dataset
from magma_composer.options import OptionError


def test_dataset_train_and_eval_views(demo_mds, tmp_path):
    train = StreamingImageDataset(
        str(demo_mds), split="train", image_size=24, train=True, normalize="none", batch_size=8
    )
    x, y = train[0]
    assert x.shape == (3, 24, 24) and 0.0 <= x.min() and x.max() <= 1.0 and y == 0
    evaluation = StreamingImageDataset(str(demo_mds), split="test", image_size=32, train=False, batch_size=8)
    a, _ = evaluation[5]
    b, _ = evaluation[5]
    assert torch.equal(a, b)  # no augmentation: the same tensor every time
    assert abs(float(a.mean())) < 3  # ImageNet-normalised
    assert len(evaluation) == 80
    labels = [evaluation[i][1] for i in range(20)]
    assert labels == [i % 10 for i in range(20)]


def test_dataset_needs_a_location():
    with pytest.raises(ValueError, match="remote: expected a local folder or a URI"):
        StreamingImageDataset("")
    with pytest.raises(ValueError, match="names no bucket"):
        StreamingImageDataset("s3://")


def test_transform_options():
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    assert train_transform(16, (0.5, 1.0))(img).shape == (3, 16, 16)
    out = eval_transform(16, normalize="none")(img)
    assert torch.allclose(out[0], torch.ones(16, 16)) and torch.allclose(out[1], torch.zeros(16, 16))
    with pytest.raises(ValueError, match="normalize: 'zscore' is not valid"):
        eval_transform(16, normalize="zscore")
    with pytest.raises(ValueError, match="crop_scale"):
        train_transform(16, (0.0, 1.0))


def test_demo_is_deterministic_and_idempotent(tmp_path):
    a = np.asarray(render(3, np.random.default_rng([0, 0, 7])))
    b = np.asarray(render(3, np.random.default_rng([0, 0, 7])))
    assert np.array_equal(a, b) and a.shape == (32, 32, 3)
    out = write_demo_dataset(tmp_path / "d", num_train=20, num_test=10, progress=False)
    index = (out / "train" / "index.json").stat().st_mtime_ns
    write_demo_dataset(out, num_train=20, num_test=10, progress=False)  # same options: kept
    assert (out / "train" / "index.json").stat().st_mtime_ns == index
    assert json.loads((out / "manifest.json").read_text())["classes"] == list(CLASSES)


def test_demo_classes_are_not_separable_by_mean_colour():
    """The label is the shape, not the colour: mean colour carries (almost) no class information."""
    means, labels = [], []
    for i in range(400):
        label = i % 10
        means.append(np.asarray(render(label, np.random.default_rng([1, 0, i]))).reshape(-1, 3).mean(0))
        labels.append(label)
    means, labels = torch.tensor(np.array(means)).float(), torch.tensor(labels)
    from magma_composer.evaluation import knn_top1

    acc = knn_top1(means[:300], labels[:300], means[300:], labels[300:], k=10)[10]
    assert acc < 35.0  # chance is 10 %


def test_fine_tuning_augmentations_and_sample_index(demo_mds):
    data = StreamingImageDataset(
        str(demo_mds),
        split="train",
        image_size=32,
        auto_augment="rand-m9-mstd0.5-inc1",
        random_erase=1.0,
        augment_seed=3,
        return_index=True,
        batch_size=8,
    )
    x, y, index = data[7]
    assert x.shape == (3, 32, 32) and index == 7 and data.has_labels and y == 7 % 10
    assert torch.equal(x, data[7][0])  # seeded per sample: the same augmentation again
    plain = StreamingImageDataset(str(demo_mds), split="train", image_size=32, augment_seed=3, batch_size=8)
    assert not torch.equal(x, plain[7][0])


@pytest.mark.parametrize(
    "options, key",
    [
        ({"auto_augment": "rand-m9-xx"}, "auto_augment"),  # timm would skip the section silently
        ({"auto_augment": "autoaug"}, "auto_augment"),
        ({"random_erase": 1.5}, "random_erase"),
        ({"train": False, "auto_augment": "rand-m9"}, "auto_augment"),  # an evaluation set has no augmentation
        ({"transform": lambda im: im, "hflip": False}, "hflip"),  # a replaced transform ignores it
    ],
)
def test_augmentation_options_refused(demo_mds, options, key):
    from magma_composer.options import OptionError

    with pytest.raises(OptionError) as info:
        StreamingImageDataset(str(demo_mds), split="train", image_size=32, batch_size=8, **options)[0]
    assert info.value.key == key


def test_a_training_split_smaller_than_one_batch_is_refused(demo_mds):
    """With drop_last no batch would ever be complete: every epoch empty, a run in batches endless."""
    from magma_composer.data.loader import build_image_dataloader

    with pytest.raises(OptionError, match=r"batch_size: 200, but this data set gives 160 samples per epoch"):
        build_image_dataloader(200, num_workers=0, remote=str(demo_mds), split="train", image_size=32)
    loader = build_image_dataloader(
        200, num_workers=0, drop_last=False, remote=str(demo_mds), split="train", image_size=32
    )
    assert [len(images) for images, _ in loader] == [160]


def test_an_evaluation_set_larger_than_its_split_is_refused(demo_mds):
    """Streaming would repeat images to fill the epoch: each would count twice in a kNN bank or a top-1 figure."""
    with pytest.raises(OptionError, match=r"max_samples: 81 is more than the 80 images of this evaluation set .*"
                       r"split 'test'.*give at most 80, or null for all"):  # fmt: skip
        StreamingImageDataset(str(demo_mds), split="test", image_size=32, train=False, max_samples=81, batch_size=8)
    whole = StreamingImageDataset(str(demo_mds), split="test", image_size=32, train=False, max_samples=80, batch_size=8)
    assert len(whole) == 80
    # training may ask for a longer epoch than the split holds: streaming repeats samples, as documented
    longer = StreamingImageDataset(str(demo_mds), split="train", image_size=32, max_samples=400, batch_size=8)
    assert len(longer) == 400


def test_an_evaluation_subset_is_the_same_images_on_every_pass(demo_mds):
    """Streaming draws another subset each epoch; kNN banks, probes and caches need the same images every time."""
    from magma_composer.data.loader import build_image_dataloader

    def indices(loader):  # in the order they come
        return [int(i) for batch in loader for i in batch[2]]

    common = dict(num_workers=0, return_index=True, remote=str(demo_mds), image_size=32, max_samples=40)
    evaluation = build_image_dataloader(10, train=False, split="test", **common)
    first = indices(evaluation)
    assert len(first) == 40 and indices(evaluation) == first and indices(evaluation) == first  # same order too
    whole = build_image_dataloader(10, train=False, split="test", **{**common, "max_samples": None})
    passes = [indices(whole) for _ in range(3)]
    assert passes[0] != sorted(passes[0]) and passes[1] == passes[0] and passes[2] == passes[0]
    fresh = build_image_dataloader(10, train=False, split="test", **common)
    assert indices(fresh) == first  # and the same subset as any other evaluation with this shuffle seed
    training = build_image_dataloader(10, split="train", **common)
    epochs = [indices(training) for _ in range(3)]
    assert all(len(e) == 40 for e in epochs) and len({tuple(sorted(e)) for e in epochs}) > 1  # training redraws
