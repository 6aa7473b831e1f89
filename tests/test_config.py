"""Recipes: keys and types are checked against the owners' signatures, values by the owners; every error is
``error: <key path>: ...`` with exit 2, never a traceback."""

import re
import subprocess
import sys

import pytest
import yaml

from magma_composer import registry
from magma_composer.config import ConfigError, apply_overrides, load_config, parse_overrides, validate
from magma_composer.train import build_trainer, main
from tests.conftest import REPO, is_evidence_settings, tiny_recipe


def base():
    return tiny_recipe("/nonexistent/data")


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda r: r.update(modle={}), "unknown key 'modle'"),
        (lambda r: r["model"].update(depth=3), "unknown key 'model.depth'"),
        (lambda r: r["train_data"].update(batch_size="big"), "train_data.batch_size: expected int"),
        (lambda r: r["train_data"].update(batch_size=1.5), "train_data.batch_size: expected int"),
        (lambda r: r["model"].update(norm_pix_loss="yes"), "model.norm_pix_loss: expected bool"),
        (lambda r: r.update(progress_bar="false"), "progress_bar: expected bool, got 'false'"),
        (lambda r: r["train_data"].update(crop_scale=[0.2, "x"]), r"train_data.crop_scale: expected"),
        (lambda r: r.pop("max_duration"), "missing required key 'max_duration'"),
        (lambda r: r["train_data"].pop("remote"), "missing required key 'train_data.remote'"),
        (lambda r: r.update(max_duration="10 epochs"), "max_duration: '10 epochs' is not a Composer time string"),
        (lambda r: r.update(max_duration="0ep"), "max_duration: must be positive"),
        (lambda r: r.update(precision="bf16"), "precision: 'bf16' is not valid"),
        (lambda r: r.update(device_train_microbatch_size=0), "device_train_microbatch_size: expected a positive"),
        (lambda r: r.update(device_train_microbatch_size=-2), "device_train_microbatch_size: expected a positive"),
        (lambda r: r.update(autoresume=True, run_name=None), "autoresume: true needs save_folder and run_name"),
        (lambda r: r.update(run_name="a/b"), "run_name: 'a/b' must be letters"),
        (lambda r: r.update(callbacks={"knn": {}}), "unknown callback 'callbacks.knn'"),
        (lambda r: r.update(callbacks={"knn_monitor": {"kk": 3}}), "unknown key 'callbacks.knn_monitor.kk'"),
        (lambda r: r.update(callbacks={"knn_monitor": {"at_fit_start": "false"}}), "at_fit_start: expected bool"),
        (lambda r: r.update(callbacks={"knn_monitor": {"test_loader": 1}}), "unknown key 'callbacks.knn_monitor."),
        (lambda r: r.update(loggers={"tensorbord": {}}), "unknown logger 'loggers.tensorbord'"),
        (lambda r: r.update(algorithms={"mixup": {}}), "unknown algorithm 'algorithms.mixup'"),
        (lambda r: r.update(algorithms={"magma": {"gather": "false"}}), "algorithms.magma.gather: expected bool"),
        (lambda r: r.update(algorithms={"magma": {"target_layer": 1.0}}), "algorithms.magma.target_layer: expected"),
        (lambda r: r["train_data"].update(train=False), "unknown key 'train_data.train'"),
        (lambda r: r["train_data"].update(epoch_size=10), "unknown key 'train_data.epoch_size'"),
        (lambda r: r["optimizer"].update(global_batch=10), "unknown key 'optimizer.global_batch'"),
    ],
)
def test_key_and_type_errors_name_the_key(mutate, message):
    """Keys and types fail when the recipe is read, before anything is built."""
    recipe = base()
    mutate(recipe)
    with pytest.raises(ConfigError, match=message):
        validate(recipe)


