"""The evidence matrix: MAE, M-MAE, U-MAE, MU-MAE and PMAE trained with one budget, several seeds, on CIFAR-10.

Three commands::

    python experiments/evidence.py run --preset cpu --data data/cifar10-mds --out runs/evidence \\
        [--methods mae,m-mae,u-mae,mu-mae,pmae] [--seeds 0,1,2] [--basis FILE] [--set key.path=value ...] \\
        [--eval-set key.path=value ...] [--reevaluate] [--dry-run]
    python experiments/evidence.py report --out runs/evidence [--json docs/results-evidence.json] [--preset cpu] \\
        [--baseline runs/evidence --baseline-methods mae]
    python experiments/evidence.py project --step-seconds S [--recipes FILE ...] [--gpus N] [--dataset-size N]

``run`` trains the preset's default matrix, ``yamls/evidence/<preset>/matrix.yaml`` (the seeds of each method,
chosen to fit the preset's time; ``--methods`` picks some of them, ``--seeds`` gives every method named the same
seeds), one (method, seed) cell at a time, each from ``yamls/evidence/<preset>/<method>.yaml`` (every method recipe
extends the preset's ``base.yaml``: the same model, data, optimizer, schedule and steps; only the algorithm differs)
through the package's own builder (:func:`magma_composer.train.build_trainer`), saves the encoder's weights before
the first step (the exact initialisation) and after the last, and evaluates both with the preset's ``eval.yaml``:
features extracted once per encoder and pooling (:func:`magma_composer.evaluate.features.cached_features`), then kNN
(:class:`~magma_composer.evaluate.knn.KNNProtocol`) and the fast linear probe
(:class:`~magma_composer.evaluate.linear.FastLinearProbe`) on the same features. Each finished cell writes
``<out>/cells/<method>-s<seed>.json`` (the resolved recipe, evaluation settings, seed, git commit, wall times,
losses, results of the initialisation and of the trained encoder) and ``<method>-s<seed>.metrics.jsonl`` (every
metric the trainer logged, one JSON object ``{"step": i, "<metric>": value, ...}`` per step, ``i`` from 0: the MAE
loss, the MAGMA term and its diagnostics ``magma/*``, uniformity, lr). A cell with a record is never recomputed, so
a stopped matrix resumes where it stopped (an unfinished cell restarts from its first step); a record written with
another recipe or evaluation is refused rather than mixed. With ``--reevaluate``, a record whose training recipe is
this run's but whose evaluation is not is evaluated again from its saved encoders (features come from the cache):
a new evaluation protocol costs minutes, not the matrix's hours; the record keeps its training and notes, under
``reevaluated``, the evaluation it replaced. ``--set`` overrides apply to every method's training
recipe (the budget: ``max_duration=600ba``), ``--eval-set`` to the evaluation (``features.pools=[cls,mean]``).

PMAE needs a PCA basis of the training images at the model's size: ``--basis FILE``, else ``<out>/basis-<S>.pt``,
fitted once (``python -m magma_composer.pca fit``) when missing.

``report`` prints per method the number of seeds, mean +- standard deviation (sample, n - 1) and range of each
figure for the trained encoders and their initialisations, the trained - init gain, and the paired differences to
MAE by seed (mean, std, min..max, how many seeds positive); from two seeds on, each mean gain and paired difference
also gets its 95 % Student-t interval (an interval that excludes 0 is the report's test of "clearly"). Then a Markdown
table; ``--json`` writes all of it. ``--preset P`` reports only the cells of P's matrix.yaml from a folder that holds
more (extra seeds), i.e. what ``run --preset P`` alone reproduces. ``--baseline DIR`` pairs a follow-up run (say
M-MAE with another weight, ``--methods m-mae``) with another matrix's cells of ``--baseline-methods`` (default MAE),
evaluated the same way.

``project`` turns a measured seconds-per-step (of the recipe's model at its per-device batch on one GPU) into each
full-length recipe's steps and expected wall time: ``steps = floor(dataset size / (batch x GPUs)) x epochs``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

METHODS = ("mae", "m-mae", "u-mae", "mu-mae", "pmae")
PRESETS = ("cpu", "gpu")
POOLS = ("cls", "mean")
RECORD_FORMAT = "magma_composer.evidence/1"
#: sections of a preset's eval.yaml and the options each takes
EVAL_SECTIONS = ("train_data", "test_data", "features", "knn", "linear_fast")
#: training-set sizes of the full-length recipes' data sets (``project``), by a word of their remote
DATASET_SIZES = {"imagenet100": 126_689, "imagenet": 1_281_167}
DEFAULT_PROJECT_RECIPES = ("yamls/imagenet/*.yaml", "yamls/imagenet100/*.yaml")


class EvidenceError(ValueError):
    """A user's mistake (an argument, a file, a recipe): printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ arguments
