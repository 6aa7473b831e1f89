"""``python -m magma_composer.evaluate``: every protocol end to end on the demo data, the record, and bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from magma_composer.checkpoints import file_sha256
from tests.conftest import REPO, TINY_MODEL, free_port, run_module

EVAL = REPO / "yamls" / "eval"
COMPOSER = Path(sys.executable).parent / "composer"


@pytest.fixture(scope="module")
def trained(demo_mds, tmp_path_factory) -> dict[str, Path]:
    """A tiny MAE trained for 2 steps: its Composer checkpoint and its exported encoder."""
    from magma_composer.config import validate
    from magma_composer.train import build_trainer
    from tests.conftest import tiny_recipe

    out = tmp_path_factory.mktemp("pretrain")
    recipe = tiny_recipe(
        demo_mds,
        max_duration="2ba",
        save_folder=str(out / "ckpt"),
        save_interval="2ba",
        export_encoder=str(out / "encoder.pt"),
    )
    trainer = build_trainer(validate(recipe))
    trainer.fit()
    from magma_composer.checkpoints import export_encoder

    export_encoder(trainer.state.model, str(out / "encoder.pt"))
    trainer.close()
    return {"checkpoint": out / "ckpt" / "ep0-ba2-rank0.pt", "encoder": out / "encoder.pt"}


def _quick(protocol: str, demo_mds: Path, tmp_path: Path, encoder: Path) -> list[str]:
    """Overrides that make any shipped recipe a few CPU steps on the demo data."""
    args = [
        f"encoder.path={encoder}",
        f"train_data.remote={demo_mds}",
        f"test_data.remote={demo_mds}",
        "train_data.local=null",
        "test_data.local=null",
        "train_data.num_workers=0",
        "test_data.num_workers=0",
        "train_data.batch_size=32",
        "test_data.batch_size=40",
        f"output={tmp_path}/{{run_name}}.json",
        "progress_bar=false",
        "seed=5",
    ]
    if protocol in ("knn", "linear-fast"):
        args.append(f"features.cache_dir={tmp_path / 'cache'}")
    else:
        args += ["max_duration=2ep", "scheduler.warmup=1ba", "eval_interval=1ep", "num_classes=10"]
    return args


def _evaluate(protocol: str, recipe: str, args: list[str]) -> dict:
    from magma_composer.evaluate.__main__ import main

    return main([protocol, str(EVAL / recipe), *args])


@pytest.mark.parametrize(
    "protocol, recipe, source",
    [
        ("knn", "knn.yaml", "checkpoint"),
        ("linear-fast", "linear-fast.yaml", "encoder"),
        ("linear", "linear-pmae.yaml", "checkpoint"),
        ("linear", "linear-mae-vitb16.yaml", "encoder"),
        ("mlp", "mlp-pmae.yaml", "encoder"),
        ("finetune", "finetune-vit-tiny-cifar10.yaml", "checkpoint"),
        ("finetune", "finetune-mae-vitb16.yaml", "encoder"),
    ],
)
def test_each_protocol_end_to_end(protocol, recipe, source, trained, demo_mds, tmp_path, capsys):
    args = _quick(protocol, demo_mds, tmp_path, trained[source])
    if recipe.endswith("vitb16.yaml"):
        args += ["num_classes=10", "test_data.resize_ratio=null", "test_data.split=test"]
    record = _evaluate(protocol, recipe, [*args, "run_name=r1"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"{protocol}: top-1 ") and "record: " in line
    written = json.loads((tmp_path / "r1.json").read_text())
    assert written == json.loads(json.dumps(record, default=str))
    assert written["protocol"] == protocol and written["run_name"] == "r1"
    assert 0.0 <= written["top1"] <= written["top5"] <= 100.0
    assert written["encoder"]["sha256"] == file_sha256(trained[source])
    assert written["encoder"]["format"] == ("composer" if source == "checkpoint" else "timm")
    assert written["encoder"]["arch"]["embed_dim"] == TINY_MODEL["encoder"]["embed_dim"]
    assert written["settings"]["train_data"]["remote"] == str(demo_mds)  # the recipe as run, overrides applied
    assert written["data"]["test_data"]["split"] == "test"
    if protocol == "knn":
        grid = written["metrics"]["grid"]
        assert len(grid) == 5 * 3 + 5  # cosine: k x T; euclidean: k only
        assert written["top1"] == grid[0]["top1"]
    if protocol in ("linear", "mlp", "finetune"):
        history = written["metrics"]["history"]
        assert len(history) == 2 and written["top1"] == history[-1][1]
        assert written["metrics"]["best_top1"] == max(h[1] for h in history)


def test_fast_probe_is_cached_and_the_random_baseline_differs(trained, demo_mds, tmp_path):
    args = _quick("linear-fast", demo_mds, tmp_path, trained["encoder"])
    first = _evaluate("linear-fast", "linear-fast.yaml", [*args, "run_name=a"])
    cached = list((tmp_path / "cache").rglob("*"))
    assert any(p.is_file() for p in cached)
    again = _evaluate("linear-fast", "linear-fast.yaml", [*args, "run_name=b"])
    assert again["metrics"]["top1"] == first["metrics"]["top1"]
    assert sorted((tmp_path / "cache").rglob("*")) == sorted(cached)  # nothing new: the features were reused
    random = _evaluate("linear-fast", "linear-fast.yaml", [*args, "run_name=c", "encoder.weights=random"])
    assert random["encoder"]["weights"] == "random" and random["encoder"]["sha256"] != first["encoder"]["sha256"]


def test_the_same_under_the_composer_launcher(trained, demo_mds, tmp_path):
    if not COMPOSER.exists():
        pytest.skip(f"the composer launcher is not installed beside {sys.executable}")
    args = _quick("knn", demo_mds, tmp_path, trained["checkpoint"])
    single = _evaluate("knn", "knn.yaml", [*args, "run_name=one", "features.cache=false", "features.cache_dir=null"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(COMPOSER), "-n", "2", "--master_port", str(free_port()), "-m", "magma_composer.evaluate", "knn"]
    cmd += [str(EVAL / "knn.yaml"), *args, "run_name=two", "features.cache=false", "features.cache_dir=null"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    assert two["metrics"]["grid"] == single["metrics"]["grid"]  # every sample once, in order, on any rank count
    assert two["data"]["test_data"]["samples"] == single["data"]["test_data"]["samples"] == 80


def _write_mds(folder: Path, labels: list[int | None]) -> None:
    from streaming import MDSWriter

    columns = {"x": "bytes"} if labels[0] is None else {"x": "bytes", "y": "int"}
    with MDSWriter(out=str(folder), columns=columns) as writer:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (i * 7 % 255, 40, 90)).save(buf, format="JPEG")
            writer.write({"x": buf.getvalue()} if label is None else {"x": buf.getvalue(), "y": label})


def _error(args: list[str]) -> str:
    proc = run_module("magma_composer.evaluate", *args, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("magma_composer.evaluate: error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_bad_input_is_one_clear_line(trained, demo_mds, tmp_path):
    knn = [str(EVAL / "knn.yaml"), *_quick("knn", demo_mds, tmp_path, trained["checkpoint"])]
    fast = [str(EVAL / "linear-fast.yaml"), *_quick("linear-fast", demo_mds, tmp_path, trained["checkpoint"])]
    not_encoder = tmp_path / "classifier.pt"
    torch.save({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, not_encoder)
    unlabelled, half = tmp_path / "unlabelled", tmp_path / "half"
    _write_mds(unlabelled / "train", [None] * 20)
    _write_mds(unlabelled / "test", [None] * 20)
    _write_mds(half / "train", [i % 5 for i in range(40)])
    _write_mds(half / "test", [i % 10 for i in range(40)])
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    cases = [
        (["bogus", *knn], "unknown protocol 'bogus'"),
        (["knn", str(tmp_path / "nope.yaml")], "does not exist"),
        (["knn", str(EVAL / "knn.yaml")], "encoder.path: no encoder given"),
        (["knn", *knn, "model.pool=mean"], "model: has no effect for protocol 'knn'"),
        (["linear", str(EVAL / "linear-pmae.yaml"), knn[1], "num_classes=null"], "missing required key 'num_classes'"),
        (["knn", *knn, f"encoder.path={not_encoder}"], str(not_encoder)),
        (["knn", *knn, "train_data.image_size=64"], "train_data.image_size: 64, but the encoder takes 32 x 32"),
        (["knn", *knn, f"train_data.remote={unlabelled}", f"test_data.remote={unlabelled}"], "has no labels"),
        (["knn", *knn, f"train_data.remote={half}", f"test_data.remote={half}"], "5, 6, 7, 8, 9"),
        (["knn", *knn, f"output={existing}"], "already exists"),
        (["knn", *knn, "knn.k=[0]"], "knn.k"),
        (["knn", *knn, "features.pool=max"], "features.pool"),
        (["linear-fast", *fast, "linear_fast.folds=5"], "linear_fast.val_fraction: 0.1 holds out one share"),
        (["linear-fast", *fast, "linear_fast.folds=0"], "linear_fast.folds"),
    ]
    for args, expected in cases:
        line = _error(args)
        assert expected in line, (args, line)
    assert existing.read_text() == "{}"  # nothing overwritten


def _protocol_of(recipe: Path) -> str:
    return next(p for p in ("linear-fast", "knn", "linear", "mlp", "finetune") if recipe.stem.startswith(p))


@pytest.mark.parametrize("recipe", sorted(EVAL.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_evaluation_recipes_validate(recipe):
    from magma_composer.evaluate.recipe import load_eval_config

    cfg, _ = load_eval_config(_protocol_of(recipe), str(recipe), ["encoder.path=x.pt"])
    assert cfg.encoder["path"] == "x.pt" and cfg.test_data["split"] in ("test", "val")


def test_help_lists_protocols_and_recipes():
    proc = run_module("magma_composer.evaluate", "--help")
    assert proc.returncode == 0
    for name in ("knn", "linear-fast", "linear", "mlp", "finetune", "linear-pmae.yaml", "finetune-mae-vitb16.yaml"):
        assert name in proc.stdout


def test_record_goes_to_wandb_offline(trained, demo_mds, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = _quick("knn", demo_mds, tmp_path, trained["encoder"])
    record = _evaluate("knn", "knn.yaml", [*args, "run_name=w", "wandb={project: test, mode: offline}"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and record["top1"] is not None
