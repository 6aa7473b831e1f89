"""experiments/evidence.py: the whole matrix on the demo data set with a tiny model (records, resumption, the
report's numbers against a hand computation, bad arguments), and the shipped presets' recipes."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_MODEL, load_script

SCRIPT = REPO / "experiments" / "evidence.py"


evidence = load_script(SCRIPT)


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    import os

    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def tiny_recipes(tmp_path_factory) -> Path:
    """A preset folder of the shipped layout (base.yaml + one file per method + eval.yaml) with a tiny model."""
    folder = tmp_path_factory.mktemp("recipes")
    base = {
        "seed": 0,
        "model": TINY_MODEL,
        "train_data": {"remote": "unset", "split": "train", "batch_size": 16, "num_workers": 0},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"warmup": "0.25dur"},
        "max_duration": "4ba",
        "progress_bar": False,
        "cpu_threads": 1,
    }
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    (folder / "mae.yaml").write_text("base: base.yaml\n")
    magma = {"reference_layers": [2], "target_layer": 3, "weight": {"type": "constant", "value": 1.0}}
    mu = {"base": "base.yaml", "algorithms": {"magma": magma, "uniformity": {"weight": 0.01}}}
    (folder / "mu-mae.yaml").write_text(yaml.safe_dump(mu))
    evaluation = {
        "train_data": {"split": "train", "batch_size": 80, "num_workers": 0, "max_samples": 120, "shuffle_seed": 0},
        "test_data": {"split": "test", "batch_size": 80, "num_workers": 0},
        "features": {"pools": ["cls", "mean"]},
        "knn": {"k": [5, 10]},
        "linear_fast": {"l2": [1e-3, 1e-1], "max_iter": 30},
    }
    (folder / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    return folder


@pytest.fixture(scope="module")
def matrix(tiny_recipes, demo_mds, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The matrix run once: mae and mu-mae, seeds 0 and 1."""
    out = tmp_path_factory.mktemp("evidence") / "out"
    done = run_script("run", "--recipes", str(tiny_recipes), "--data", str(demo_mds), "--out", str(out),
                      "--methods", "mae,mu-mae", "--seeds", "0,1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def _records(out: Path) -> dict[tuple[str, int], dict]:
    records = {}
    for path in sorted((out / "cells").glob("*.json")):
        r = json.loads(path.read_text())
        records[(r["method"], r["seed"])] = r
    return records


def test_records_of_every_cell(matrix):
    out, done = matrix
    records = _records(out)
    assert sorted(records) == [("mae", 0), ("mae", 1), ("mu-mae", 0), ("mu-mae", 1)]
    assert "cell 4/4" in done.stdout and "ETA" in done.stdout
    for (method, seed), r in records.items():
        assert r["format"] == evidence.RECORD_FORMAT
        assert (
            r["recipe"]["seed"] == seed
            and r["steps"] == 4
            and r["device"] == "cpu"
            and r["precision"] in ("fp32", "amp_bf16")
        )
        assert ("magma" in r["recipe"].get("algorithms", {})) == (method == "mu-mae")
        assert r["git"]["commit"] and len(r["git"]["commit"]) == 40
        assert r["seconds"]["train"] > 0 and r["seconds"]["total"] >= r["seconds"]["train"]
        assert r["losses"]["loss/train/mae"]["first"] > 0
        for which in ("init", "trained"):
            for pool in ("cls", "mean"):
                res = r["results"][which][pool]
                assert set(res["knn"]) == {"k5", "k10"}
                assert 0 <= res["linear"] <= 100
                assert res["samples"] == {"train": 120, "test": 80}
        # the exported encoders: the initialisation differs from the trained weights
        import torch

        init = torch.load(r["encoders"]["init"], weights_only=True)
        trained = torch.load(r["encoders"]["trained"], weights_only=True)
        assert not torch.equal(init["blocks.0.attn.qkv.weight"], trained["blocks.0.attn.qkv.weight"])
    # the same seed's initialisation is the same encoder for every method (one model, one seed)
    for seed in (0, 1):
        assert records[("mae", seed)]["results"]["init"] == records[("mu-mae", seed)]["results"]["init"]
    assert records[("mae", 0)]["results"]["init"] != records[("mae", 1)]["results"]["init"]


def test_per_step_metrics_keep_magma_diagnostics(matrix):
    out, _ = matrix
    rows = [json.loads(line) for line in (out / "cells" / "mu-mae-s0.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:  # each step has its loss and the MAGMA term, weight and norms
        for key in ("loss/train/mae", "loss/train/magma", "magma/term", "magma/weight", "magma/target_norm",
                    "magma/reference_norm", "uniformity/term"):  # fmt: skip
            assert key in r, (r["step"], key)
        assert r["magma/weight"] == 1.0
        assert r["loss/train/magma"] == pytest.approx(r["magma/term"], rel=1e-5)
    mae_rows = (out / "cells" / "mae-s0.metrics.jsonl").read_text()
    assert "magma/" not in mae_rows and "loss/train/mae" in mae_rows


def test_second_run_recomputes_nothing(matrix, tiny_recipes, demo_mds, capsys):
    out, _ = matrix
    before = {p: p.read_bytes() for p in (out / "cells").iterdir()}
    base = ["run", "--recipes", str(tiny_recipes), "--data", str(demo_mds), "--out", str(out)]
    assert evidence.main([*base, "--methods", "mae,mu-mae", "--seeds", "0,1"]) == 0
    assert "4 already done, 0 to run" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (out / "cells").iterdir()} == before
    # another budget is refused in this folder rather than mixed with the records
    assert evidence.main([*base, "--methods", "mae", "--seeds", "0", "--set", "max_duration=5ba"]) == 2
    assert "another recipe or evaluation" in capsys.readouterr().err


def test_reevaluate_scores_the_saved_encoders_with_a_new_evaluation(matrix, tiny_recipes, demo_mds, tmp_path, capsys):
    out, _ = matrix
    copy = tmp_path / "out"
    shutil.copytree(out / "cells", copy / "cells")  # the records point at the original folder's saved encoders
    before = _records(copy)
    base = ["run", "--recipes", str(tiny_recipes), "--data", str(demo_mds), "--out", str(copy),
            "--methods", "mae,mu-mae", "--seeds", "0,1", "--eval-set", "linear_fast.folds=3"]  # fmt: skip
    # another evaluation of the same training: refused, with the way out named
    assert evidence.main(base) == 2
    assert "add --reevaluate" in capsys.readouterr().err
    assert evidence.main([*base, "--reevaluate", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "0 already done, 4 to evaluate again, 0 to run" in printed and "would evaluate mae-s0.json" in printed
    assert _records(copy) == before
    assert evidence.main([*base, "--reevaluate"]) == 0
    assert "evaluating the saved encoders again" in capsys.readouterr().out
    after = _records(copy)
    for key, old in before.items():
        new = after[key]
        assert new["evaluation"]["linear_fast"]["folds"] == 3 and "folds" not in old["evaluation"]["linear_fast"]
        assert new["reevaluated"]["fingerprint"] == old["fingerprint"] != new["fingerprint"]
        assert new["reevaluated"]["evaluation"] == old["evaluation"]
        for field in ("recipe", "losses", "steps", "encoders", "git"):
            assert new[field] == old[field], field  # the training is kept
        assert new["seconds"]["train"] == old["seconds"]["train"]
        for which in ("init", "trained"):  # the same encoders: kNN on their features is unchanged
            for pool in ("cls", "mean"):
                assert new["results"][which][pool]["knn"] == old["results"][which][pool]["knn"]
    # now current: nothing left to do
    assert evidence.main(base) == 0
    assert "4 already done, 0 to run" in capsys.readouterr().out
    # another training is never re-evaluated, only refused
    assert evidence.main([*base, "--reevaluate", "--set", "max_duration=5ba"]) == 2
    assert "delete the record to recompute" in capsys.readouterr().err
    # a record whose encoder is gone: named before anything runs
    record = json.loads((copy / "cells" / "mae-s1.json").read_text())
    record["encoders"]["init"] = str(tmp_path / "gone.pt")
    (copy / "cells" / "mae-s1.json").write_text(json.dumps(record))
    assert evidence.main([*base[:-1], "linear_fast.folds=2", "--reevaluate"]) == 2
    assert "gone.pt is missing" in capsys.readouterr().err


def _hand_summary(records: dict, figure: tuple[str, str]) -> dict:
    pool, kind = figure

    def value(r, which):
        res = r["results"][which][pool]
        return res["linear"] if kind == "linear" else res["knn"][kind]

    out = {}
    for method in ("mae", "mu-mae"):
        trained = [value(records[(method, s)], "trained") for s in (0, 1)]
        init = [value(records[(method, s)], "init") for s in (0, 1)]
        out[method] = {
            "trained": (statistics.mean(trained), statistics.stdev(trained), min(trained), max(trained)),
            "gain": statistics.mean(t - i for t, i in zip(trained, init)),
        }
    diffs = [value(records[("mu-mae", s)], "trained") - value(records[("mae", s)], "trained") for s in (0, 1)]
    out["paired"] = (statistics.mean(diffs), statistics.stdev(diffs), sum(d > 0 for d in diffs))
    return out


def test_report_numbers_equal_a_hand_computation(matrix, tmp_path, capsys):
    out, _ = matrix
    records = _records(out)
    target = tmp_path / "report.json"
    assert evidence.main(["report", "--out", str(out), "--json", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "| mu-mae | 2 |" in printed and "paired difference to MAE" in printed
    report = json.loads(target.read_text())
    for figure, name in ((("cls", "linear"), "cls linear"), (("mean", "k10"), "mean kNN@10")):
        hand = _hand_summary(records, figure)
        for method in ("mae", "mu-mae"):
            got = report["methods"][method][name]
            assert got["trained"]["n"] == 2
            mean, std, lo, hi = hand[method]["trained"]
            assert got["trained"]["mean"] == pytest.approx(mean)
            assert got["trained"]["std"] == pytest.approx(std)
            assert (got["trained"]["min"], got["trained"]["max"]) == (lo, hi)
            assert got["gain"]["mean"] == pytest.approx(hand[method]["gain"])
        paired = report["paired_vs_mae"]["mu-mae"][name]
        assert paired["mean"] == pytest.approx(hand["paired"][0])
        assert paired["std"] == pytest.approx(hand["paired"][1])
        assert paired["positive"] == hand["paired"][2]
        # two seeds: the 95 % interval is mean +- t(0.975, df=1) * std / sqrt(2), t = 12.7062
        half = 12.7062 * hand["paired"][1] / math.sqrt(2)
        assert paired["ci95"] == pytest.approx([hand["paired"][0] - half, hand["paired"][0] + half], rel=1e-4)
        assert f"{hand['mu-mae']['trained'][0]:.2f} +- {hand['mu-mae']['trained'][1]:.2f}" in printed
    assert "mae" not in report["paired_vs_mae"]


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (60, 2.0003)])
def test_t_quantile_matches_the_tables(df, quantile):
    assert evidence.t_quantile_975(df) == pytest.approx(quantile, abs=2e-4)


def test_one_seed_has_no_interval():
    stats = evidence._stats([3.0])
    assert stats["std"] is None and stats["ci95"] is None
    stats = evidence._stats([1.0, 2.0, 3.0])
    assert stats["ci95"] == pytest.approx([2.0 - 4.3027 / math.sqrt(3), 2.0 + 4.3027 / math.sqrt(3)], rel=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--methods", "mae,vit"], "--methods: 'vit' is not a method; choose from mae, m-mae"),
        (["run", "--seeds", "0,x"], "--seeds: 'x' is not a seed"),
        (["run", "--seeds", "1,1"], "--seeds: '1,1' names a seed twice"),
        (["run", "--preset", "tpu"], "--preset: 'tpu' is not a preset; choose from cpu, gpu"),
        (["run", "--set", "max_duration"], "--set: 'max_duration' is not of the form key.path=value"),
        (["run", "--set", "model.mask_ratoi=0.5"], "unknown key 'model.mask_ratoi'"),
        (["run", "--eval-set", "features.pools=[max]"], "features.pools: ['max']"),
        (["run", "--eval-set", "knn.k=[0]"], "knn.k"),
        # a recipe that cannot build fails before the first cell, not when its own cell comes up
        (["run", "--methods", "mae,mu-mae", "--set", "model.encoder.depth=6"], "reference_layers=10 is out of range"),
        # the preset's 10,000 training images are more than the 160 of this split: refused before any training
        (["run"], "evaluation train_data.max_samples: 10000 is more than the 160 images"),
        (
            ["run", "--eval-set", "train_data.max_samples=100", "--eval-set", "test_data.max_samples=5000"],
            "evaluation test_data.max_samples: 5000 is more than",
        ),
    ],
)
def test_bad_run_arguments_are_named(args, message, demo_mds, tmp_path, capsys):
    base = ["--data", str(demo_mds), "--out", str(tmp_path / "out")]
    assert evidence.main([*args, *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evidence.py: error:") and message in err, err
    assert not (tmp_path / "out" / "cells").exists()


def test_bad_data_and_empty_report(tmp_path, capsys):
    assert evidence.main(["run", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "--data:" in capsys.readouterr().err
    assert evidence.main(["report", "--out", str(tmp_path)]) == 2
    assert "holds no cell records" in capsys.readouterr().err


def test_presets_share_one_budget_and_the_cifar10_algorithm_settings():
    from magma_composer.config import read_recipe, validate

    cifar = {m: read_recipe(REPO / "yamls" / "cifar10" / f"{m}-vit-tiny.yaml") for m in evidence.METHODS}
    for preset in evidence.PRESETS:
        folder = evidence.preset_dir(preset)
        recipes = {m: read_recipe(folder / f"{m}.yaml") for m in evidence.METHODS}
        for method, raw in recipes.items():
            validate(raw)
            shared = {k: v for k, v in raw.items() if k != "algorithms"}
            mae = {k: v for k, v in recipes["mae"].items() if k != "algorithms"}
            if method == "pmae":  # raw pixels: the basis standardises them
                assert shared["train_data"].pop("normalize") == "none"
            if preset == "cpu" and method == "pmae":  # a quarter of the shared learning rate (pmae.yaml says why)
                assert shared["optimizer"]["base_lr"] == mae["optimizer"]["base_lr"] / 4
                shared["optimizer"] = {**shared["optimizer"], "base_lr": mae["optimizer"]["base_lr"]}
            assert shared == mae, (preset, method)
            expected = cifar[method].get("algorithms", {})
            got = raw.get("algorithms", {})
            assert sorted(got) == sorted(expected), (preset, method)
            for name, options in expected.items():
                if name == "pca_masking":
                    options = {k: v for k, v in options.items() if k != "basis"}
                    if preset == "cpu":  # one mask per sample, not per batch (pmae.yaml says why)
                        options["per_sample"] = True
                    assert {k: v for k, v in got[name].items() if k != "basis"} == options
                elif name == "magma":  # the same window; the last two blocks of the preset's depth
                    depth = raw["model"]["encoder"]["depth"]
                    window = options["weight"]
                    if preset == "cpu":  # lambda 0.1 in the published window, for 450 steps (m-mae.yaml says why)
                        tenth = [[window["start"], window["end"], 0.1], [window["end"], "1dur", 1e-6]]
                        assert got[name]["weight"] == {"type": "intervals", "intervals": tenth}
                    else:
                        assert got[name]["weight"] == window
                    assert (got[name]["reference_layers"], got[name]["target_layer"]) == ([depth - 2], depth - 1)
                else:
                    assert got[name] == options
        evaluation = evidence.evaluation_settings(folder, "data/cifar10-mds", [], raw_pixels=True)
        for split in ("train_data", "test_data"):  # the command's data, raw pixels for PMAE
            assert evaluation[split]["remote"] == "data/cifar10-mds" and evaluation[split]["normalize"] == "none"
        assert evaluation["features"]["pools"][0] == "cls"


def test_project_turns_a_step_time_into_wall_time(capsys):
    recipe = str(REPO / "yamls" / "imagenet" / "mae-vitb16.yaml")
    row = evidence.project_recipe(recipe, step_seconds=0.5, gpus=8, dataset_size=None)
    raw = yaml.safe_load(Path(recipe).read_text())
    global_batch = raw["train_data"]["batch_size"] * 8
    epochs = int(str(raw["max_duration"]).removesuffix("ep"))
    assert row["steps"] == (1_281_167 // global_batch) * epochs
    assert row["hours"] == pytest.approx(row["steps"] * 0.5 / 3600)
    assert row["gpu_hours"] == pytest.approx(row["hours"] * 8)
    assert evidence.main(["project", "--step-seconds", "0.5", "--recipes", recipe, "--gpus", "8"]) == 0
    assert f"{row['steps']:>9}" in capsys.readouterr().out
    assert evidence.main(["project", "--step-seconds", "-1"]) == 2
    assert "--step-seconds: must be a positive number" in capsys.readouterr().err


@pytest.mark.slow
def test_pmae_cell_fits_its_basis_once_and_evaluates_raw_pixels(tiny_recipes, demo_mds, tmp_path, capsys):
    pmae = {
        "base": "base.yaml",
        "train_data": {"normalize": "none"},
        "algorithms": {"pca_masking": {"basis": "unset.pt", "ratio": 0.2, "per_sample": False, "residual": "drop"}},
    }
    (tiny_recipes / "pmae.yaml").write_text(yaml.safe_dump(pmae))
    out = tmp_path / "out"
    args = ["run", "--recipes", str(tiny_recipes), "--data", str(demo_mds), "--out", str(out), "--seeds", "0"]
    done = run_script(*args, "--methods", "pmae")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fitting the PCA basis" in done.stdout
    basis = out / "basis-32.pt"
    record = json.loads((out / "cells" / "pmae-s0.json").read_text())
    assert record["basis"] == str(basis) and record["recipe"]["algorithms"]["pca_masking"]["basis"] == str(basis)
    assert record["evaluation"]["train_data"]["normalize"] == "none"
    assert record["results"]["init"]["cls"]["linear"] >= 0
    # each step's row holds its own loss and its own mask's monitor (logged inside the step, at AFTER_LOSS)
    from magma_composer.algorithms.pca_masking import mask_generator, sample_component_mask
    from magma_composer.pca import load_basis

    ratios = load_basis(basis).ratios
    rows = [json.loads(line) for line in (out / "cells" / "pmae-s0.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(record["steps"]))
    for r in rows:
        masked = sample_component_mask(ratios, mask_generator(0, r["step"], 0, 0), ratio=0.2)
        assert r["pca_masking/masked_components"] == int(masked.sum()), r["step"]
        assert math.isfinite(r["loss/train/pmae"])
    # the basis is fitted once: a resumed run finds it
    assert evidence.main([*args, "--methods", "pmae"]) == 0
    printed = capsys.readouterr().out
    assert "fitting the PCA basis" not in printed and "1 already done" in printed
    assert evidence.main([*args, "--methods", "pmae", "--basis", str(tmp_path / "missing.pt")]) == 2
    assert "--basis:" in capsys.readouterr().err


def test_dry_run_checks_and_lists_the_cells_without_work(tiny_recipes, demo_mds, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", "--recipes", str(tiny_recipes), "--data", str(demo_mds), "--out", str(out), "--dry-run"]
    assert evidence.main([*args, "--methods", "mae,mu-mae", "--seeds", "3,4"]) == 0
    printed = capsys.readouterr().out
    assert "4 cells (mae x 2, mu-mae x 2 seeds)" in printed
    assert "would run mu-mae seed 4: 4ba of 16" in printed and "algorithms magma, uniformity" in printed
    assert not (out / "cells").exists() and not (out / "encoders").exists()


def test_report_pairs_a_follow_up_with_another_matrix_baseline(matrix, tmp_path, capsys):
    """A follow-up run (here: the mu-mae cells alone) reports against the main matrix's MAE cells, as one matrix."""
    out, _ = matrix
    follow = tmp_path / "follow"
    (follow / "cells").mkdir(parents=True)
    for path in (out / "cells").glob("mu-mae-s*.json"):
        shutil.copy(path, follow / "cells" / path.name)
    whole, paired = tmp_path / "whole.json", tmp_path / "paired.json"
    assert evidence.main(["report", "--out", str(out), "--json", str(whole)]) == 0
    assert evidence.main(["report", "--out", str(follow), "--baseline", str(out), "--json", str(paired)]) == 0
    assert f"mae from {out}, the rest from {follow}" in capsys.readouterr().out
    whole, paired = json.loads(whole.read_text()), json.loads(paired.read_text())
    assert paired["baseline"] == {"out": str(out), "methods": ["mae"]}
    assert paired["methods"] == whole["methods"] and paired["paired_vs_mae"] == whole["paired_vs_mae"]

    def refused(args, message):
        assert evidence.main(["report", *args]) == 2
        err = capsys.readouterr().err
        assert message in err, err

    refused(["--out", str(out), "--baseline", str(out)], "mae seed 0 is in both")
    refused(["--out", str(follow), "--baseline", str(out), "--baseline-methods", "u-mae"], "has no u-mae cell")
    refused(["--out", str(follow), "--baseline-methods", "mae"], "--baseline-methods: needs --baseline")
    refused(["--out", str(follow), "--baseline", str(out), "--baseline-methods", "vit"], "'vit' is not a method")
    other = tmp_path / "other"
    (other / "cells").mkdir(parents=True)
    record = json.loads((out / "cells" / "mae-s0.json").read_text())
    record["evaluation"]["knn"]["k"] = [1]
    (other / "cells" / "mae-s0.json").write_text(json.dumps(record))
    refused(["--out", str(follow), "--baseline", str(other)], "was evaluated with other settings")


def test_a_folders_matrix_yaml_is_the_default_matrix(tiny_recipes, demo_mds, tmp_path, capsys):
    """Without --methods and --seeds a run trains matrix.yaml's cells; --seeds applies to every method named."""
    recipes = tmp_path / "recipes"
    shutil.copytree(tiny_recipes, recipes)
    (recipes / "pmae.yaml").unlink(missing_ok=True)  # another test adds it to the shared folder
    base = ["run", "--recipes", str(recipes), "--data", str(demo_mds), "--out", str(tmp_path / "out"), "--dry-run"]
    assert evidence.main(base) == 0  # no matrix.yaml: seeds 0, 1 and 2 of every method with a recipe
    assert "6 cells (mae x 3, mu-mae x 3 seeds)" in capsys.readouterr().out
    (recipes / "matrix.yaml").write_text("seeds:\n  mu-mae: [4, 5, 6]\n  mae: [1]\n")
    assert evidence.main(base) == 0
    printed = capsys.readouterr().out
    assert "4 cells (mae x 1, mu-mae x 3 seeds)" in printed
    assert "would run mae seed 1:" in printed and "would run mu-mae seed 6:" in printed
    assert "would run mae seed 0:" not in printed
    assert evidence.main([*base, "--seeds", "7"]) == 0
    assert "2 cells (mae x 1, mu-mae x 1 seeds)" in capsys.readouterr().out
    assert evidence.main([*base, "--methods", "mu-mae"]) == 0
    assert "3 cells (mu-mae x 3 seeds)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, message",
    [
        ("seeds:\n  vit: [0]\n", "seeds.vit: 'vit' is not a method; choose from mae"),
        ("seeds:\n  mae: [0, x]\n", "seeds.mae: 'x' is not a seed"),
        ("seeds:\n  mae: [-1]\n", "seeds.mae: '-1' is not a seed"),
        ("seeds:\n  mae: [0, 0]\n", "seeds.mae: '0,0' names a seed twice"),
        ("seeds:\n  mae: []\n", "seeds.mae: [] is not a non-empty list of seeds"),
        ("seeds:\n  mae: [0]\nsteps: 5\n", "unknown key 'steps'; the file has one key, seeds"),
        ("mae: [0]\n", "expected a key seeds: a mapping of method to a list of seeds"),
        ("seeds: [0, 1\n", "not valid YAML"),
        ("seeds:\n  mae: [0]\n", "--methods: mu-mae has no seeds in"),  # a method the matrix lacks needs --seeds
    ],
)
def test_a_bad_matrix_yaml_is_named(text, message, tiny_recipes, demo_mds, tmp_path, capsys):
    recipes = tmp_path / "recipes"
    shutil.copytree(tiny_recipes, recipes)
    (recipes / "matrix.yaml").write_text(text)
    args = ["run", "--recipes", str(recipes), "--data", str(demo_mds), "--out", str(tmp_path / "out"), "--dry-run"]
    assert evidence.main([*args, "--methods", "mae,mu-mae"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evidence.py: error:") and message in err and "matrix.yaml" in err, err


def test_the_shipped_matrices_and_a_report_of_one(matrix, tmp_path, monkeypatch, capsys):
    """The CPU preset has at least 3 seeds for MAE and MU-MAE and 2 for the rest; `report --preset` keeps the
    preset matrix's cells of a folder that holds more."""
    for preset in evidence.PRESETS:
        seeds = evidence.read_matrix(evidence.preset_dir(preset))
        assert list(seeds) == list(evidence.METHODS), preset
        assert min(len(seeds["mae"]), len(seeds["mu-mae"])) >= 3 and min(map(len, seeds.values())) >= 2, preset
    out, _ = matrix  # mae and mu-mae, seeds 0 and 1
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    (chosen / "matrix.yaml").write_text("seeds:\n  mae: [0, 1]\n  mu-mae: [1]\n")
    monkeypatch.setattr(evidence, "preset_dir", lambda preset: chosen)
    assert evidence.main(["report", "--out", str(out), "--preset", "cpu", "--json", str(tmp_path / "r.json")]) == 0
    assert "matrix only: mae seeds 0,1, mu-mae seeds 1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["methods"]["mae"]["seeds"] == [0, 1] and summary["methods"]["mu-mae"]["seeds"] == [1]
    assert summary["paired_vs_mae"]["mu-mae"]["seeds"] == [1]
    follow = tmp_path / "follow"  # a follow-up's cells and the baseline's are both cut to the matrix
    (follow / "cells").mkdir(parents=True)
    for path in (out / "cells").glob("mu-mae-s*.json"):
        shutil.copy(path, follow / "cells" / path.name)
    (chosen / "matrix.yaml").write_text("seeds:\n  mae: [1]\n  mu-mae: [0, 1]\n")
    args = [
        "report",
        "--out",
        str(follow),
        "--baseline",
        str(out),
        "--preset",
        "cpu",
        "--json",
        str(tmp_path / "f.json"),
    ]
    assert evidence.main(args) == 0
    summary = json.loads((tmp_path / "f.json").read_text())
    assert summary["methods"]["mae"]["seeds"] == [1] and summary["methods"]["mu-mae"]["seeds"] == [0, 1]
    assert summary["paired_vs_mae"]["mu-mae"]["seeds"] == [1]
    capsys.readouterr()
    (chosen / "matrix.yaml").write_text("seeds:\n  pmae: [0]\n")
    assert evidence.main(["report", "--out", str(out), "--preset", "cpu"]) == 2
    assert "holds no cell of the cpu preset's matrix" in capsys.readouterr().err
