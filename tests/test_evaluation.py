"""kNN (docs/algorithms.md §4) against a direct implementation, and the linear probe."""

import math

import torch

from magma_composer.evaluation import knn_top1, linear_probe_top1


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
