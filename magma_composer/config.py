"""The recipe schema: typed dataclasses, validated before any model or data is built.

A recipe is a YAML mapping; :func:`load_config` merges dot-list overrides (``optimizer.lr=3e-4``) into
it and checks every key against the dataclasses below. Any unknown key, wrong type or missing required
key is a :class:`ConfigError` naming the key path (``train_data.batch_size``) and what is valid.
Algorithm, callback and logger options are checked against their classes' signatures.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from magma_composer import registry

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "validate",
]

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A recipe error: names the key path and what would be valid."""


@dataclass
class ModelConfig:
    """``model:``: the ComposerMAE."""

    encoder: Union[str, dict] = "vit_base_patch16_224"  #: timm ViT name, or {embed_dim, depth, num_heads, mlp_ratio}
    img_size: int = 224
    patch_size: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16


@dataclass
class DataConfig:
    """``train_data:`` / ``eval_data:``: an MDS image data set (local folder or object storage)."""

    remote: str  #: a local folder or a URI (s3://bucket/prefix; S3_ENDPOINT_URL for S3-compatible stores)
    batch_size: int  #: per device
    local: str | None = None  #: local cache folder, unique per data set on a node (default: a temp folder)
    split: str | None = None  #: sub-folder of remote, e.g. train / val
    image_size: int | None = None  #: default: model.img_size
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    normalize: str = "imagenet"  #: imagenet | none (pixels in [0, 1], for PCA masking)
    resize_ratio: float = 1.0  #: evaluation: resize to image_size / resize_ratio, then centre crop
    num_workers: int = 2
    shuffle: bool | None = None  #: default true (seeded): capped kNN sets and pictures then span the classes
    shuffle_seed: int | None = None  #: default: the recipe's seed
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int | None = None  #: keep fixed across resumptions with different node counts
    predownload: int | None = None
    cache_limit: str | None = None  #: e.g. 100gb: evict shards beyond this
    download_retry: int = 2
    download_timeout: float = 60.0  #: seconds per S3 request (connect and read)
    download_threads: int = 1  #: shards fetched at once per loader worker
    shard_deadline: float | None = None  #: seconds to wait for one shard; default from the two above
    validate_hash: str = "auto"  #: auto (xxh64 when the shards carry it) | xxh64 | sha1 | ... | none
    drop_last: bool = True
    max_samples: int | None = None  #: use only the first N samples (subset experiments)
    persistent_workers: bool = True


@dataclass
class OptimizerConfig:
    """``optimizer:``: DecoupledAdamW. Give ``lr``, or ``base_lr`` scaled by the global batch / 256."""

    lr: float | None = None
    base_lr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.05  #: torch.optim.AdamW convention (decay lr_t * weight_decay per step), as the papers
    no_decay_norm_bias: bool = True  #: no weight decay on norms, biases, cls/mask tokens, position embeddings


@dataclass
class SchedulerConfig:
    """``scheduler:``: linear warm-up then cosine decay, in Composer time."""

    warmup: str = "0ba"  #: e.g. 10ep, 500ba, 0.025dur
    alpha_f: float = 0.0  #: final lr as a fraction of the peak


@dataclass
class TrainConfig:
    """The whole recipe."""

    model: ModelConfig
    train_data: DataConfig
    max_duration: str
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    eval_data: DataConfig | None = None
    run_name: str | None = None
    seed: int = 17
    precision: str | None = None  #: fp32 | amp_fp16 | amp_bf16 (default: amp_bf16 on GPU, fp32 on CPU)
    device: str | None = None  #: cpu | gpu (default: what is there)
    cpu_threads: int | None = None  #: CPU runs: torch threads per rank (default: cores per rank - loader workers)
    device_train_microbatch_size: Union[int, str, None] = None  #: int or auto; default: the per-device batch
    eval_interval: Union[str, int] = "1ep"
    algorithms: dict = field(default_factory=dict)  #: name -> options (false: off), see magma_composer.registry
    callbacks: dict = field(default_factory=dict)
    loggers: dict = field(default_factory=dict)  #: wandb: {...}, file: {...}; console is always on
    progress_bar: bool = True
    console_log_interval: str = "1ep"
    log_to_console: bool = False
    save_folder: str | None = None
    save_interval: str = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    parallelism_config: dict | None = None  #: passed through to the Trainer (fsdp: {...})
    dist_timeout: float = 300.0
    compile: bool = False  #: torch.compile the model (compile_config passed to the Trainer)
    export_encoder: str | None = None  #: write the trained encoder's timm state dict here at the end


