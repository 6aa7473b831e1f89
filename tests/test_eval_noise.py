"""experiments/eval_noise.py: the evaluation's noise in a gain, on the demo data with two tiny encoders."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, TINY_MODEL, load_script

noise = load_script(REPO / "experiments" / "eval_noise.py")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from magma_composer.checkpoints import export_encoder
    from magma_composer.models import ComposerMAE

    folder = tmp_path_factory.mktemp("encoders")
    paths = []
    for seed in (0, 1):  # two different encoders stand for an initialisation and a trained one
        torch.manual_seed(seed)
        model = ComposerMAE(**TINY_MODEL)
        export_encoder(model, str(folder / f"e{seed}.pt"))
        paths.append(str(folder / f"e{seed}.pt"))
    return paths


def test_gains_per_draw_equal_a_direct_computation(encoders, demo_mds, tmp_path, capsys):
    from magma_composer.evaluate.linear import FastLinearProbe

    cache = str(tmp_path / "cache")
    args = ["--init", encoders[0], "--trained", encoders[1], "--data", str(demo_mds), "--cache", cache,
            "--protocol", "heldout", "--protocol", "l2=1e-3", "--protocol", "knn",
            "--pool", "mean", "--pool", "cls", "--draws", "3", "--train-samples", "100",
            "--test-samples", "40", "--test-samples", "0"]  # fmt: skip
    assert noise.main(args) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "test images:" in line]
    assert len(lines) == 2 * 3 * 2  # pools x protocols x test sizes
    # draw 1, l2 = 1e-3, mean pool, all 80 test images, by hand from the cached features
    feats = {tag: noise.features(path, None, str(demo_mds), ["mean"], cache) for tag, path in
             zip(("init", "trained"), encoders)}  # fmt: skip
    g = torch.Generator().manual_seed(1001)
    train_idx = torch.randperm(160, generator=g)[:100]
    top = {}
    for tag in ("init", "trained"):
        (tx, ty), (ex, ey) = feats[tag]["train", "mean"], feats[tag]["test", "mean"]
        top[tag] = FastLinearProbe(l2=1e-3).run(tx[train_idx], ty[train_idx], ex, ey)["top1"]
    line = next(line for line in lines if line.startswith("mean  l2=1e-3") and "    80 test" in line)
    values = [float(v) for v in line.split("[")[1].rstrip("]").split(", ")]
    assert len(values) == 3 and values[1] == pytest.approx(top["trained"] - top["init"], abs=0.006)
    mean, std = line.split(":")[1].split("[")[0].split("+-")
    assert float(mean) == pytest.approx(sum(values) / 3, abs=0.01) and float(std) >= 0


def test_bad_arguments_are_one_line(encoders, demo_mds, tmp_path, capsys):
    base = ["--init", encoders[0], "--trained", encoders[1], "--data", str(demo_mds), "--cache", str(tmp_path)]
    base += ["--train-samples", "100"]
    cases = [
        (["--protocol", "bogus"], "not a protocol"),
        (["--protocol", "l2=-1"], "--protocol l2=-1"),
        (["--protocol", "folds=0"], "--protocol folds=0"),
        (["--pool", "max"], "--pool: 'max'"),
        (["--draws", "1"], "at least 2 draws"),
        (["--train-samples", "1000"], "the training split has 160 images"),  # the last one given counts
        (["--test-samples", "81"], "give 0 (all) to 80"),
    ]
    for extra, expected in cases:
        assert noise.main([*base, *extra]) == 2
        assert expected in capsys.readouterr().err, extra
    assert noise.main(["--init", str(tmp_path / "nope.pt"), "--trained", encoders[1], "--data", str(demo_mds)]) == 2
    assert "nope.pt does not exist" in capsys.readouterr().err