@pytest.fixture
def run_cli(demo_mds, tmp_path, capsys):
    """Runs ``magma_composer.train`` in-process on a tiny recipe; returns (exit code, stderr)."""

    def run(*overrides, **recipe_overrides):
        recipe = tiny_recipe(demo_mds, **recipe_overrides)
        recipe["eval_data"] = {"remote": str(demo_mds), "split": "test", "batch_size": 16, "num_workers": 0}
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        with pytest.raises(SystemExit) as exc:
            main([str(path), *overrides])
        return exc.value.code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(
    "override,message",
    [
        ("algorithms.uniformity.weight=-0.01", "algorithms.uniformity.weight: weight=-0.01 must be"),
        ("algorithms.magma.reference_layers=[]", "algorithms.magma.reference_layers: must name at least one"),
        (
            "algorithms.magma.weight={type: warmup, start: 5ba}",
            r"algorithms.magma.weight: weight \(type warmup\) is missing",
        ),
        ("algorithms.magma.weight={type: bogus}", "algorithms.magma.weight: weight.type='bogus'"),
        ("algorithms.magma.rbf_scale=0", "algorithms.magma.rbf_scale: must be > 0.0"),
        ("algorithms.pca_masking.basis=/no/such/basis.pt", "algorithms.pca_masking.basis: PCA basis file"),
        ("algorithms.pca_masking={basis: b.pt, ratio: 1.5}", r"algorithms.pca_masking.ratio: must be in \(0.0, 1.0\)"),
        ("callbacks.knn_monitor.k=[0]", r"callbacks.knn_monitor.k\[0\]: must be >= 1"),
        ("callbacks.knn_monitor.interval=3xx", "callbacks.knn_monitor.interval: '3xx' is not a Composer time"),
        ("callbacks.reconstruction_images.num_images=0", "callbacks.reconstruction_images.num_images: must be >= 1"),
        ("train_data.max_samples=0", "train_data.max_samples: must be >= 1"),
        ("train_data.num_workers=-1", "train_data.num_workers: must be >= 0"),
        ("train_data.batch_size=0", "train_data.batch_size: must be >= 1"),
        ("train_data.persistent_workers=true", "train_data.persistent_workers: true needs num_workers > 0"),
        ("train_data.crop_scale=[0.5]", r"train_data.crop_scale: expected \[lo, hi\]"),
        ("train_data.normalize=zscore", "train_data.normalize: 'zscore' is not valid"),
        ("train_data.shard_deadline=0", "train_data.shard_deadline: must be > 0.0"),
        ("train_data.download_threads=0", "train_data.download_threads: must be >= 1"),
        ("train_data.download_timeout=-1", "train_data.download_timeout: must be > 0.0"),
        ("train_data.download_retry=0", "train_data.download_retry: must be >= 1"),
        ("train_data.validate_hash=bogus", "train_data.validate_hash: 'bogus' is not valid"),
        ("train_data.split=nosuchsplit", "train_data: no MDS data set at"),
        ("train_data.remote=s3://", "train_data.remote: 's3://' names no bucket"),
        ("eval_data.crop_scale=[0.5, 1.0]", "eval_data.crop_scale: applies to training data only"),
        ("train_data.resize_ratio=0.875", "train_data.resize_ratio: applies to evaluation data only"),
        ("model.img_size=30", "model.patch_size: 8 does not divide img_size 30"),
        ("model.patch_size=64", r"model.patch_size: must be an integer in \[1, 32\]"),
        ("model.mask_ratio=1.0", r"model.mask_ratio: must be in \[0.0, 1.0\)"),
        ("model.encoder=resnet18", "model.encoder: 'resnet18' is not a timm VisionTransformer"),
        ("model.encoder=vit_nonexistent_patch16", "model.encoder: 'vit_nonexistent_patch16' is not a timm model"),
        ("model.encoder.embed_dim=30", "model.encoder.embed_dim: must be divisible by 4"),
        ("model.encoder.num_heads=3", "model.encoder.num_heads: must divide embed_dim"),
        ("model.encoder.width=3", "model.encoder.width: unknown key"),
        ("model.decoder_heads=3", "model.decoder_heads: 3 does not divide decoder_dim 32"),
        ("optimizer.base_lr=1e-4", "optimizer.lr: give exactly one of 'lr'"),
        ("optimizer.lr=-1", "optimizer.lr: must be > 0.0"),
        ("optimizer.betas=[0.9]", r"optimizer.betas: expected two numbers in \[0, 1\)"),
        ("scheduler.warmup=abc", "scheduler.warmup: 'abc' is not a Composer time string"),
        ("scheduler.alpha_f=2", r"scheduler.alpha_f: must be in \[0.0, 1.0\]"),
        ("eval_data=null", "callbacks.knn_monitor: needs an 'eval_data' section"),
        ("loggers.mlflow={}", "loggers.mlflow: needs a package that is not installed"),
        ("algorithms.magma.target_layer=99", "algorithms.magma: MAGMA: target_layer=99 is out of range"),
        ("algorithms.magma.reference_layers=[3]", "algorithms.magma: MAGMA: target_layer=3 .* must come after"),
        ("seed=99999999999", r"seed: must be in \[0, 2\*\*32 - 1\]"),
        ("train_data.shuffle_algo=bogus", "train_data.shuffle_algo: 'bogus' is not valid"),
        ("loggers.file.filename=/proc/no/such/log.txt", "trainer: .*No such file or directory"),
    ],
)
def test_value_errors_exit_2_with_the_key_path(run_cli, override, message):
    """Each owner checks its values when it is built; the CLI prints one ``error: <key path>: ...`` line."""
    code, err = run_cli(
        override,
        algorithms={"magma": {"reference_layers": [1], "target_layer": 3}, "uniformity": {}},
        callbacks={"knn_monitor": {}, "reconstruction_images": {}},
    )
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("magma_composer.train: error: ")
    assert re.search(message, line), line