def parse_methods(text: str, flag: str = "--methods") -> list[str]:
    """``'mae,mu-mae'`` -> ``['mae', 'mu-mae']``; each a known method, none twice (errors name ``flag``)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise EvidenceError(f"{flag}: no method given; choose from {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            raise EvidenceError(f"{flag}: {name!r} is not a method; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise EvidenceError(f"{flag}: {text!r} names a method twice")
    return names


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """``'0,1,2'`` -> ``[0, 1, 2]``; each an integer in [0, 2**32), none twice (errors name ``flag``)."""
    seeds = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) >= 2**32:
            raise EvidenceError(f"{flag}: {part!r} is not a seed; give integers in [0, 2**32), e.g. 0,1,2")
        seeds.append(int(part))
    if len(set(seeds)) != len(seeds):
        raise EvidenceError(f"{flag}: {text!r} names a seed twice")
    return seeds


def read_matrix(recipes: Path) -> dict[str, list[int]]:
    """The default matrix of a recipe folder: ``<recipes>/matrix.yaml``'s ``seeds`` (``{method: [seed, ...]}``),
    in METHODS order; without that file, seeds 0, 1 and 2 for every method with a recipe in the folder."""
    import yaml

    path = recipes / "matrix.yaml"
    if not path.is_file():
        return {m: [0, 1, 2] for m in METHODS if (recipes / f"{m}.yaml").is_file()}
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EvidenceError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("seeds"), dict) or not raw["seeds"]:
        raise EvidenceError(f"{path}: expected a key seeds: a mapping of method to a list of seeds")
    for key in raw:
        if key != "seeds":
            raise EvidenceError(f"{path}: unknown key {key!r}; the file has one key, seeds")
    matrix = {}
    for method, seeds in raw["seeds"].items():
        where = f"{path}: seeds.{method}"
        if method not in METHODS:
            raise EvidenceError(f"{where}: {method!r} is not a method; choose from {', '.join(METHODS)}")
        if not isinstance(seeds, list) or not seeds:
            raise EvidenceError(f"{where}: {seeds!r} is not a non-empty list of seeds, e.g. [0, 1, 2]")
        matrix[method] = parse_seeds(",".join(str(s) for s in seeds), where)
    return {m: matrix[m] for m in METHODS if m in matrix}


def cells_to_run(recipes: Path, methods: str | None, seeds: str | None) -> dict[str, list[int]]:
    """``{method: seeds}`` of a run: ``--methods`` (default: the matrix's) each with ``--seeds`` (default: its
    seeds in the folder's matrix.yaml)."""
    matrix = read_matrix(recipes)
    names = parse_methods(methods) if methods is not None else list(matrix)
    if seeds is not None:
        return {m: parse_seeds(seeds) for m in names}
    missing = [m for m in names if m not in matrix]
    if missing:
        raise EvidenceError(
            f"--methods: {', '.join(missing)} has no seeds in {recipes / 'matrix.yaml'}; give --seeds, e.g. 0,1,2"
        )
    return {m: matrix[m] for m in names}


def _overrides(items: Sequence[str], flag: str) -> list[str]:
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise EvidenceError(f"{flag}: {item!r} is not of the form key.path=value")
    return list(items)


# ------------------------------------------------------------------------------------------------ recipes
def preset_dir(preset: str) -> Path:
    """The folder of a preset's recipes."""
    if preset not in PRESETS:
        raise EvidenceError(f"--preset: {preset!r} is not a preset; choose from {', '.join(PRESETS)}")
    return REPO / "yamls" / "evidence" / preset


def training_recipe(
    recipes: Path, method: str, seed: int, data: str, sets: Sequence[str], basis: str | None = None
) -> dict:
    """A cell's training recipe: the method's file with the run's seed and data, ``sets`` and (PMAE) the basis,
    checked by :func:`magma_composer.config.validate` (keys and types)."""
    from magma_composer.config import ConfigError, read_recipe, validate

    path = recipes / f"{method}.yaml"
    fixed = [f"seed={seed}", f"train_data.remote={data}", f"run_name=evidence-{method}-s{seed}"]
    if basis is not None:
        fixed.append(f"algorithms.pca_masking.basis={basis}")
    try:
        raw = read_recipe(path, [*sets, *fixed])
        # nothing is written by the trainer: the command keeps the encoders and its own records
        for key in ("save_folder", "save_interval", "autoresume", "export_encoder", "load_path", "eval_data"):
            if raw.get(key) is not None:
                raise ConfigError(f"{key}: the evidence recipes train without it (the command writes the records)")
        # part of every record's recipe, hence of its fingerprint; the per-step rows come from StepMetrics
        raw["loggers"] = {**(raw.get("loggers") or {}), "in_memory": {}}
        validate(raw)
    except ConfigError as exc:
        raise EvidenceError(f"recipe {path}: {exc}") from None
    if method == "pmae" and "pca_masking" not in (raw.get("algorithms") or {}):
        raise EvidenceError(f"recipe {path}: PMAE needs algorithms.pca_masking")
    return raw


def check_buildable(raw: dict, where: str) -> None:
    """Builds a recipe's algorithms and model and runs the algorithms' model checks (block indices, the basis'
    image size), as :func:`magma_composer.train.build_trainer` will: a recipe that cannot train fails before the
    matrix starts, not when its first cell comes up."""
    from magma_composer import registry
    from magma_composer.config import ConfigError, build_section, section_class, validate
    from magma_composer.train import build_components

    try:
        cfg = validate(raw)
        algorithms = build_components("algorithms", cfg.algorithms, registry.ALGORITHMS, {})
        options = dict(cfg.model)
        model_class = section_class("model", options)
        options.pop("name", None)
        model = build_section("model", model_class, **options)
        for name, algorithm in zip(cfg.algorithms, algorithms):
            check = getattr(algorithm, "check_model", None)
            if check is not None:
                build_section(f"algorithms.{name}", check, model)
    except ConfigError as exc:
        raise EvidenceError(f"{where}: {exc}") from None


def evaluation_settings(recipes: Path, data: str, sets: Sequence[str], raw_pixels: bool) -> dict:
    """The preset's ``eval.yaml`` with ``--eval-set`` overrides, the data filled in, every section checked by its
    owner (the data loader's, :class:`KNNProtocol`'s, :class:`FastLinearProbe`'s signatures)."""
    from magma_composer.config import ConfigError, check_options, read_recipe
    from magma_composer.data.loader import build_image_dataloader
    from magma_composer.evaluate.knn import KNNProtocol
    from magma_composer.evaluate.linear import FastLinearProbe
    from magma_composer.options import OptionError

    path = recipes / "eval.yaml"
    try:
        raw = read_recipe(path, list(sets))
        unknown = sorted(set(raw) - set(EVAL_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r}; valid keys are: {', '.join(EVAL_SECTIONS)}")
        out = {}
        for section in ("train_data", "test_data"):
            options = dict(raw.get(section) or {})
            options["remote"] = data
            if raw_pixels:
                options["normalize"] = "none"
            injected = ("train", "cache_tag", "transform", "return_index", "image_size")
            out[section] = check_options(build_image_dataloader, options, section, injected)
        features = dict(raw.get("features") or {})
        unknown = sorted(set(features) - {"pools", "precision"})
        if unknown:
            raise ConfigError(f"unknown key 'features.{unknown[0]}'; valid keys of features are: pools, precision")
        pools = features.get("pools", ["cls"])
        if (
            not isinstance(pools, list)
            or not pools
            or any(p not in POOLS for p in pools)
            or len(set(pools)) < len(pools)
        ):
            raise ConfigError(f"features.pools: {pools!r}; give a list of distinct poolings from {', '.join(POOLS)}")
        from magma_composer.evaluate.features import PRECISIONS

        precision = features.get("precision")
        if precision is not None and precision not in PRECISIONS:
            raise ConfigError(f"features.precision: {precision!r}; choose one of {', '.join(PRECISIONS)} or null")
        out["features"] = {"pools": pools, "precision": precision}
        out["knn"] = check_options(KNNProtocol, raw.get("knn"), "knn")
        out["linear_fast"] = check_options(FastLinearProbe, raw.get("linear_fast"), "linear_fast")
        for section, cls in (("knn", KNNProtocol), ("linear_fast", FastLinearProbe)):
            try:
                cls(**out[section])
            except OptionError as exc:
                raise ConfigError(f"{section}.{exc.key}: {exc.message}") from None
    except ConfigError as exc:
        raise EvidenceError(f"evaluation {path}: {exc}") from None
    return out


def evaluation_loader(settings: dict, section: str, image_size: int) -> tuple[Any, dict]:
    """The loader of one evaluation set (``train_data`` or ``test_data``) and the options it was built with."""
    from magma_composer.data.loader import build_image_dataloader

    options = {**settings[section], "image_size": image_size}
    loader = build_image_dataloader(train=False, return_index=True, cache_tag=f"evidence-{section}", **options)
    return loader, options


def check_evaluation_data(settings: dict, image_size: int) -> None:
    """Opens both evaluation sets as the evaluation will (their indexes only), so that a subset larger than its
    split, or any other data option the data set refuses, fails before the first cell trains."""
    from magma_composer.options import OptionError

    for section in ("train_data", "test_data"):
        try:
            loader, _ = evaluation_loader(settings, section, image_size)
        except OptionError as exc:
            raise EvidenceError(
                f"evaluation {section}.{exc.key}: {exc.message} (set it with --eval-set {section}.{exc.key}=N)"
            ) from None
        loader.dataset.release()


def fingerprint(value: Any) -> str:
    """A short hash of JSON values (the recipe and evaluation a record was made with)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (``None`` outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


# ------------------------------------------------------------------------------------------------ the basis
def ensure_basis(out: Path, data: str, image_size: int, given: str | None) -> str:
    """The PCA basis for PMAE: ``given``, else ``<out>/basis-<S>.pt``, fitted there once when missing."""
    if given is not None:
        if not Path(given).is_file():
            raise EvidenceError(f"--basis: {given} does not exist (fit one: python -m magma_composer.pca fit ...)")
        return given
    path = out / f"basis-{image_size}.pt"
    if path.is_file():
        return str(path)
    command = [sys.executable, "-m", "magma_composer.pca", "fit", "--data", data, "--split", "train",
               "--image-size", str(image_size), "--out", str(path), "--no-progress"]  # fmt: skip
    print(f"[evidence] fitting the PCA basis for PMAE: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0 or not path.is_file():
        raise EvidenceError(f"the PCA basis fit failed (exit status {done.returncode}); give one with --basis FILE")
    print(f"[evidence] basis {path} fitted in {time.perf_counter() - start:.0f} s", flush=True)
    return str(path)


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_encoder(
    path: str, basis: str | None, settings: dict, out: Path, desc: str, cpu_threads: int | None = None
) -> dict:
    """kNN and the fast linear probe of one exported encoder, per pooling: ``{pool: {"knn": ..., "linear": ...}}``.

    Features come from the feature cache in ``<out>/features`` (keyed by the encoder's and basis' hashes and the
    data); the results of an encoder already evaluated with the same settings are read from ``<out>/evals``. On a
    CPU the forward passes take ``cpu_threads`` threads (default: every core).
    """
    import torch

    from magma_composer.checkpoints import write_atomic
    from magma_composer.evaluate.encoders import load_encoder
    from magma_composer.evaluate.features import cached_pooled_features
    from magma_composer.evaluate.knn import KNNProtocol
    from magma_composer.evaluate.linear import FastLinearProbe

    encoder = load_encoder(path, basis=basis)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the training set its own thread count (cores less its loader workers)
        torch.set_num_threads(cpu_threads or os.cpu_count() or 1)
    key = {"encoder": encoder.sha256, "basis": encoder.basis_sha256, "settings": settings, "device": device}
    memo = out / "evals" / f"{fingerprint(key)}.json"
    if memo.is_file():
        stored = json.loads(memo.read_text())
        if stored.get("key") == json.loads(json.dumps(key, default=str)):
            return stored["results"]
    knn, probe = KNNProtocol(**settings["knn"]), FastLinearProbe(**settings["linear_fast"])
    pools = settings["features"]["pools"]
    splits = []  # per section {pool: (features, labels)}: one forward pass per image serves every pooling
    for section in ("train_data", "test_data"):
        loader, options = evaluation_loader(settings, section, encoder.arch["img_size"])
        try:
            data_key = {k: v for k, v in options.items() if k not in ("num_workers", "batch_size")}
            splits.append(
                cached_pooled_features(
                    encoder,
                    loader,
                    data_key,
                    pools,
                    out / "features",
                    device,
                    settings["features"]["precision"],
                    desc=f"{desc} {section}",
                )  # fmt: skip
            )
        finally:
            loader.dataset.release()
    results: dict[str, Any] = {}
    for pool in pools:
        (train_x, train_y), (test_x, test_y) = splits[0][pool], splits[1][pool]
        k_res = knn.run(train_x, train_y, test_x, test_y, device=device)
        p_res = probe.run(train_x, train_y, test_x, test_y, device=device)
        results[pool] = {
            "knn": {
                f"k{row['k']}": row["top1"]
                for row in k_res["grid"]
                if row["distance"] == k_res["distance"] and row["temperature"] == k_res["temperature"]
            },
            "knn_grid": k_res["grid"],
            "linear": p_res["top1"],
            "linear_detail": {k: p_res[k] for k in ("top5", "train_top1", "l2", "iterations", "warnings", "seconds")},
            "samples": {"train": len(train_y), "test": len(test_y)},
        }
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(memo, lambda f: f.write(json.dumps({"key": key, "results": results}, default=str).encode()))
    return results


# ------------------------------------------------------------------------------------------------ one cell
def _loss_summary(rows: list[dict]) -> dict:
    """First and last values, and the mean over the last tenth of the steps, of each ``loss/train/*`` metric."""
    out = {}
    names = sorted({k for r in rows for k in r if k.startswith("loss/train/")})
    for name in names:
        values = [r[name] for r in rows if name in r]
        tail = values[-max(1, len(values) // 10) :]
        out[name] = {"first": values[0], "last": values[-1], "last_tenth_mean": statistics.fmean(tail)}
    return out


def run_cell(method: str, seed: int, recipe: dict, settings: dict, out: Path, basis: str | None, meta: dict) -> dict:
    """Trains one (method, seed) cell, exports its initial and trained encoders, evaluates both, writes its record."""
    import torch

    from magma_composer.callbacks import StepMetrics
    from magma_composer.checkpoints import export_encoder, write_atomic
    from magma_composer.config import ConfigError, validate
    from magma_composer.precision import default_precision
    from magma_composer.train import build_trainer

    name = f"{method}-s{seed}"
    cells, encoders = out / "cells", out / "encoders"
    cells.mkdir(parents=True, exist_ok=True)
    encoders.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        trainer = build_trainer(validate(recipe))
    except ConfigError as exc:
        raise EvidenceError(f"cell {name}: {exc}") from None
    steps_log = StepMetrics()  # every metric under the step it belongs to, whichever event logs it
    trainer.logger.destinations = (*trainer.logger.destinations, steps_log)
    trainer.state.callbacks.append(steps_log)
    try:
        init_path, trained_path = str(encoders / f"{name}-init.pt"), str(encoders / f"{name}.pt")
        export_encoder(trainer.state.model, init_path)  # the weights before the first step
        build_seconds = time.perf_counter() - start
        fit_start = time.perf_counter()
        trainer.fit()
        train_seconds = time.perf_counter() - fit_start
        steps = int(trainer.state.timestamp.batch)
        export_encoder(trainer.state.model, trained_path)
        rows = [r for r in steps_log.rows() if 0 <= r["step"] < steps]  # time/* is logged once more at the end
        train_threads = torch.get_num_threads()
        device = "gpu" if type(trainer.state.device).__name__ == "DeviceGPU" else "cpu"
        # on a CPU Composer runs in fp32 while the model autocasts itself: the recipe's precision is the one in use
        precision = recipe.get("precision") or default_precision(device)
    finally:
        trainer.close()
    metrics_file = cells / f"{name}.metrics.jsonl"
    write_atomic(metrics_file, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
    eval_start = time.perf_counter()
    threads = recipe.get("cpu_threads")
    init = evaluate_encoder(init_path, basis, settings, out, f"{name} init", threads)
    init_seconds = time.perf_counter() - eval_start
    trained = evaluate_encoder(trained_path, basis, settings, out, f"{name} trained", threads)
    eval_seconds = time.perf_counter() - eval_start
    record = {
        "format": RECORD_FORMAT,
        "method": method,
        "seed": seed,
        **meta,
        "recipe": recipe,
        "evaluation": settings,
        "fingerprint": fingerprint({"recipe": _without_seed(recipe), "evaluation": settings}),
        "basis": basis,
        "encoders": {"init": init_path, "trained": trained_path},
        "metrics_file": metrics_file.name,
        "steps": steps,
        "torch_threads": train_threads,
        "precision": precision,
        "device": device,
        "seconds": {
            "build": build_seconds,
            "train": train_seconds,
            "per_step": train_seconds / max(1, steps),
            "eval_init": init_seconds,
            "eval_trained": eval_seconds - init_seconds,
            "total": time.perf_counter() - start,
        },
        "losses": _loss_summary(rows),
        "results": {"init": init, "trained": trained},
    }
    write_atomic(cells / f"{name}.json", lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    return record


def reevaluate_cell(path: Path, record: dict, settings: dict, out: Path, basis: str | None, expected: str) -> dict:
    """Evaluates a finished cell's saved encoders (initial and trained) with ``settings`` and rewrites its record:
    the new evaluation, results, fingerprint and evaluation times; the training's fields are kept, and
    ``reevaluated`` notes the fingerprint and evaluation the results replaced."""
    from magma_composer.checkpoints import write_atomic

    name = f"{record['method']}-s{record['seed']}"
    print(f"[evidence] {name}: evaluating the saved encoders again (the training is kept)", flush=True)
    threads = record["recipe"].get("cpu_threads")
    start = time.perf_counter()
    init = evaluate_encoder(record["encoders"]["init"], basis, settings, out, f"{name} init", threads)
    init_seconds = time.perf_counter() - start
    trained = evaluate_encoder(record["encoders"]["trained"], basis, settings, out, f"{name} trained", threads)
    previous = {
        "fingerprint": record.get("fingerprint"),
        "evaluation": record.get("evaluation"),
        "git": record.get("git"),
    }
    record = {
        **record,
        "evaluation": settings,
        "fingerprint": expected,
        "results": {"init": init, "trained": trained},
        "seconds": {
            **record["seconds"],
            "eval_init": init_seconds,
            "eval_trained": time.perf_counter() - start - init_seconds,
        },
        "reevaluated": {**previous, "at_git": git_commit()},
    }
    write_atomic(path, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    return record


def _without_seed(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if k not in ("seed", "run_name")}


def read_record(path: Path) -> dict:
    """A cell's record, checked for the fields the report needs."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvidenceError(f"{path}: not a readable record ({exc}); delete it to recompute the cell") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise EvidenceError(f"{path}: not an evidence record (format {RECORD_FORMAT}); delete it or use another --out")
    return record


def _format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def command_run(args: argparse.Namespace) -> int:
    """``run``: every (method, seed) cell without a record, in order, with progress and an ETA."""
    recipes = Path(args.recipes) if args.recipes else preset_dir(args.preset)
    if not recipes.is_dir():
        raise EvidenceError(f"--recipes: {recipes} is not a folder of method recipes")
    cells = cells_to_run(recipes, args.methods, args.seeds)
    methods = list(cells)
    for method in methods:
        if not (recipes / f"{method}.yaml").is_file():
            raise EvidenceError(f"--methods: {method!r} has no recipe {recipes / (method + '.yaml')}")
    data = args.data
    for split in ("train", "test"):
        if not (Path(data) / split / "index.json").is_file():
            raise EvidenceError(f"--data: {data} has no MDS split {split!r} ({Path(data) / split / 'index.json'})")
    sets, eval_sets = _overrides(args.set, "--set"), _overrides(args.eval_set, "--eval-set")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # every recipe and the evaluation data are checked before the first cell trains (and before PMAE's basis is
    # fitted): a typo fails now, not an hour in
    first = [training_recipe(recipes, method, cells[method][0], data, sets) for method in methods]
    for method, recipe in zip(methods, first):
        if method != "pmae":  # PMAE's recipe builds once its basis exists, below
            check_buildable(recipe, f"recipe {recipes / (method + '.yaml')}")
    check_evaluation_data(evaluation_settings(recipes, data, eval_sets, False), int(first[0]["model"]["img_size"]))
    plan = []
    basis = None
    for method, probe_recipe in zip(methods, first):
        raw_pixels = method == "pmae"
        if raw_pixels:
            size = int(probe_recipe["model"]["img_size"])
            if args.dry_run and args.basis is None and not (out / f"basis-{size}.pt").is_file():
                basis = str(out / f"basis-{size}.pt")
                print(f"[evidence] dry run: PMAE's basis would be fitted into {basis} first", flush=True)
            else:
                basis = ensure_basis(out, data, size, args.basis)
        settings = evaluation_settings(recipes, data, eval_sets, raw_pixels)
        for seed in cells[method]:
            recipe = training_recipe(recipes, method, seed, data, sets, basis if raw_pixels else None)
            plan.append((method, seed, recipe, settings, basis if raw_pixels else None))
        if raw_pixels and Path(basis).is_file():
            check_buildable(plan[-1][2], f"recipe {recipes / (method + '.yaml')}")

    meta = {"preset": args.preset if not args.recipes else None, "recipes": str(recipes), "git": git_commit()}
    todo, stale, done_count = [], [], 0
    for method, seed, recipe, settings, cell_basis in plan:
        path = out / "cells" / f"{method}-s{seed}.json"
        if path.is_file():
            record = read_record(path)
            expected = fingerprint({"recipe": _without_seed(recipe), "evaluation": settings})
            if record.get("fingerprint") == expected:
                done_count += 1
                continue
            # the same training, evaluated otherwise: its saved encoders can be evaluated again without training
            same_training = isinstance(record.get("recipe"), dict) and expected == fingerprint(
                {"recipe": _without_seed(record["recipe"]), "evaluation": settings}
            )
            if same_training and args.reevaluate:
                stale.append((path, record, settings, cell_basis, expected))
                continue
            hint = (
                "its training matches this run's, only the evaluation differs: add --reevaluate to evaluate its "
                "saved encoders with this run's evaluation"
                if same_training
                else "use another --out, or delete the record to recompute"
            )
            raise EvidenceError(
                f"{path} was made with another recipe or evaluation than this run's (fingerprint "
                f"{record.get('fingerprint')} vs {expected}); {hint}"
            )
        todo.append((method, seed, recipe, settings, cell_basis))
    total = len(plan)
    counts = ", ".join(f"{m} x {len(cells[m])}" for m in methods)
    again = f", {len(stale)} to evaluate again" if stale else ""
    print(f"[evidence] {total} cells ({counts} seeds) in {out}: "
          f"{done_count} already done{again}, {len(todo)} to run", flush=True)  # fmt: skip
    for path, record, *_ in stale:  # before any training: a missing encoder fails now, not hours in
        for which in ("init", "trained"):
            if not Path(str(record.get("encoders", {}).get(which))).is_file():
                raise EvidenceError(
                    f"--reevaluate: {path}'s {which} encoder {record.get('encoders', {}).get(which)} is missing; "
                    "delete the record to train the cell again"
                )
    if args.dry_run:
        for path, *_ in stale:
            print(f"[evidence] would evaluate {path.name}'s encoders again with this run's evaluation", flush=True)
        for method, seed, recipe, settings, _ in todo:
            algorithms = ", ".join(sorted(recipe.get("algorithms") or {})) or "none"
            print(f"[evidence] would run {method} seed {seed}: {recipe['max_duration']} of "
                  f"{recipe['train_data']['batch_size']}, model {recipe['model']}, optimizer {recipe['optimizer']}, "
                  f"algorithms {algorithms}; evaluation pools {settings['features']['pools']}", flush=True)  # fmt: skip
        return 0
    for path, record, settings, cell_basis, expected in stale:
        reevaluate_cell(path, record, settings, out, cell_basis, expected)
    started, spent = time.perf_counter(), []
    for i, (method, seed, recipe, settings, cell_basis) in enumerate(todo):
        print(f"[evidence] cell {done_count + i + 1}/{total}: {method} seed {seed} ...", flush=True)
        record = run_cell(method, seed, recipe, settings, out, cell_basis, meta)
        spent.append(record["seconds"]["total"])
        left = len(todo) - i - 1
        eta = statistics.fmean(spent) * left
        res = record["results"]
        pool = settings["features"]["pools"][0]
        k_first = f"k{settings['knn']['k'][0]}"
        print(
            f"[evidence] cell {method} seed {seed} done in {_format_seconds(record['seconds']['total'])} "
            f"(train {record['seconds']['train']:.0f} s, {record['seconds']['per_step'] * 1000:.0f} ms/step): "
            f"{pool} linear {res['init'][pool]['linear']:.2f} -> {res['trained'][pool]['linear']:.2f}, "
            f"kNN@{k_first[1:]} {res['init'][pool]['knn'][k_first]:.2f} -> {res['trained'][pool]['knn'][k_first]:.2f}"
            f" | {left} left, ETA {_format_seconds(eta)} (elapsed {_format_seconds(time.perf_counter() - started)})",
            flush=True,
        )
    print(f"[evidence] all {total} cells done; python experiments/evidence.py report --out {out}", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ report
def t_quantile_975(df: int) -> float:
    """Student's t 97.5 % quantile with ``df`` degrees of freedom (the half-width factor of a 95 % interval).

    The density is integrated with Simpson's rule and the quantile found by bisection: exact to about 1e-6,
    without a statistics dependency for one number."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, steps: int = 4000) -> float:
        h = x / steps
        f = [norm * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 20.0  # the largest quantile, df = 1, is 12.71
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return (lo + hi) / 2


def _stats(values: list[float]) -> dict:
    """Mean, sample std (n - 1), range and, from 2 values on, the 95 % t interval of the mean."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "ci95": None if half is None else [mean - half, mean + half],
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def figures(results: dict) -> dict[str, float]:
    """The figures of one encoder's results: ``'<pool> linear'`` and ``'<pool> kNN@<k>'`` -> top-1 %."""
    out = {}
    for pool, res in results.items():
        out[f"{pool} linear"] = res["linear"]
        for k, value in res["knn"].items():
            out[f"{pool} kNN@{k[1:]}"] = value
    return out


def summarize(records: list[dict]) -> dict:
    """The report's numbers: per method and figure, the trained, init and gain statistics, and the paired
    differences to MAE by seed."""
    by_method: dict[str, dict[int, dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    methods = [m for m in METHODS if m in by_method] + sorted(set(by_method) - set(METHODS))
    summary: dict[str, Any] = {"methods": {}, "paired_vs_mae": {}}
    for method in methods:
        cells = by_method[method]
        seeds = sorted(cells)
        trained = {s: figures(cells[s]["results"]["trained"]) for s in seeds}
        init = {s: figures(cells[s]["results"]["init"]) for s in seeds}
        names = [n for n in trained[seeds[0]] if all(n in trained[s] for s in seeds)]
        entry = {"seeds": seeds, "seconds_per_cell": _stats([cells[s]["seconds"]["total"] for s in seeds])}
        for name in names:
            entry[name] = {
                "trained": _stats([trained[s][name] for s in seeds]),
                "init": _stats([init[s][name] for s in seeds]),
                "gain": _stats([trained[s][name] - init[s][name] for s in seeds]),
            }
        entry["figures"] = names
        summary["methods"][method] = entry
        if method != "mae" and "mae" in by_method:
            common = sorted(set(seeds) & set(by_method["mae"]))
            if not common:
                continue
            mae = {s: figures(by_method["mae"][s]["results"]["trained"]) for s in common}
            paired = {"seeds": common}
            for name in names:
                if all(name in mae[s] for s in common):
                    diffs = [trained[s][name] - mae[s][name] for s in common]
                    paired[name] = {**_stats(diffs), "positive": sum(d > 0 for d in diffs)}
            summary["paired_vs_mae"][method] = paired
    return summary


def _pm(stats: dict, digits: int = 2) -> str:
    std = "-" if stats["std"] is None else f"{stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} +- {std}"


def _range(stats: dict) -> str:
    return f"{stats['min']:.2f}..{stats['max']:.2f}"


def _ci(stats: dict) -> str:
    return "-" if stats["ci95"] is None else f"[{stats['ci95'][0]:+.2f}, {stats['ci95'][1]:+.2f}]"


def _paired_figures(names: list[str]) -> list[str]:
    """The figures the Markdown table pairs against MAE: each pooling's linear probe and first kNN."""
    out = []
    for pool in dict.fromkeys(n.split(" ")[0] for n in names):
        out += [n for n in names if n == f"{pool} linear"]
        out += [n for n in names if n.startswith(f"{pool} kNN@")][:1]
    return out


def format_report(summary: dict) -> str:
    """The report as text: per figure a table of methods (with the gain over the initialisation and its 95 % t
    interval), the paired differences to MAE, then a Markdown table."""
    lines = []
    methods = summary["methods"]
    names = next(iter(methods.values()))["figures"] if methods else []
    for name in names:
        lines.append(f"== {name} (top-1 %; mean +- std over seeds, range; 95 % t interval of the mean gain)")
        lines.append(
            f"{'method':8} {'n':>2}  {'trained':>15} {'range':>13}  {'init':>15}  {'gain':>15}  {'gain 95 % CI':>16}"
        )
        for method, entry in methods.items():
            if name not in entry:
                continue
            t, i, g = entry[name]["trained"], entry[name]["init"], entry[name]["gain"]
            lines.append(
                f"{method:8} {t['n']:>2}  {_pm(t):>15} {_range(t):>13}  {_pm(i):>15}  {_pm(g):>15}  {_ci(g):>16}"
            )
        paired = [(m, p[name]) for m, p in summary["paired_vs_mae"].items() if name in p]
        if paired:
            lines.append("   paired difference to MAE, same seed (mean +- std, min..max, 95 % CI, seeds positive)")
            for method, p in paired:
                lines.append(
                    f"   {method:8} {_pm(p):>15} {_range(p):>13}  {_ci(p):>16}  {p['positive']}/{p['n']} positive"
                )
        lines.append("")
    lines.append("Markdown (docs/results.md; trained mean +- std (mean gain over the initialisation)):")
    lines.append("")
    pairs = _paired_figures(names)
    header = ["method", "seeds"] + [f"{n} (gain)" for n in names] + [f"{n} - MAE [95 % CI]" for n in pairs]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    for method, entry in methods.items():
        row = [method, str(len(entry["seeds"]))]
        for name in names:
            row.append(f"{_pm(entry[name]['trained'])} ({entry[name]['gain']['mean']:+.2f})" if name in entry else "")
        for name in pairs:
            p = summary["paired_vs_mae"].get(method, {}).get(name)
            if p is None:
                row.append("")
                continue
            spread = "" if p["std"] is None else f" +- {p['std']:.2f} {_ci(p)}"
            row.append(f"{p['mean']:+.2f}{spread} ({p['positive']}/{p['n']} positive)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cell_records(folder: str, flag: str) -> list[tuple[Path, dict]]:
    """Every ``(path, record)`` in ``<folder>/cells``; none is an error naming ``flag``."""
    cells = Path(folder) / "cells"
    paths = sorted(cells.glob("*.json")) if cells.is_dir() else []
    if not paths:
        raise EvidenceError(f"{flag}: {folder} holds no cell records ({cells}/*.json); run the matrix first")
    return [(p, read_record(p)) for p in paths]


def baseline_records(records: list[tuple[Path, dict]], folder: str, methods: Sequence[str]) -> list[dict]:
    """Another matrix's cells of ``methods`` to pair a follow-up run with, e.g. the main matrix's MAE cells.

    Refused: a method with no cell there, a (method, seed) that both folders hold, and a cell evaluated otherwise
    than the follow-up's cells (another ``eval.yaml`` or ``--eval-set``): its figures would not be comparable.
    """
    theirs = [(p, r) for p, r in _cell_records(folder, "--baseline") if r.get("method") in methods]
    for method in methods:
        if not any(r.get("method") == method for _, r in theirs):
            raise EvidenceError(f"--baseline-methods: {folder} has no {method} cell ({Path(folder) / 'cells'})")
    ours = {(r.get("method"), r.get("seed")): p for p, r in records}
    evaluation = records[0][1].get("evaluation")
    for path, record in theirs:
        key = (record.get("method"), record.get("seed"))
        if key in ours:
            raise EvidenceError(
                f"--baseline: {record['method']} seed {record['seed']} is in both {ours[key]} and {path}; "
                "leave it out of --baseline-methods, or report the folders apart"
            )
        if record.get("evaluation") != evaluation:
            raise EvidenceError(
                f"--baseline: {path} was evaluated with other settings than {records[0][0]} (eval.yaml and "
                "--eval-set must match), so their figures cannot be compared"
            )
    return [r for _, r in theirs]


def command_report(args: argparse.Namespace) -> int:
    """``report``: reads every record in ``<out>/cells`` (and ``--baseline``'s) and prints the summary (and JSON)."""
    if args.baseline_methods is not None and not args.baseline:
        raise EvidenceError("--baseline-methods: needs --baseline (the folder to take those methods' cells from)")
    methods = parse_methods(args.baseline_methods or "mae", "--baseline-methods")
    found = _cell_records(args.out, "--out")
    records = [r for _, r in found]
    if args.baseline:
        records += baseline_records(found, args.baseline, methods)
    if args.preset is not None:  # the default matrix's cells only: what `run --preset P` alone reproduces
        matrix = read_matrix(preset_dir(args.preset))
        records = [r for r in records if r.get("seed") in matrix.get(r.get("method"), ())]
        if not records:
            raise EvidenceError(f"--preset: {args.out} holds no cell of the {args.preset} preset's matrix")
        print(f"[evidence] the {args.preset} preset's matrix only: "
              + ", ".join(f"{m} seeds {','.join(map(str, s))}" for m, s in matrix.items()))  # fmt: skip
    summary = summarize(records)
    if args.baseline:
        print(f"[evidence] {', '.join(methods)} from {args.baseline}, the rest from {args.out}")
    print(format_report(summary))
    if args.json:
        payload = {"format": "magma_composer.evidence.report/1", "out": str(args.out), **summary}
        if args.baseline:
            payload["baseline"] = {"out": str(args.baseline), "methods": methods}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"\nwritten: {args.json}")
    return 0


# ------------------------------------------------------------------------------------------------ project
def project_recipe(path: str, step_seconds: float, gpus: int, dataset_size: int | None) -> dict:
    """One full-length recipe's steps and expected wall time from a measured seconds per step."""
    from composer.core import Time, TimeUnit

    from magma_composer.config import ConfigError, read_recipe

    try:
        raw = read_recipe(path)
    except ConfigError as exc:
        raise EvidenceError(f"--recipes: {exc}") from None
    batch = (raw.get("train_data") or {}).get("batch_size")
    duration = raw.get("max_duration")
    if not isinstance(batch, int) or duration is None:
        raise EvidenceError(f"--recipes: {path} has no train_data.batch_size or max_duration")
    remote = str((raw.get("train_data") or {}).get("remote", ""))
    size = dataset_size
    if size is None:
        size = next((n for word, n in DATASET_SIZES.items() if word in remote.lower() or word in path.lower()), None)
    if size is None:
        raise EvidenceError(f"--dataset-size: {path}'s data set ({remote}) has no known size; give --dataset-size N")
    global_batch = batch * gpus
    per_epoch = size // global_batch
    time_ = Time.from_timestring(str(duration))
    if time_.unit == TimeUnit.EPOCH:
        steps = per_epoch * time_.value
    elif time_.unit == TimeUnit.BATCH:
        steps = time_.value
    else:
        raise EvidenceError(f"--recipes: {path}'s max_duration {duration!r} is neither in epochs nor in batches")
    hours = steps * step_seconds / 3600
    model = raw.get("model") or {}
    encoder = model.get("encoder")
    if isinstance(encoder, dict):
        encoder = "vit-{embed_dim}x{depth}".format(**{"embed_dim": "?", "depth": "?", **encoder})
    return {
        "recipe": path,
        "model": f"{encoder}@{model.get('img_size', '?')}",
        "epochs": time_.value if time_.unit == TimeUnit.EPOCH else None,
        "dataset_size": size,
        "global_batch": global_batch,
        "steps": steps,
        "hours": hours,
        "gpu_hours": hours * gpus,
    }


def command_project(args: argparse.Namespace) -> int:
    """``project``: the full-length recipes' steps and wall time on ``--gpus`` GPUs at ``--step-seconds``."""
    if not (args.step_seconds > 0 and math.isfinite(args.step_seconds)):
        raise EvidenceError(f"--step-seconds: must be a positive number of seconds, got {args.step_seconds}")
    if args.gpus < 1:
        raise EvidenceError(f"--gpus: must be at least 1, got {args.gpus}")
    if args.dataset_size is not None and args.dataset_size < 1:
        raise EvidenceError(f"--dataset-size: must be at least 1, got {args.dataset_size}")
    patterns = args.recipes or [str(REPO / p) for p in DEFAULT_PROJECT_RECIPES]
    paths = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not found or not all(Path(p).is_file() for p in found):
            raise EvidenceError(f"--recipes: {pattern} names no recipe file")
        paths.extend(found)
    rows = [project_recipe(p, args.step_seconds, args.gpus, args.dataset_size) for p in paths]
    print(f"{args.step_seconds} s per step at each recipe's per-device batch, {args.gpus} GPU(s)")
    print("(the step time is the one of the model it was measured with: compare only the rows of that model)")
    print(f"{'recipe':48} {'model':28} {'epochs':>6} {'batch':>6} {'steps':>9} {'hours':>8} {'GPU-hours':>10}")
    for r in rows:
        shown = os.path.relpath(r["recipe"], REPO) if Path(r["recipe"]).is_absolute() else r["recipe"]
        epochs = "" if r["epochs"] is None else str(r["epochs"])
        print(f"{shown:48} {r['model']:28} {epochs:>6} {r['global_batch']:>6} {r['steps']:>9} {r['hours']:>8.1f} "
              f"{r['gpu_hours']:>10.1f}")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------------------ entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="experiments/evidence.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate every (method, seed) cell without a record")
    run.add_argument("--preset", default="cpu", help=f"one of {', '.join(PRESETS)} (yamls/evidence/<preset>/)")
    run.add_argument("--recipes", default=None, help="a folder of method recipes and eval.yaml instead of --preset")
    run.add_argument("--data", required=True, help="an image data set as MDS with splits train and test (CIFAR-10)")
    run.add_argument("--out", required=True, help="the matrix's folder (records, encoders, features)")
    run.add_argument("--methods", default=None, help=f"comma-separated, from {', '.join(METHODS)} (default: "
                     "the methods of the preset's matrix.yaml)")  # fmt: skip
    run.add_argument("--seeds", default=None, help="comma-separated integers, for every method (default: each "
                     "method's seeds in the preset's matrix.yaml, else 0,1,2)")  # fmt: skip
    run.add_argument("--basis", default=None, help="PMAE's PCA basis (default: <out>/basis-<S>.pt, fitted once)")
    run.add_argument("--set", action="append", default=[], help="key.path=value for every training recipe")
    run.add_argument("--eval-set", action="append", default=[], help="key.path=value for the evaluation")
    run.add_argument("--dry-run", action="store_true", help="check every recipe and print the cells to run; no work")
    run.add_argument("--reevaluate", action="store_true", help="evaluate again, with this run's evaluation, the "
                     "saved encoders of cells trained with this run's recipe but evaluated otherwise")  # fmt: skip
    report = sub.add_parser("report", help="per method statistics and paired differences to MAE")
    report.add_argument("--out", required=True, help="the matrix's folder")
    report.add_argument("--json", default=None, help="also write the summary to this JSON file")
    report.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)}: only the cells of its "
                        "matrix.yaml (what `run --preset P` reproduces); default: every cell in --out")  # fmt: skip
    report.add_argument("--baseline", default=None, help="another matrix's folder to take --baseline-methods from")
    report.add_argument("--baseline-methods", default=None, help="comma-separated methods of --baseline (default mae)")
    project = sub.add_parser("project", help="full-length recipes' wall time from a measured step time")
    project.add_argument("--step-seconds", type=float, required=True, help="measured seconds per training step")
    project.add_argument("--recipes", nargs="*", default=None, help="recipe files or globs (default: ImageNet ones)")
    project.add_argument("--gpus", type=int, default=1, help="GPUs, each at the recipe's per-device batch")
    project.add_argument("--dataset-size", type=int, default=None, help="training images (default: known sizes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": command_run, "report": command_report, "project": command_project}
    from magma_composer.config import ConfigError
    from magma_composer.evaluate.encoders import EncoderError
    from magma_composer.options import OptionError

    try:
        return commands[args.command](args)
    except (EvidenceError, ConfigError, EncoderError) as exc:
        print(f"evidence.py: error: {exc}", file=sys.stderr)
        return 2
    except OptionError as exc:
        print(f"evidence.py: error: {exc.key}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
