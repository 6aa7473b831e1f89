"""Evaluation recipes: YAML sections become keyword arguments of the evaluation's parts.

An evaluation recipe (``yamls/eval/``) is read like a training recipe (:mod:`magma_composer.config`: ``base:``
recipes, ``key.path=value`` overrides that replace the value at their path, keys and types checked against the
owners' signatures before anything is built, values checked by the owners):

=================  ==========================================================================  ==================
section            owner                                                                       protocols
=================  ==========================================================================  ==================
``encoder``        :func:`magma_composer.evaluate.encoders.load_encoder`                        all
``train_data``     :func:`magma_composer.data.build_image_dataloader` (as in training)          all
``test_data``      the same                                                                     all
``features``       :class:`magma_composer.evaluate.features.FeatureOptions`                     knn, linear-fast
``knn``            :class:`magma_composer.evaluate.knn.KNNProtocol`                             knn
``linear_fast``    :class:`magma_composer.evaluate.linear.FastLinearProbe`                      linear-fast
``model``          :class:`magma_composer.evaluate.classifier.EncoderClassifier`                linear, mlp, finetune
``optimizer``      :func:`magma_composer.evaluate.optim.build_eval_optimizer`                   linear, mlp, finetune
``scheduler``      :func:`magma_composer.train.build_scheduler`                                 linear, mlp, finetune
``algorithms``     :data:`magma_composer.registry.EVAL_ALGORITHMS` (``mixup_cutmix``, ...)     linear, mlp, finetune
``callbacks``      :data:`magma_composer.registry.CALLBACKS`                                    linear, mlp, finetune
``loggers``        :data:`magma_composer.registry.LOGGERS`                                      linear, mlp, finetune
``wandb``          :func:`magma_composer.evaluate.results.log_to_wandb`                         all
everything else    :class:`EvalConfig` (the run: seed, device, precision, output, ...)          (see its fields)
=================  ==========================================================================  ==================

A section or key that the protocol does not use is refused (it would have no effect).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Union

from magma_composer import registry
from magma_composer.config import INJECTED, ConfigError, build_section, check_run_keys, read_recipe, validate

__all__ = ["EVAL_SECTION_OWNERS", "PROTOCOLS", "EvalConfig", "load_eval_config", "run_evaluation"]

#: protocol -> what it measures (``python -m magma_composer.evaluate --help`` lists them)
PROTOCOLS: dict[str, str] = {
    "knn": "weighted kNN on frozen features: a grid over k, temperature and distance from one feature pass",
    "linear-fast": "logistic regression (L-BFGS) on frozen features extracted once and cached on disk",
    "linear": "a linear head trained on augmented images through the frozen encoder (PMAE's and MAE's protocols)",
    "mlp": "PMAE's three-layer MLP head on the frozen encoder",
    "finetune": "end-to-end fine-tuning: layer-wise lr decay, drop path, MixUp / CutMix / label smoothing, RandAugment",
}
FEATURE_PROTOCOLS = ("knn", "linear-fast")
TRAINER_PROTOCOLS = ("linear", "mlp", "finetune")

EVAL_SECTION_OWNERS: dict[str, str] = {
    "encoder": "magma_composer.evaluate.encoders:load_encoder",
    "train_data": "magma_composer.data.loader:build_image_dataloader",
    "test_data": "magma_composer.data.loader:build_image_dataloader",
    "features": "magma_composer.evaluate.features:FeatureOptions",
    "knn": "magma_composer.evaluate.knn:KNNProtocol",
    "linear_fast": "magma_composer.evaluate.linear:FastLinearProbe",
    "model": "magma_composer.evaluate.classifier:EncoderClassifier",
    "optimizer": "magma_composer.evaluate.optim:build_eval_optimizer",
    "scheduler": "magma_composer.train:build_scheduler",
    "wandb": "magma_composer.evaluate.results:log_to_wandb",
}

EVAL_INJECTED: dict[str, tuple[str, ...]] = {
    "train_data": INJECTED["train_data"],
    "test_data": INJECTED["train_data"],
    "features": ("precision",),
    "model": ("encoder", "num_classes", "prepare", "freeze_encoder", "head"),
    "optimizer": ("model", "global_batch"),
    "callbacks": INJECTED["callbacks"],
    "wandb": ("record",),
}

#: keys that only some protocols use (a recipe that sets one for another protocol is refused)
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "features": FEATURE_PROTOCOLS,
    "knn": ("knn",),
    "linear_fast": ("linear-fast",),
    **{
        key: TRAINER_PROTOCOLS
        for key in (
            "model",
            "optimizer",
            "scheduler",
            "algorithms",
            "callbacks",
            "loggers",
            "num_classes",
            "max_duration",
            "eval_interval",
            "device_train_microbatch_size",
        )
    },
}

_TIME_KEYS = ("max_duration", "eval_interval")


@dataclass
class EvalConfig:
    """A checked evaluation recipe: the run's own keys (checked here) and the sections (checked by their owners)."""

    encoder: dict  #: load_encoder options: path, format, num_heads, basis, weights, seed
    train_data: dict  #: the labelled training split (kNN memory bank, probe / fine-tuning training set)
    test_data: dict  #: the held-out split the figures are measured on
    features: dict = field(default_factory=dict)
    knn: dict = field(default_factory=dict)
    linear_fast: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    algorithms: dict = field(default_factory=dict)
    callbacks: dict = field(default_factory=dict)
    loggers: dict = field(default_factory=dict)
    wandb: dict | None = None  #: log the record to Weights & Biases (project, entity, name, group, tags, mode)
    num_classes: int | None = None  #: linear / mlp / finetune: the classifier's outputs (labels 0 .. n-1)
    max_duration: str | None = None  #: linear / mlp / finetune: Composer time, e.g. 100ep
    eval_interval: str = "1ep"  #: linear / mlp / finetune: how often the test split is measured (Composer time)
    device_train_microbatch_size: Union[int, str, None] = None
    run_name: str | None = None  #: default: the protocol, the time and a random suffix
    seed: int = 17
    device: str | None = None  #: cpu | gpu (default: gpu when there is one)
    precision: str | None = None  #: default: amp_bf16 on GPU and on a CPU with native bf16, else fp32
    cpu_threads: int | None = None  #: CPU runs: torch threads per rank (default: the rank's share of the cores)
    progress_bar: bool = True
    output: str | None = "runs/eval/{run_name}.json"  #: the JSON record ({run_name}, {protocol} filled in); null: none
    overwrite: bool = False  #: replace an existing record at ``output``
    dist_timeout: float = 300.0

    def __post_init__(self) -> None:
        check_run_keys(self, _TIME_KEYS)
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"num_classes: must be at least 2, got {self.num_classes}")
        if self.overwrite and self.output is None:
            raise ConfigError("overwrite: has no effect without output (the record's file); set output or drop it")
        if self.precision == "amp_fp8":
            raise ConfigError("precision: amp_fp8 is for training transformer layers; use amp_bf16, amp_fp16 or fp32")