def test_valid_recipe_and_defaults():
    cfg = validate(base())
    assert cfg.optimizer == {"lr": 1e-3} and cfg.scheduler == {"warmup": "1ba"}
    assert cfg.seed == 3 and cfg.eval_data is None and cfg.save_folder is None


def test_overrides_parse_as_yaml(tmp_path):
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=1e-3", "e=null", "f=1.5e-4"]) == [
        (("a", "b"), 1),
        (("a", "c"), [1, 2]),
        (("d",), 1e-3),
        (("e",), None),
        (("f",), 1.5e-4),
    ]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    cfg = load_config(path, ["optimizer.lr=0.5", "train_data.batch_size=4", "model.encoder.depth=2"])
    assert cfg.optimizer["lr"] == 0.5 and cfg.train_data["batch_size"] == 4 and cfg.model["encoder"]["depth"] == 2
    with pytest.raises(ConfigError, match="unknown key 'optimizer.lrr'"):
        load_config(path, ["optimizer.lrr=0.5"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(path, ["seed.x=1"])


def test_yaml_reads_exponents_without_a_dot_as_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()).replace("lr: 0.001", "lr: 1e-3"))
    assert load_config(path).optimizer["lr"] == 1e-3


def test_override_replaces_a_whole_mapping(tmp_path):
    """A command-line value replaces what the base recipe had at that path, a mapping included."""
    warmup = {"type": "warmup", "start": "10ep", "end": "110ep", "value": 1.0}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base(), "algorithms": {"magma": {"weight": warmup}}}))
    (tmp_path / "child.yaml").write_text("base: base.yaml\nseed: 5\n")
    cfg = load_config(tmp_path / "child.yaml", ["algorithms.magma.weight={type: constant, value: 0.5}"])
    assert cfg.algorithms["magma"]["weight"] == {"type": "constant", "value": 0.5}
    # a key below it still merges into the inherited mapping
    cfg = load_config(tmp_path / "child.yaml", ["algorithms.magma.weight.value=2.0"])
    assert cfg.algorithms["magma"]["weight"] == {**warmup, "value": 2.0}
    assert apply_overrides({"a": {"b": {"c": 1}}}, [(("a", "b"), 3)]) == {"a": {"b": 3}}


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
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
    assert "model.encoder.dpth: unknown key" in proc.stderr and "Traceback" not in proc.stderr


