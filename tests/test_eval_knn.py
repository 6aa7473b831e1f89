"""The kNN grid (docs/algorithms.md §4) against a direct per-query implementation, and its guards."""

import math

import pytest
import torch

from magma_composer.evaluate.knn import KNNProtocol, knn_grid
from magma_composer.options import OptionError


def brute_knn(train, ytrain, test, ytest, k, t, distance):
    """Per query: sort the bank, vote, rank the classes (higher score first, ties to the lower class)."""
    hits1 = hits5 = 0
    train, test = train.double(), test.double()
    for q, yq in zip(test, ytest):
        if distance == "cosine":
            keys = [float(torch.dot(q / q.norm(), x / x.norm())) for x in train]
            order = sorted(range(len(train)), key=lambda i: -keys[i])[:k]
            weight = {i: math.exp(keys[i] / t) for i in order}
        else:
            keys = [float((q - x).norm()) for x in train]
            order = sorted(range(len(train)), key=lambda i: keys[i])[:k]
            weight = {i: 1.0 / (keys[i] + 1e-8) for i in order}
        votes = {}
        for i in order:
            votes[int(ytrain[i])] = votes.get(int(ytrain[i]), 0.0) + weight[i]
        ranking = sorted(votes, key=lambda c: (-votes[c], c))
        hits1 += ranking[0] == int(yq)
        hits5 += int(yq) in ranking[:5]
    return 100.0 * hits1 / len(test), 100.0 * hits5 / len(test)


def clusters(seed, n_train=80, n_test=30, classes=7, dim=6, noise=1.2):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g)
    ytrain = torch.arange(n_train) % classes
    ytest = torch.randint(0, classes, (n_test,), generator=g)
    train = centres[ytrain] + noise * torch.randn(n_train, dim, generator=g)
    test = centres[ytest] + noise * torch.randn(n_test, dim, generator=g)
    return train, ytrain, test, ytest


def test_grid_matches_direct_computation_for_both_distances():
    train, ytrain, test, ytest = clusters(0)
    grid = knn_grid(
        train, ytrain, test, ytest, k=[1, 5, 12], temperature=[0.07, 0.5], distance=["cosine", "euclidean"], chunk=7
    )
    expected_points = [("cosine", k, t) for k in (1, 5, 12) for t in (0.07, 0.5)] + [
        ("euclidean", k, None) for k in (1, 5, 12)
    ]
    assert [(r["distance"], r["k"], r["temperature"]) for r in grid] == expected_points
    for r in grid:
        top1, top5 = brute_knn(train, ytrain, test, ytest, r["k"], r["temperature"], r["distance"])
        assert r["top1"] == pytest.approx(top1, abs=1e-9), r
        assert r["top5"] == pytest.approx(top5, abs=1e-9), r
        assert r["top1"] <= r["top5"]
    # the data have structure, and the two distances really differ somewhere
    assert max(r["top1"] for r in grid) > 100 / 7 * 2
    assert grid[0]["top5"] > grid[0]["top1"] or grid[2]["top5"] > grid[2]["top1"]


def test_chunking_and_k_beyond_the_bank_change_nothing():
    train, ytrain, test, ytest = clusters(1, n_train=20)
    one = knn_grid(train, ytrain, test, ytest, k=[5, 20, 500], distance=["cosine", "euclidean"], chunk=1)
    many = knn_grid(train, ytrain, test, ytest, k=[5, 20, 500], distance=["cosine", "euclidean"], chunk=1000)
    assert one == many
    by_k = {(r["distance"], r["k"]): r["top1"] for r in one}
    assert by_k[("cosine", 20)] == by_k[("cosine", 500)]  # k capped at the bank size


def test_euclidean_votes_do_not_depend_on_the_feature_scale():
    train, ytrain, test, ytest = clusters(2)
    a = knn_grid(train, ytrain, test, ytest, k=[3, 10], distance="euclidean")
    b = knn_grid(37.0 * train, ytrain, 37.0 * test, ytest, k=[3, 10], distance="euclidean")
    assert [r["top1"] for r in a] == [r["top1"] for r in b]


def test_guards():
    train, ytrain, test, ytest = clusters(3, classes=4)
    with pytest.raises(ValueError, match=r"test labels 9 never occur"):
        knn_grid(train, ytrain, test, torch.where(ytest == 0, 9, ytest))
    # allowed for a monitor: those queries count as errors
    unseen = knn_grid(train, ytrain, test, torch.full_like(ytest, 9), k=1, allow_unseen_classes=True)
    assert unseen[0]["top1"] == 0.0
    with pytest.raises(ValueError, match="no labels"):
        knn_grid(train, torch.full_like(ytrain, -1), test, ytest)
    with pytest.raises(ValueError, match="no samples"):
        knn_grid(train[:0], ytrain[:0], test, ytest)
    with pytest.raises(ValueError, match="dimensions"):
        knn_grid(train, ytrain, test[:, :3], ytest)
    with pytest.raises(ValueError, match="integers"):
        knn_grid(train, ytrain.float(), test, ytest)
    with pytest.raises(OptionError, match=r"k\[1\]"):
        knn_grid(train, ytrain, test, ytest, k=[5, 0])
    with pytest.raises(OptionError, match="temperature"):
        knn_grid(train, ytrain, test, ytest, temperature=0.0)
    with pytest.raises(OptionError, match="distance"):
        knn_grid(train, ytrain, test, ytest, distance=["manhattan"])
    with pytest.raises(OptionError, match="k: must name"):
        knn_grid(train, ytrain, test, ytest, k=[])


def test_protocol_headline_is_the_first_grid_point():
    train, ytrain, test, ytest = clusters(4)
    protocol = KNNProtocol(k=[20, 1], temperature=[0.1], distance=["euclidean", "cosine"])
    result = protocol.run(train, ytrain, test, ytest)
    assert result["grid"] == knn_grid(
        train, ytrain, test, ytest, k=[20, 1], temperature=[0.1], distance=["euclidean", "cosine"]
    )
    assert (result["distance"], result["k"], result["temperature"]) == ("euclidean", 20, None)
    assert result["top1"] == result["grid"][0]["top1"] and result["top5"] == result["grid"][0]["top5"]
    assert protocol.settings() == {"k": [20, 1], "temperature": [0.1], "distance": ["euclidean", "cosine"]}
    with pytest.raises(OptionError, match="distance"):
        KNNProtocol(distance="cos")
    with pytest.raises(OptionError, match="chunk"):
        KNNProtocol(chunk=0)