# ---------------------------------------------------------------------- parsing
def parse_overrides(items: list[str]) -> dict:
    """``['a.b=1', 'c=[1, 2]']`` -> ``{'a': {'b': 1}, 'c': [1, 2]}``; values are parsed as YAML."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p}")
        parsed = yaml.safe_load(value) if value != "" else None
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                parsed = float(parsed) if any(c.isdigit() for c in parsed) else parsed
            except ValueError:
                pass
        node[parts[-1]] = parsed
    return out


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for k, v in over.items():
            merged[k] = _merge(base[k], v) if k in base else v
        return merged
    return over


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_value(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected null, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r} ({type(value).__name__})")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 without a dot as a string: accept numeric strings for floats
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{path}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    return value


def _build_dataclass(cls: type, data: Any, path: str) -> Any:
    where = path or "the recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"unknown key {key!r}; valid keys in {where} are: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _check_value(data[name], hints[name], key)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"missing required key {key!r} ({_type_name(hints[name])})")
    return cls(**kwargs)


def _check_component_options(section: str, entries: dict, reg: dict, kind: str) -> None:
    # ``name: false`` switches off an entry that a base recipe turned on (e.g. ``callbacks.lr_monitor=false``)
    for name in [n for n, options in entries.items() if options is False]:
        del entries[name]
    for name, options in entries.items():
        path = f"{section}.{name}"
        if name not in reg:
            raise ConfigError(f"unknown {kind} {path!r}; valid names are: {', '.join(sorted(reg))}")
        if options is None:
            continue
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: expected a mapping of options (or null), got {options!r}")
        cls = registry.resolve(reg, name, kind)
        params = inspect.signature(cls.__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        valid = [p for p in params if p != "self" and not (section == "callbacks" and p in _INJECTED)]
        for key in options:
            if key not in valid:
                what = (
                    f"valid options of {cls.__name__} are: {', '.join(valid)}"
                    if valid
                    else f"{cls.__name__} takes none"
                )
                raise ConfigError(f"unknown key '{path}.{key}'; {what}")
        missing = [
            p.name
            for p in params.values()
            if p.name != "self" and p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        missing = [m for m in missing if m not in options and not (section == "callbacks" and m in _INJECTED)]
        if missing:
            raise ConfigError(f"missing required key '{path}.{missing[0]}' for {cls.__name__}")


#: callback arguments that train.py fills in from the recipe itself
_INJECTED = ("train_loader", "test_loader", "normalize")

_PRECISIONS = ("fp32", "amp_fp16", "amp_bf16", "amp_fp8")
_DEVICES = ("cpu", "gpu", "mps")


def validate(raw: dict) -> TrainConfig:
    """Checks a raw recipe mapping and returns the typed config; raises :class:`ConfigError`."""
    cfg = _build_dataclass(TrainConfig, raw, "")
    if cfg.precision is not None and cfg.precision not in _PRECISIONS:
        raise ConfigError(f"precision: {cfg.precision!r} is not valid; choose one of {', '.join(_PRECISIONS)}")
    if cfg.device is not None and cfg.device not in _DEVICES:
        raise ConfigError(f"device: {cfg.device!r} is not valid; choose one of {', '.join(_DEVICES)}")
    mb = cfg.device_train_microbatch_size
    if isinstance(mb, str) and mb != "auto":
        raise ConfigError(f"device_train_microbatch_size: expected an integer or 'auto', got {mb!r}")
    opt = cfg.optimizer
    if (opt.lr is None) == (opt.base_lr is None):
        raise ConfigError(
            "optimizer: give exactly one of 'optimizer.lr' (absolute) or 'optimizer.base_lr' (x batch / 256)"
        )
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"optimizer.betas: expected two numbers in [0, 1), got {opt.betas}")
    for section in ("train_data", "eval_data"):
        data = getattr(cfg, section)
        if data is None:
            continue
        if data.batch_size <= 0:
            raise ConfigError(f"{section}.batch_size: must be positive, got {data.batch_size}")
        for key in ("download_threads", "download_timeout", "shard_deadline"):
            value = getattr(data, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{section}.{key}: must be positive, got {value}")
        if data.normalize not in ("imagenet", "none"):
            raise ConfigError(f"{section}.normalize: {data.normalize!r} is not valid; choose imagenet or none")
        if len(data.crop_scale) != 2 or not 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1:
            raise ConfigError(f"{section}.crop_scale: expected [lo, hi] with 0 < lo <= hi <= 1, got {data.crop_scale}")
    from composer.core import Time

    for key in ("max_duration", "scheduler.warmup", "save_interval", "console_log_interval", "eval_interval"):
        obj, attr = (cfg.scheduler, "warmup") if key == "scheduler.warmup" else (cfg, key)
        value = getattr(obj, attr)
        if isinstance(value, int):
            continue
        try:
            Time.from_timestring(value)
        except (ValueError, TypeError):
            raise ConfigError(
                f"{key}: {value!r} is not a Composer time string (an integer and a unit: ep, ba, sp, dur, e.g. '10ep')"
            ) from None
    if isinstance(cfg.model.encoder, dict):
        allowed = {"embed_dim": int, "depth": int, "num_heads": int, "mlp_ratio": float, "qkv_bias": bool}
        for key, value in cfg.model.encoder.items():
            if key not in allowed:
                raise ConfigError(f"unknown key 'model.encoder.{key}'; valid keys are: {', '.join(allowed)}")
            _check_value(value, allowed[key], f"model.encoder.{key}")
        for key in ("embed_dim", "depth", "num_heads"):
            if key not in cfg.model.encoder:
                raise ConfigError(f"missing required key 'model.encoder.{key}' (or give a timm model name)")
    if not 0 <= cfg.model.mask_ratio < 1:
        raise ConfigError(f"model.mask_ratio: must be in [0, 1), got {cfg.model.mask_ratio}")
    _check_component_options("algorithms", cfg.algorithms, registry.ALGORITHMS, "algorithm")
    _check_component_options("callbacks", cfg.callbacks, registry.CALLBACKS, "callback")
    _check_component_options("loggers", cfg.loggers, registry.LOGGERS, "logger")
    return cfg


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Reads one recipe file, resolving its ``base:`` (a recipe path, relative to this file, or a list)."""
    if not path.is_file():
        where = f" (the base of {str(chain[-1])!r})" if chain else ""
        raise ConfigError(f"recipe {str(path)!r}{where} does not exist (or is not a file)")
    if path.resolve() in chain:
        raise ConfigError(f"recipe {str(path)!r}: 'base' recipes form a cycle")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r}: the top level must be a mapping of keys, got {type(raw).__name__}")
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"recipe {str(path)!r}: 'base' must be a recipe path or a list of them, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, _read_recipe(path.parent / base, chain + (path.resolve(),)))
    return _merge(merged, raw)


def load_config(path: Union[str, Path], overrides: list[str] | None = None) -> TrainConfig:
    """Reads a recipe (and its ``base:`` recipes), applies dot-list overrides and validates it.

    A recipe may start from others: ``base: mae-vitb16.yaml`` (relative to the recipe's folder) is read
    first and the recipe's own keys are merged over it, mapping by mapping.

    Raises:
        ConfigError: a missing/unreadable file, bad YAML, or a bad key (named by its path).
    """
    raw = _read_recipe(Path(path))
    raw = _merge(raw, parse_overrides(overrides or []))
    return validate(raw)