# yamls/eval/ holds evaluation recipes
TRAINING_RECIPES = sorted(
    p.relative_to(REPO)
    for p in (REPO / "yamls").rglob("*.yaml")
    if p.parent.name != "eval" and not is_evidence_settings(p)
)


@pytest.mark.parametrize("recipe", TRAINING_RECIPES)
def test_shipped_recipes_validate(recipe):
    load_config(REPO / recipe)


def test_false_switches_off_an_inherited_entry_and_only_a_bool_does(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({**base(), "callbacks": {"lr_monitor": {}, "speed_monitor": {}}})
    )
    (tmp_path / "child.yaml").write_text("base: base.yaml\ncallbacks: {speed_monitor: false}\n")
    cfg = load_config(tmp_path / "child.yaml", ["cpu_threads=1"])
    assert cfg.callbacks == {"lr_monitor": {}} and cfg.cpu_threads == 1
    with pytest.raises(ConfigError, match="callbacks.speed_monitor: expected a mapping"):
        load_config(tmp_path / "child.yaml", ["callbacks.speed_monitor='false'"])


def test_every_composer_logger_is_registered():
    import composer.loggers

    shipped = {
        getattr(composer.loggers, name)
        for name in composer.loggers.__all__
        if name not in ("Logger", "LoggerDestination", "ProgressBarLogger", "ConsoleLogger")
    }
    registered = {registry.resolve(registry.LOGGERS, name, "logger") for name in registry.LOGGERS}
    assert shipped <= registered, shipped - registered


def test_data_keys_come_from_the_owners_signatures():
    """Every option of StreamingImageDataset, CheckedStreamingDataset and streaming is a recipe key, once."""
    import inspect

    from streaming import StreamingDataset

    from magma_composer.config import INJECTED, _parameters
    from magma_composer.data import CheckedStreamingDataset, StreamingImageDataset
    from magma_composer.data.loader import build_image_dataloader

    keys = {p.name for p, _ in _parameters(build_image_dataloader)} - set(INJECTED["train_data"])
    for owner in (StreamingImageDataset, CheckedStreamingDataset, StreamingDataset):
        params = inspect.signature(owner.__init__).parameters.values()
        own = {p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        assert own - set(INJECTED["train_data"]) <= keys
    assert {"max_samples", "crop_scale", "download_threads", "cache_limit", "num_workers"} <= keys


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_without_cuda_is_a_clean_error(run_cli):
    code, err = run_cli("device=gpu")
    assert code == 2 and "device: 'gpu', but torch sees no CUDA GPU" in err and "Traceback" not in err


def test_a_built_recipe_trains(demo_mds):
    trainer = build_trainer(validate(tiny_recipe(demo_mds, max_duration="2ba")))
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2


@pytest.mark.parametrize(
    "update,message",
    [
        ({"eval_interval": "2ep"}, "eval_interval: has no effect without eval_data"),
        ({"save_interval": "2ba"}, "save_interval: has no effect without save_folder"),
        ({"save_num_checkpoints_to_keep": 1}, "save_num_checkpoints_to_keep: has no effect without save_folder"),
        ({"save_overwrite": True}, "save_overwrite: has no effect without save_folder or export_encoder"),
        ({"load_weights_only": True}, "load_weights_only: has no effect without load_path"),
        ({"cpu_threads": 2, "device": "gpu"}, "cpu_threads: applies to CPU runs only"),
    ],
)
def test_an_option_that_would_be_ignored_is_refused(update, message):
    with pytest.raises(ConfigError, match=message):
        validate({**base(), **update})
