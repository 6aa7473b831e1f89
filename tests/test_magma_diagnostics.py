"""experiments/magma_diagnostics.py: the original MAGMA formula (hand case, exact agreement with ours), the term's
anatomy, the magnitude measurement on real shards, the metrics reader and plots, the per-step trace of a real run,
and the diagnostics MAGMA logs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from magma_composer.algorithms.magma import magma_loss
from magma_composer.algorithms.magma.magma import _diagnostics
from tests.conftest import REPO, TINY_MODEL, load_script, tiny_recipe

SCRIPT = REPO / "experiments" / "magma_diagnostics.py"


diag = load_script(SCRIPT)


def _hand_term(xs: list[float], ys: list[float]) -> float:
    """The original formula for 1-D features, in plain Python."""
    b = len(xs)
    d2 = [[(xs[i] - xs[j]) ** 2 for j in range(b)] for i in range(b)]
    values = [v for row in d2 for v in row if v != 0]
    mean = sum(values) / len(values)
    gamma = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    w = [[0.0 if i == j else math.exp(-d2[i][j] / gamma) for j in range(b)] for i in range(b)]
    s = [1 / math.sqrt(1e-4 + sum(w[i])) for i in range(b)]
    lap = [[(1.0 if i == j else 0.0) - s[i] * w[i][j] * s[j] for j in range(b)] for i in range(b)]
    return sum(ys[i] * lap[i][j] * ys[j] for i in range(b) for j in range(b)) / b**2


def test_original_formula_on_a_hand_case():
    xs, ys = [0.0, 1.0, 3.0], [1.0, 2.0, 4.0]
    expected = _hand_term(xs, ys)
    x = torch.tensor(xs, dtype=torch.float64).unsqueeze(1)
    y = torch.tensor(ys, dtype=torch.float64).unsqueeze(1)
    term, gamma = diag.original_magma_term(x, y)
    assert float(term) == pytest.approx(expected, rel=1e-12)
    # gamma: the unbiased std of (1, 9, 4) twice
    assert float(gamma) == pytest.approx(math.sqrt(588 / 45), rel=1e-12)
    assert float(magma_loss(x, y)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kwargs", [{}, {"rbf_scale": 0.5}, {"fixed_gamma": 3.0}])
def test_original_formula_equals_ours_exactly(kwargs):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64) + 5.0
    y = torch.randn(40, 9, generator=g, dtype=torch.float64) * 3.0 - 2.0
    theirs, _ = diag.original_magma_term(x, y, **kwargs)
    ours = magma_loss(x, y, rbf_scale=kwargs.get("rbf_scale", 1.0), gamma=kwargs.get("fixed_gamma"))
    assert float(theirs) == pytest.approx(float(ours), rel=1e-10)


def test_half_products_round_but_stay_close_on_unit_scale_features():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    full, _ = diag.original_magma_term(x, y)
    half, _ = diag.original_magma_term(x, y, half_products=True)
    assert float(half) != float(full)  # rounded to float16
    assert float(half) == pytest.approx(float(full), rel=2e-3)


def test_anatomy_parts_add_up_and_match_the_term():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randn(30, 6, generator=g, dtype=torch.float64) + 4.0  # a large shared mean
    a = diag.term_anatomy(x, y)
    assert a["mean_part"] + a["cross_part"] + a["centred_part"] == pytest.approx(a["term"], rel=1e-10)
    assert a["term"] == pytest.approx(float(magma_loss(x, y)), rel=1e-10)
    assert a["rayleigh"] == pytest.approx(a["term"] / a["identity_value"], rel=1e-12)
    assert a["identity_value"] == pytest.approx(float((y * y).sum()) / 30**2, rel=1e-12)
    assert a["target_mean_norm"] == pytest.approx(float(y.mean(0).norm()), rel=1e-12)


def test_anatomy_of_a_graph_without_weight_is_the_identity():
    # equidistant reference points with a tiny spread of distances: D2 / gamma is huge, W ~ 0, so L = I
    g = torch.Generator().manual_seed(3)
    x = 100.0 * torch.eye(20, dtype=torch.float64) + 1e-3 * torch.randn(20, 20, generator=g, dtype=torch.float64)
    y = torch.randn(20, 5, generator=g, dtype=torch.float64)
    a = diag.term_anatomy(x, y)
    assert a["mean_affinity"] < 1e-30 and a["d2_mean_over_gamma"] > 100
    assert a["rayleigh"] == pytest.approx(1.0, abs=1e-9)


def test_magma_logged_diagnostics_are_what_they_say():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g) + 2.0
    value, stats = magma_loss(x, y, return_stats=True)
    d = _diagnostics(x, y, value, stats)
    assert float(d["rayleigh"]) == pytest.approx(float(value) * 16**2 / float((y * y).sum()), rel=1e-5)
    assert float(d["reference_norm"]) == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-6)
    assert float(d["target_norm"]) == pytest.approx(float(y.norm(dim=1).mean()), rel=1e-6)
    assert float(d["target_spread"]) == pytest.approx(float((y - y.mean(0)).norm(dim=1).mean()), rel=1e-6)
    assert float(d["gamma"]) == float(stats.gamma) and float(d["mean_affinity"]) == float(stats.mean_affinity)
    assert not any(t.requires_grad for t in d.values())


def test_magnitude_on_real_shards_agrees_with_the_original(demo_mds):
    encoder = json.dumps(TINY_MODEL["encoder"])
    result = diag.measure_magnitude(
        encoder=encoder,
        img_size=32,
        patch_size=8,
        batch=24,
        data=str(demo_mds),
        reference=1,
        target=-1,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
    )
    assert result["width"] == 32 and result["batch"] == 24
    assert result["ratio_original_fp32_to_ours"] == pytest.approx(1.0, rel=1e-5)
    assert result["ratio_original_fp16_to_ours"] == pytest.approx(1.0, rel=1e-2)
    assert result["anatomy"]["term"] == pytest.approx(result["ours"], rel=1e-5)
    assert result["mae_loss"] > 0 and result["grad_norm_mae"] > 0 and result["grad_norm_magma"] > 0
    assert result["grad_ratio_magma_to_mae"] == pytest.approx(result["grad_norm_magma"] / result["grad_norm_mae"])


def _write(path, text):
    path.write_text(text)
    return path


def test_read_metrics_accepts_jsonl_json_lists_records_and_file_logger_text(tmp_path):
    jsonl = _write(
        tmp_path / "a.jsonl",
        '{"step": 1, "magma/term": 0.5}\n\n{"step": 0, "magma/term": 2.0, "note": "x"}\n{"step": 1, "lr": 0.1}\n',
    )
    assert diag.read_metrics(jsonl) == {0: {"magma/term": 2.0}, 1: {"magma/term": 0.5, "lr": 0.1}}
    listed = _write(tmp_path / "b.json", json.dumps([{"batch": 3, "a": 1}, {"batch": 2, "a": 2}]))
    assert list(diag.read_metrics(listed).items()) == [(2, {"a": 2.0}), (3, {"a": 1.0})]
    record = _write(tmp_path / "c.json", json.dumps({"metrics": [{"step": 0, "a": 1.5}]}))
    assert diag.read_metrics(record) == {0: {"a": 1.5}}
    text = (
        "[hyperparameter]: seed: 3 \n"
        "[metric][batch=0]: loss/train/mae: 1.2345 \n"
        "[metric][batch=0]: magma/term: 0.0012 \n"
        '[metric][batch=1]: run_name: "x" \n'
        "[metric][batch=1]: loss/train/mae: 1.1000 \n"
    )
    logged = diag.read_metrics(_write(tmp_path / "log.txt", text))
    assert logged == {0: {"loss/train/mae": 1.2345, "magma/term": 0.0012}, 1: {"loss/train/mae": 1.1}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"step": 0, "a": 1}\nnot json\n', "line 2: not JSON"),
        ('{"a": 1}\n', "integer 'step'"),
        ("[]", "no per-step metrics"),
    ],
)
def test_read_metrics_refuses_other_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        diag.read_metrics(_write(tmp_path / "bad.jsonl", text))


def test_plot_overlays_runs_into_a_png(tmp_path):
    rows_a = [{"step": s, "magma/term": 3.0 / (s + 1), "magma/weight": 1.0, "loss/train/mae": 1.8} for s in range(5)]
    rows_b = [{"step": s, "loss/train/mae": 1.7 - 0.01 * s, "uniformity/term": 0.3} for s in range(5)]
    a = _write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows_a))
    b = _write(tmp_path / "b.jsonl", "".join(json.dumps(r) + "\n" for r in rows_b))
    png = diag.plot_metrics([a, b], tmp_path / "out", labels=["m-mae", "mae"], name="x.png")
    assert png == tmp_path / "out" / "x.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="2 metrics files"):
        diag.plot_metrics([a, b], tmp_path, labels=["one"])
    with pytest.raises(ValueError, match="logged any of"):
        diag.plot_metrics([_write(tmp_path / "c.jsonl", '{"step": 0, "other": 1}\n')], tmp_path)


def test_plot_command_reports_a_bad_file_without_a_traceback(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", "oops\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "plot", str(bad), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "plot:" in done.stderr and "line 1: not JSON" in done.stderr and "Traceback" not in done.stderr
    good = _write(tmp_path / "good.jsonl", '{"step": 0, "magma/term": 1.0}\n')
    labelled = subprocess.run(
        [sys.executable, str(SCRIPT), "plot", str(good), "--label", "a, b", "--label", "c", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert labelled.returncode != 0 and "2 labels for 1 metrics files" in labelled.stderr
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "plot", str(good), "--label", "a, b", "--out", str(tmp_path), "--name", "g.png"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_trace_writes_per_step_magma_diagnostics(demo_mds, tmp_path):
    recipe = tiny_recipe(
        demo_mds,
        max_duration="3ba",
        algorithms={
            "magma": {"reference_layers": [1], "target_layer": -1, "weight": 1.0},
            "uniformity": {"weight": 0.01},
        },
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = diag.trace_recipe(path, tmp_path / "m.jsonl", ["seed=5"])
    steps = diag.read_metrics(out)
    for step in (0, 1, 2):
        row = steps[step]
        for key in ("magma/term", "magma/target_spread", "magma/reference_norm", "magma/rayleigh", "uniformity/term"):
            assert key in row, (step, key)
        assert 0 < row["magma/rayleigh"] < 2
        assert row["loss/train/magma"] == pytest.approx(row["magma/term"], rel=1e-5)
        assert row["loss/train/mae"] > 0


def test_magnitude_reads_a_composer_checkpoint(demo_mds, tmp_path):
    from magma_composer.models import ComposerMAE

    sizes = {"img_size": 32, "patch_size": 8, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
    common = dict(encoder=json.dumps(TINY_MODEL["encoder"]), batch=12, data=str(demo_mds), reference=1, grads=False)
    torch.manual_seed(11)
    other = ComposerMAE(TINY_MODEL["encoder"], mask_ratio=0.75, **sizes)
    path = tmp_path / "ep1.pt"
    torch.save({"state": {"model": {"module." + k: v for k, v in other.state_dict().items()}}}, path)
    fresh = diag.measure_magnitude(**common, **sizes)
    loaded = diag.measure_magnitude(**common, **sizes, checkpoint=str(path))
    assert loaded["checkpoint"] == str(path)
    assert loaded["ours"] != pytest.approx(fresh["ours"], rel=1e-3)  # other weights, other features
    assert loaded["ratio_original_fp32_to_ours"] == pytest.approx(1.0, rel=1e-5)
    # the weights measure_magnitude itself starts from, as a checkpoint: the same numbers
    torch.manual_seed(0)
    same = ComposerMAE(TINY_MODEL["encoder"], mask_ratio=0.75, **sizes)
    torch.save({"state": {"model": same.state_dict()}}, path)
    assert diag.measure_magnitude(**common, **sizes, checkpoint=str(path))["ours"] == pytest.approx(fresh["ours"])
