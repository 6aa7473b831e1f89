"""Recipe validation: every class of error names its key path, before any model or data is built."""

import subprocess
import sys

import pytest
import yaml

from magma_composer.config import ConfigError, load_config, parse_overrides, validate
from tests.conftest import REPO, tiny_recipe


def base():
    return tiny_recipe("/nonexistent/data")


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda r: r.update(modle={}), "unknown key 'modle'"),
        (lambda r: r["model"].update(img_sz=3), "unknown key 'model.img_sz'"),
        (lambda r: r["train_data"].update(batchsize=3), "unknown key 'train_data.batchsize'"),
        (lambda r: r["model"]["encoder"].update(width=3), "unknown key 'model.encoder.width'"),
        (lambda r: r["train_data"].update(batch_size="big"), "train_data.batch_size: expected an integer"),
        (lambda r: r["model"].update(norm_pix_loss="yes"), "model.norm_pix_loss: expected true or false"),
        (lambda r: r["optimizer"].update(betas=0.9), "optimizer.betas: expected a list"),
        (lambda r: r["train_data"].update(crop_scale=[0.2, "x"]), r"train_data.crop_scale\[1\]: expected a number"),
        (lambda r: r.pop("max_duration"), "missing required key 'max_duration'"),
        (lambda r: r["train_data"].pop("remote"), "missing required key 'train_data.remote'"),
        (lambda r: r.update(max_duration="10 epochs"), "max_duration: '10 epochs' is not a Composer time string"),
        (lambda r: r.update(precision="bf16"), "precision: 'bf16' is not valid"),
        (lambda r: r["optimizer"].update(base_lr=1e-4), "exactly one of 'optimizer.lr'"),
        (lambda r: r.update(callbacks={"knn": {}}), "unknown callback 'callbacks.knn'"),
        (lambda r: r.update(callbacks={"knn_monitor": {"kk": 3}}), "unknown key 'callbacks.knn_monitor.kk'"),
        (lambda r: r.update(loggers={"tensorboard": {}}), "unknown logger 'loggers.tensorboard'"),
        (lambda r: r.update(algorithms={"mixup": {}}), "unknown algorithm 'algorithms.mixup'"),
        (lambda r: r["train_data"].update(normalize="zscore"), "train_data.normalize: 'zscore' is not valid"),
        (lambda r: r["train_data"].update(shard_deadline=0), "train_data.shard_deadline: must be positive"),
        (lambda r: r["train_data"].update(download_threads=0), "train_data.download_threads: must be positive"),
    ],
)
def test_errors_name_the_key(mutate, message):
    recipe = base()
    mutate(recipe)
    with pytest.raises(ConfigError, match=message):
        validate(recipe)


def test_valid_recipe_and_defaults():
    cfg = validate(base())
    assert cfg.optimizer.betas == [0.9, 0.95] and cfg.optimizer.weight_decay == 0.05
    assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss is True


def test_overrides_parse_as_yaml_and_merge(tmp_path):
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=1e-3", "e=null"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": 1e-3,
        "e": None,
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    cfg = load_config(path, ["optimizer.lr=0.5", "train_data.batch_size=4", "model.encoder.depth=2"])
    assert cfg.optimizer.lr == 0.5 and cfg.train_data.batch_size == 4 and cfg.model.encoder["depth"] == 2
    with pytest.raises(ConfigError, match="unknown key 'optimizer.lrr'"):
        load_config(path, ["optimizer.lrr=0.5"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["optimizer.lr"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_fails_fast_with_key_path(tmp_path):
    """The entry point exits 2 with the key path, before building any model or touching data."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    proc = subprocess.run(
        [sys.executable, "-m", "magma_composer.train", str(path), "model.encoder.dpth=3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'model.encoder.dpth'" in proc.stderr


@pytest.mark.parametrize("recipe", sorted(p.relative_to(REPO) for p in (REPO / "yamls").rglob("*.yaml")))
def test_shipped_recipes_validate(recipe):
    load_config(REPO / recipe)


def test_false_switches_off_an_inherited_entry(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({**base(), "callbacks": {"lr_monitor": {}, "speed_monitor": {}}})
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\ncallbacks: {speed_monitor: false}\n")
    cfg = load_config(tmp_path / "child.yaml", ["cpu_threads=1"])
    assert cfg.callbacks == {"lr_monitor": {}} and cfg.cpu_threads == 1