def load_eval_config(protocol: str, path: str, overrides: list[str] | None = None) -> tuple[EvalConfig, dict]:
    """Reads an evaluation recipe for ``protocol``; returns the checked config and the raw recipe (for the record).

    Raises:
        ConfigError: an unknown protocol, a bad file or key, or a key the protocol does not use.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    raw = read_recipe(path, overrides)
    if not isinstance(raw, dict):
        raise ConfigError(f"the recipe must be a mapping of keys, got {type(raw).__name__}")
    for key, protocols in _ONLY_FOR.items():
        if protocol not in protocols and raw.get(key) not in (None, {}):
            raise ConfigError(
                f"{key}: has no effect for protocol {protocol!r} (it applies to {', '.join(protocols)}); "
                f"remove it, or {key}=null"
            )
    raw = {k: v for k, v in raw.items() if not (k in _ONLY_FOR and protocol not in _ONLY_FOR[k])}
    encoder = raw.get("encoder")
    if isinstance(encoder, dict) and encoder.get("path") is None:  # the shipped recipes leave it to the command line
        raise ConfigError(
            "encoder.path: no encoder given; add encoder.path=FILE (a checkpoint of ours, an exported timm state "
            "dict or timm .mae weights, or facebookresearch/mae's mae_pretrain_vit_*.pth)"
        )
    components = {"algorithms": registry.EVAL_ALGORITHMS, "callbacks": registry.CALLBACKS, "loggers": registry.LOGGERS}
    cfg = validate(raw, EvalConfig, EVAL_SECTION_OWNERS, EVAL_INJECTED, components)
    if protocol in TRAINER_PROTOCOLS:
        for key in ("num_classes", "max_duration"):
            if getattr(cfg, key) is None:
                raise ConfigError(f"missing required key {key!r}: protocol {protocol!r} trains a classifier")
    return cfg, raw


# ---------------------------------------------------------------------------------------------- running
def _data_options(section: str, options: dict, encoder: Any) -> dict:
    """The data section with the encoder's image size filled in; a size or normalisation the encoder was not
    trained for is an error."""
    size = encoder.arch["img_size"]
    given = options.get("image_size")
    if given is not None and given != size:
        patch = encoder.arch.get("patch_size")
        why = (
            f"its position embeddings cover {size // patch} x {size // patch} patches" if patch else "its training size"
        )
        raise ConfigError(
            f"{section}.image_size: {given}, but the encoder takes {size} x {size} images ({why}); "
            f"set {section}.image_size={size} or leave it out"
        )
    normalize = options.get("normalize", "imagenet")
    if encoder.normalize == "none" and normalize != "none":
        raise ConfigError(
            f"{section}.normalize: {normalize!r}, but the encoder standardises raw pixels itself (encoder.basis); "
            f"set {section}.normalize=none"
        )
    return {**options, "image_size": size}


def _labelled(section: str, loader: Any, protocol: str, where: str) -> None:
    if not loader.dataset.has_labels:
        raise ConfigError(
            f"{section}: the data set at {where} has no labels (no 'y' column in its shards); "
            f"protocol {protocol!r} needs labelled images"
        )


def run_evaluation(protocol: str, cfg: EvalConfig, raw: dict) -> dict:
    """Runs one evaluation; returns its record (:func:`magma_composer.evaluate.results.make_record`).

    Rank 0 writes the record to ``cfg.output``, prints its console line and logs it to W&B if configured.

    Raises:
        ConfigError: any bad option, file or data set, named by its key path.
    """
    import torch
    from composer.utils import dist, get_device, reproducibility

    from magma_composer.checkpoints import check_output_file, resolve_run_name
    from magma_composer.data.loader import build_image_dataloader
    from magma_composer.evaluate.encoders import load_encoder
    from magma_composer.evaluate.results import console_line, log_to_wandb, make_record, write_record

    start = time.perf_counter()
    device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device: 'gpu', but torch sees no CUDA GPU on this machine; use cpu (or leave device unset)")
    dist.initialize_dist(get_device(device), cfg.dist_timeout)
    run_name = resolve_run_name(cfg.run_name or None)
    if cfg.run_name is None:
        run_name = f"{protocol}-{run_name}"
    output = None if cfg.output is None else cfg.output.format(run_name=run_name, protocol=protocol)
    if output is not None:
        build_section("output", check_output_file, output, "output", overwrite=cfg.overwrite,
                      overwrite_option="overwrite=true")  # fmt: skip
    if cfg.wandb is not None:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("wandb: needs the wandb package (pip install wandb)")
    reproducibility.seed_all(cfg.seed)
    if device == "cpu":
        from magma_composer.train import cpu_threads

        torch.set_num_threads(cpu_threads(cfg))

    encoder = build_section("encoder", load_encoder, **cfg.encoder)
    loaders: list[Any] = []

    def data(section: str, train: bool, **injected: Any) -> Any:
        options = _data_options(section, getattr(cfg, section), encoder)
        options = {"shuffle_seed": cfg.seed, **options}
        loader = build_section(section, build_image_dataloader, train=train, cache_tag=f"eval-{section}",
                               **injected, **options)  # fmt: skip
        loaders.append(loader)
        split = f" (split {options['split']})" if options.get("split") else ""
        _labelled(section, loader, protocol, f"{options.get('remote')}{split}")
        return loader

    try:
        if protocol in FEATURE_PROTOCOLS:
            metrics, data_info = _feature_protocol(protocol, cfg, encoder, data, device)
        else:
            metrics, data_info = _trainer_protocol(protocol, cfg, encoder, data, device, run_name)
    finally:
        for loader in loaders:
            loader.dataset.release()

    record = make_record(
        protocol=protocol,
        run_name=run_name,
        encoder={
            "source": encoder.source,
            "format": encoder.format,
            "sha256": encoder.sha256,
            "basis_sha256": encoder.basis_sha256,
            "weights": encoder.weights,
            "arch": encoder.arch,
            "options": cfg.encoder,
        },
        data=data_info,
        settings=copy.deepcopy(raw),
        metrics=metrics,
        seconds=time.perf_counter() - start,
        world_size=dist.get_world_size(),
        device=device,
    )
    if dist.get_global_rank() == 0:
        if output is not None:
            build_section("output", write_record, record, output)
        print(console_line(record, output), flush=True)
        for warning in metrics.get("warnings", []):
            print(f"magma_composer.evaluate: warning: {warning}", file=sys.stderr, flush=True)
        if cfg.wandb is not None:
            where = build_section("wandb", log_to_wandb, record, **cfg.wandb)
            print(f"wandb: {where}", flush=True)
    return record


def _feature_protocol(protocol: str, cfg: EvalConfig, encoder: Any, data: Any, device: str) -> tuple[dict, dict]:
    from magma_composer.evaluate.features import FeatureOptions

    options = build_section("features", FeatureOptions, precision=cfg.precision, **cfg.features)
    torch_device = "cuda" if device == "gpu" else "cpu"
    # the protocol's options are checked before the features are extracted: a bad value fails in seconds
    if protocol == "knn":
        from magma_composer.evaluate.knn import KNNProtocol

        runner = build_section("knn", KNNProtocol, **cfg.knn)
    else:
        from magma_composer.evaluate.linear import FastLinearProbe

        runner = build_section("linear_fast", FastLinearProbe, **cfg.linear_fast)
    info, splits = {}, []
    for section in ("train_data", "test_data"):
        # the evaluation transform on both splits; indices let several ranks' features be put back in order
        loader = data(section, train=False, return_index=True)
        x, y = build_section(
            "features",
            options.features,
            encoder,
            loader,
            data_key={k: v for k, v in getattr(cfg, section).items() if k not in ("num_workers", "batch_size")},
            device=torch_device,
            progress=cfg.progress_bar,
            desc=section,
        )
        splits.append((x, y))
        info[section] = {**getattr(cfg, section), "samples": len(y), "classes": int(y.unique().numel())}
    (train_x, train_y), (test_x, test_y) = splits
    section = "knn" if protocol == "knn" else "linear_fast"
    metrics = build_section(section, runner.run, train_x, train_y, test_x, test_y, device=torch_device)
    metrics = {**metrics, "pool": options.pool, "feature_dim": int(train_x.shape[1])}
    return metrics, info


def _trainer_protocol(
    protocol: str, cfg: EvalConfig, encoder: Any, data: Any, device: str, run_name: str
) -> tuple[dict, dict]:
    from composer.utils import dist

    from magma_composer.evaluate.classifier import EncoderClassifier
    from magma_composer.evaluate.optim import build_eval_optimizer
    from magma_composer.evaluate.supervised import run_supervised
    from magma_composer.train import build_components, build_scheduler

    injected: dict[str, Any] = {"freeze_encoder": protocol != "finetune"}
    if protocol != "finetune":
        injected["head"] = "mlp" if protocol == "mlp" else "linear"
    model = build_section(
        "model",
        EncoderClassifier,
        encoder=encoder.vit,
        num_classes=cfg.num_classes,
        prepare=encoder.prepare,
        **injected,
        **cfg.model,
    )
    global_batch = cfg.train_data.get("batch_size", 0) * dist.get_world_size()
    optimizer = build_section("optimizer", build_eval_optimizer, model, global_batch, **cfg.optimizer)
    scheduler = build_section("scheduler", build_scheduler, **cfg.scheduler)
    algorithms = build_components("algorithms", cfg.algorithms, registry.EVAL_ALGORITHMS, {})
    loggers = build_components("loggers", cfg.loggers, registry.LOGGERS, {})
    train_loader = data("train_data", train=True)
    test_loader = data("test_data", train=False)
    callbacks = build_components(
        "callbacks",
        cfg.callbacks,
        registry.CALLBACKS,
        {
            "train_loader": None,
            "test_loader": test_loader,
            "normalize": cfg.test_data.get("normalize", "imagenet"),
            "pixel_stats": cfg.test_data.get("pixel_stats"),
        },
    )
    metrics = build_section(
        "trainer",
        run_supervised,
        model,
        train_loader,
        test_loader,
        optimizer,
        scheduler,
        max_duration=cfg.max_duration,
        algorithms=algorithms,
        loggers=loggers,
        callbacks=callbacks,
        device=device,
        precision=cfg.precision,
        seed=cfg.seed,
        eval_interval=cfg.eval_interval,
        progress_bar=cfg.progress_bar,
        run_name=run_name,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
    )
    info = {
        section: {
            **getattr(cfg, section),
            "size": loader.dataset.size,
            "samples_per_epoch": getattr(cfg, section).get("max_samples") or loader.dataset.size,
        }
        for section, loader in (("train_data", train_loader), ("test_data", test_loader))
    }
    return metrics, info
