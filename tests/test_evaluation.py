"""The monitors' forms: kNN (docs/algorithms.md §4) against a direct implementation, the fast linear probe, and the
KNNMonitor's linear-probe and pooling options in a real run."""

import math

import pytest
import torch

from magma_composer.callbacks.knn_monitor import KNNMonitor
from magma_composer.config import validate
from magma_composer.evaluation import knn_top1, linear_probe_top1
from magma_composer.options import OptionError
from magma_composer.train import build_trainer
from tests.conftest import tiny_recipe


def brute_knn(train, ytrain, test, ytest, k, t):
    correct = 0
    for q, yq in zip(test, ytest):
        sims = [float(torch.dot(q / q.norm(), x / x.norm())) for x in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = {}
        for i in order:
            votes[int(ytrain[i])] = votes.get(int(ytrain[i]), 0.0) + math.exp(sims[i] / t)
        correct += max(votes, key=votes.get) == int(yq)
    return 100.0 * correct / len(test)


def test_knn_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)
    ytrain, ytest = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    train = centres[ytrain] + 0.9 * torch.randn(60, 8, generator=g)
    test = centres[ytest] + 0.9 * torch.randn(25, 8, generator=g)
    result = knn_top1(train, ytrain, test, ytest, k=[1, 5, 10], temperature=0.07, chunk=7)
    for k in (1, 5, 10):
        assert result[k] == brute_knn(train, ytrain, test, ytest, k, 0.07)
    assert 40 < result[10] <= 100


def test_linear_probe_separable():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 5, generator=g) * 0.1
    x[torch.arange(300), y] += 2.0
    assert linear_probe_top1(x[:200], y[:200], x[200:], y[200:]) == 100.0
    # a monitor's figure: test classes missing from the bank count as errors instead of stopping the run
    assert linear_probe_top1(x[:200], y[:200].clamp_max(1), x[200:], y[200:]) < 100.0


def test_knn_top1_counts_classes_missing_from_the_bank_as_errors():
    train, ytrain = torch.eye(4), torch.arange(4)
    test, ytest = torch.eye(4)[[0, 1, 2]], torch.tensor([0, 1, 7])
    assert knn_top1(train, ytrain, test, ytest, k=[1]) == {1: pytest.approx(200.0 / 3)}


def test_knn_monitor_linear_probe_and_mean_pooling(demo_mds):
    recipe = tiny_recipe(
        demo_mds,
        eval_data={"remote": str(demo_mds), "split": "test", "batch_size": 40, "num_workers": 0},
        callbacks={"knn_monitor": {"k": [5], "linear_probe": True, "pool": "mean"}},
        max_duration="2ba",
    )
    trainer = build_trainer(validate(recipe))
    seen_pools = []
    mae = trainer.state.model
    original = mae.extract_features

    def spy(images, pool="cls"):
        seen_pools.append(pool)
        return original(images, pool=pool)

    mae.extract_features = spy
    trainer.fit()
    trainer.close()
    knn = next(cb for cb in trainer.state.callbacks if isinstance(cb, KNNMonitor))
    assert seen_pools and set(seen_pools) == {"mean"}
    assert [label for label, _ in knn.probe_history] == ["init", "final"]
    assert all(0.0 <= v <= 100.0 for _, v in knn.probe_history)
    lines = knn.summary().splitlines()
    # the summary says which features it measured
    assert lines[0].startswith("kNN top-1 (k=5) on the mean of the patch tokens: init ")
    assert lines[1] == "linear-probe top-1 on the mean of the patch tokens: " + "  ->  ".join(
        f"{lb} {v:.2f} %" for lb, v in knn.probe_history
    )
    with pytest.raises(OptionError, match="pool"):
        KNNMonitor(None, None, pool="max")


def test_a_capped_knn_monitor_measures_the_same_images_every_time(demo_mds):
    """The caps take the first N images of a pass; an evaluation pass is the same images in the same order each time,
    so a start-to-end gain compares one encoder on one subset, not two subsets."""
    recipe = tiny_recipe(
        demo_mds,
        eval_data={"remote": str(demo_mds), "split": "test", "batch_size": 10, "num_workers": 0},
        callbacks={"knn_monitor": {"k": [5], "max_train_samples": 30, "max_test_samples": 20}},
        max_duration="1ba",
    )
    trainer = build_trainer(validate(recipe))
    try:
        knn = next(cb for cb in trainer.state.callbacks if isinstance(cb, KNNMonitor))
        model = trainer.state.model
        measurements = [knn.features(model, torch.device("cpu")) for _ in range(3)]
    finally:
        trainer.close()
    (bank, bank_labels), (query, query_labels) = measurements[0]
    assert len(bank) == 30 and len(query) == 20
    assert len(set(bank_labels.tolist())) > 1  # a shuffled subset, not the first class of the split
    for (b, bl), (q, ql) in measurements[1:]:
        assert torch.equal(bl, bank_labels) and torch.equal(b, bank)
        assert torch.equal(ql, query_labels) and torch.equal(q, query)
