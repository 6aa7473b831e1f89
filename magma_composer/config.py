"""Reading recipes: YAML sections become keyword arguments of the constructors that own them.

A recipe is a YAML mapping. Each section goes, as keyword arguments, to the one constructor that owns its options
(llm-foundry's style), and that constructor checks the values:

=================  =====================================================================================
section            owner
=================  =====================================================================================
``model``          the class :data:`magma_composer.registry.MODELS` names by the section's ``name`` (default
                   ``mae``: :class:`~magma_composer.models.ComposerMAE`; ``simclr``, ``vicreg``)
``train_data``     :func:`magma_composer.data.build_image_dataloader`, then :class:`StreamingImageDataset`,
``eval_data``      :class:`CheckedStreamingDataset` and ``streaming.StreamingDataset`` (``**kwargs`` pass on)
``optimizer``      :func:`magma_composer.train.build_optimizer`
``scheduler``      :func:`magma_composer.train.build_scheduler`
``algorithms``     the classes of :data:`magma_composer.registry.ALGORITHMS`, by name
``callbacks``      :data:`magma_composer.registry.CALLBACKS`
``loggers``        :data:`magma_composer.registry.LOGGERS`
everything else    :class:`TrainConfig` (the run: duration, precision, checkpoints...)
=================  =====================================================================================

This module checks only keys and types, against the owners' signatures (type hints checked strictly with
pydantic: ``"false"`` is not a bool, ``1.5`` is not an int), so that a typo fails before any model or data is
built. The owners check the values when :func:`magma_composer.train.build_trainer` builds them; every failure
either way is a :class:`ConfigError` ``<key path>: <what is wrong and what is valid>``.

Recipes may start from others (``base: mae-vitb16.yaml``): the base is read first and the recipe's mappings are
merged into it key by key. A ``key.path=value`` override on the command line REPLACES the value at its path, a
mapping included (``algorithms.magma.weight='{type: constant, value: 1.0}'`` replaces an inherited warm-up
window); ``name=false`` switches off an algorithm, callback or logger that a base recipe turned on.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import yaml

from magma_composer import registry
from magma_composer.precision import PRECISIONS

__all__ = [
    "ConfigError",
    "NAMED_SECTIONS",
    "SECTION_OWNERS",
    "TrainConfig",
    "apply_overrides",
    "build_section",
    "check_components",
    "check_named_section",
    "check_options",
    "check_run_keys",
    "check_value",
    "load_config",
    "parse_overrides",
    "read_recipe",
    "read_yaml",
    "section_class",
    "validate",
]


class ConfigError(ValueError):
    """A recipe error: names the key path and what would be valid."""


# ---------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; here it is a float, as in YAML 1.2."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(text: str, where: str) -> Any:
    """Parses YAML text (``where`` names it in the error)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None


# ---------------------------------------------------------------------- the run's own options
_DEVICES = ("cpu", "gpu", "mps")
_TIME_KEYS = ("max_duration", "eval_interval", "save_interval", "console_log_interval")


@dataclass
class TrainConfig:
    """A checked recipe: the run's own options (checked here) and the sections (checked by their owners).

    Sections hold keyword arguments: ``model``, ``train_data``, ``eval_data``, ``optimizer``, ``scheduler``, and
    ``algorithms`` / ``callbacks`` / ``loggers`` as ``{name: options}``.
    """

    max_duration: str  #: Composer time, e.g. 400ep, 10000ba
    model: dict
    train_data: dict
    optimizer: dict
    scheduler: dict = field(default_factory=dict)
    eval_data: dict | None = None
    algorithms: dict = field(default_factory=dict)
    callbacks: dict = field(default_factory=dict)
    loggers: dict = field(default_factory=dict)  #: console is always on (progress_bar / log_to_console)
    run_name: str | None = None
    seed: int = 17
    #: fp32 | amp_fp16 | amp_bf16 | amp_fp8 (default: amp_bf16 on GPU and bf16 CPUs, else fp32; CPU: fp32, amp_bf16)
    precision: str | None = None
    device: str | None = None  #: cpu | gpu | mps (default: gpu when there is one)
    cpu_threads: int | None = None  #: CPU runs: torch threads per rank (default: the rank's share of the cores)
    device_train_microbatch_size: Union[int, str, None] = None  #: int or auto; default: the per-device batch
    eval_interval: Union[str, int, None] = None  #: needs eval_data; default 1ep
    progress_bar: bool = True
    console_log_interval: str = "1ep"
    log_to_console: bool = False
    save_folder: str | None = None  #: {run_name} is filled in; a run never writes into another run's folder
    save_interval: str | None = None  #: needs save_folder; default 1ep
    save_num_checkpoints_to_keep: int | None = None  #: needs save_folder; default -1 (all)
    save_overwrite: bool | None = None  #: needs save_folder or export_encoder; default false
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool | None = None  #: needs load_path; default false
    parallelism_config: dict | None = None  #: passed to the Trainer (fsdp: {...})
    dist_timeout: float = 300.0
    compile: bool = False  #: torch.compile the model
    export_encoder: str | None = None  #: write the trained encoder's timm state dict here at the end

    def __post_init__(self) -> None:
        check_run_keys(self, _TIME_KEYS)
        # an option whose subject is missing would be accepted and then ignored
        for key, needs in (
            ("eval_interval", "eval_data"),
            ("save_interval", "save_folder"),
            ("save_num_checkpoints_to_keep", "save_folder"),
            ("load_weights_only", "load_path"),
        ):
            if getattr(self, key) is not None and getattr(self, needs) is None:
                raise ConfigError(f"{key}: has no effect without {needs}; set {needs}, or {key}=null to drop it")
        if self.save_overwrite is not None and self.save_folder is None and self.export_encoder is None:
            raise ConfigError("save_overwrite: has no effect without save_folder or export_encoder")
        if self.save_num_checkpoints_to_keep is not None and self.save_num_checkpoints_to_keep < -1:
            raise ConfigError(f"save_num_checkpoints_to_keep: must be >= -1, got {self.save_num_checkpoints_to_keep}")
        if self.autoresume and (self.save_folder is None or self.run_name is None):
            missing = " and ".join(k for k in ("save_folder", "run_name") if getattr(self, k) is None)
            raise ConfigError(f"autoresume: true needs {missing} (the run's checkpoints are found by both)")
        self._check_model_fits_the_data()

    def _check_model_fits_the_data(self) -> None:
        """A two-view model (SimCLR, VICReg) needs ``train_data.views`` and a one-view model refuses them; callbacks
        that need what only the MAE has are refused for the others."""
        from magma_composer.models.two_view import TwoViewModel

        model_class = section_class("model", self.model)
        name = self.model.get("name", NAMED_SECTIONS["model"][1])
        two_views = issubclass(model_class, TwoViewModel)
        views = self.train_data.get("views")
        if two_views and views is None:
            raise ConfigError(
                f"train_data.views: model {name!r} ({model_class.__name__}) trains on two augmented views of each "
                f"image; set train_data.views (a preset: simclr or vicreg, or {{preset: ..., <overrides>}})"
            )
        if not two_views and views is not None:
            two_view_names = sorted(
                n for n in registry.MODELS if issubclass(registry.resolve(registry.MODELS, n, "model"), TwoViewModel)
            )
            raise ConfigError(
                f"train_data.views: model {name!r} ({model_class.__name__}) takes one image per sample; remove "
                f"views, or choose a two-view model (model.name: {' or '.join(two_view_names)})"
            )
        microbatch, batch = self.device_train_microbatch_size, self.train_data.get("batch_size")
        if two_views and (
            microbatch == "auto" or (isinstance(microbatch, int) and isinstance(batch, int) and microbatch < batch)
        ):
            raise ConfigError(
                f"device_train_microbatch_size: {microbatch!r}, but the loss of model {name!r} is a function of the "
                f"whole per-device batch ({batch}: its negatives or statistics), not a sum over samples; split into "
                f"microbatches it would be another loss: set it to {batch}, or leave it out"
            )
        if "reconstruction_images" in self.callbacks and not hasattr(model_class, "reconstruction_panels"):
            raise ConfigError(
                f"callbacks.reconstruction_images: model {name!r} ({model_class.__name__}) reconstructs no images "
                "(only the MAE does); remove the callback"
            )


def check_run_keys(cfg: Any, time_keys: tuple[str, ...]) -> None:
    """Checks the run keys that training and evaluation recipes share, where ``cfg`` has them: ``precision``,
    ``device``, ``cpu_threads``, ``device_train_microbatch_size``, ``seed``, ``dist_timeout``, ``run_name``, and the
    Composer time strings named by ``time_keys`` (``max_duration`` must be positive; an integer ``eval_interval``
    counts epochs, 0 for only at the end).

    Raises:
        ConfigError: naming the key and what is valid.
    """
    from composer.core import Time

    def get(key: str) -> Any:
        return getattr(cfg, key, None)

    if get("precision") is not None and cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision: {cfg.precision!r} is not valid; choose one of {', '.join(PRECISIONS)}")
    if get("device") is not None and cfg.device not in _DEVICES:
        raise ConfigError(f"device: {cfg.device!r} is not valid; choose one of {', '.join(_DEVICES)}")
    mb = get("device_train_microbatch_size")
    if (isinstance(mb, str) and mb != "auto") or (isinstance(mb, int) and mb < 1):
        raise ConfigError(f"device_train_microbatch_size: expected a positive integer or 'auto', got {mb!r}")
    if get("cpu_threads") is not None:
        if get("device") not in (None, "cpu"):
            raise ConfigError(f"cpu_threads: applies to CPU runs only, but device is {cfg.device!r}")
        if cfg.cpu_threads < 1:
            raise ConfigError(f"cpu_threads: must be >= 1, got {cfg.cpu_threads}")
    for key in time_keys:
        value = get(key)
        if value is None:
            continue
        if isinstance(value, int) and key == "eval_interval":
            if value < 0:
                raise ConfigError(f"eval_interval: must be >= 0 (0: only at the end), got {value}")
            continue
        try:
            time = Time.from_timestring(value)
        except (ValueError, TypeError):
            raise ConfigError(
                f"{key}: {value!r} is not a Composer time string (an integer and a unit: ep, ba, sp, tok, dur, "
                "e.g. '10ep')"
            ) from None
        if time.value <= 0 and key == "max_duration":
            raise ConfigError(f"max_duration: must be positive, got {value!r}")
    if get("seed") is not None and not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed: must be in [0, 2**32 - 1], got {cfg.seed}")
    if get("dist_timeout") is not None and not cfg.dist_timeout > 0:
        raise ConfigError(f"dist_timeout: must be a positive number of seconds, got {cfg.dist_timeout}")
    if get("run_name") is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run_name):
        raise ConfigError(f"run_name: {cfg.run_name!r} must be letters, digits, '.', '_' or '-' (it names folders)")


#: The owner of each section: where its keys come from (see the module's documentation).
SECTION_OWNERS: dict[str, str] = {
    "train_data": "magma_composer.data.loader:build_image_dataloader",
    "eval_data": "magma_composer.data.loader:build_image_dataloader",
    "optimizer": "magma_composer.train:build_optimizer",
    "scheduler": "magma_composer.train:build_scheduler",
}

#: Arguments of the owners that the builder fills in and a recipe cannot set.
INJECTED: dict[str, tuple[str, ...]] = {
    "model": (),
    "train_data": (
        "train",
        "cache_tag",
        "transform",
        "return_index",
        "streams",
        "stream_name",
        "stream_config",
        "epoch_size",
    ),
    "optimizer": ("model", "global_batch"),
    "scheduler": (),
    "callbacks": ("train_loader", "test_loader", "normalize", "pixel_stats"),
}
INJECTED["eval_data"] = INJECTED["train_data"]

#: Sections whose owner the section's own ``name`` key chooses: ``{section: (registry, default name)}``.
NAMED_SECTIONS: dict[str, tuple[dict[str, str], str]] = {"model": (registry.MODELS, "mae")}

#: the registries of a training recipe's ``algorithms`` / ``callbacks`` / ``loggers`` sections
COMPONENTS: dict[str, dict[str, str]] = {
    "algorithms": registry.ALGORITHMS,
    "callbacks": registry.CALLBACKS,
    "loggers": registry.LOGGERS,
}


# ---------------------------------------------------------------------- keys and types against a signature
def _next_owner(owner: Any) -> Any | None:
    """Where ``owner``'s ``**kwargs`` go: a function's ``kwargs_owner``, or a class's next base with an ``__init__``."""
    if inspect.isclass(owner):
        for base in owner.__mro__[1:]:
            if "__init__" in vars(base) and base is not object:
                return base
        return None
    return getattr(owner, "kwargs_owner", None)


def _parameters(owner: Any) -> list[tuple[inspect.Parameter, Any]]:
    """The keyword parameters of ``owner`` and its ``**kwargs`` chain, each with its type hint (``Any`` if none)."""
    out, seen = [], set()
    while owner is not None:
        fn = owner.__init__ if inspect.isclass(owner) else owner
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # an annotation that does not resolve here: check that parameter's key only
            hints = {}
        params = inspect.signature(fn).parameters
        for p in params.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in seen:
                seen.add(p.name)
                out.append((p, hints.get(p.name, Any)))
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
        owner = _next_owner(owner)
    return out


@functools.cache
def _adapter(hint: Any) -> Any:
    from pydantic import ConfigDict, TypeAdapter

    return TypeAdapter(hint, config=ConfigDict(strict=True, arbitrary_types_allowed=True))


def check_value(value: Any, hint: Any, path: str) -> Any:
    """``value`` checked strictly against the type hint ``hint`` (YAML lists are accepted where a tuple is expected).

    Raises:
        ConfigError: naming ``path``, the expected type and the value.
    """
    if hint is Any:
        return value
    from pydantic import ValidationError

    try:
        adapter = _adapter(hint)
    except Exception:  # a hint pydantic cannot build a validator for (e.g. a bare Protocol): key check only
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        error = exc
    if isinstance(value, list):  # YAML has no tuples
        try:
            return adapter.validate_python(tuple(value))
        except ValidationError as exc:
            error = exc
    messages = sorted({e["msg"] for e in error.errors()})
    shown = "; ".join(messages[:3])
    raise ConfigError(f"{path}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__}): {shown}") from None


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def check_options(owner: Any, options: Any, path: str, injected: tuple[str, ...] = ()) -> dict:
    """Checks a section's keys and types against ``owner``'s signature (and its ``**kwargs`` chain).

    Args:
        owner: the class or function that takes the options as keyword arguments.
        options: the section's mapping (``None``: no options).
        path: the section's key path, for messages.
        injected: parameters the builder fills in; a recipe may not set them.

    Returns:
        dict: the options, type-checked.

    Raises:
        ConfigError: an unknown key, a missing required key or a value of the wrong type, named by its path.
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {options!r} ({type(options).__name__})")
    params = {p.name: (p, hint) for p, hint in _parameters(owner) if p.name not in injected}
    name = getattr(owner, "__name__", str(owner))
    out = {}
    for key, value in options.items():
        if key not in params:
            valid = ", ".join(sorted(params)) or "none"
            raise ConfigError(f"unknown key '{path}.{key}'; valid keys of {path} ({name}) are: {valid}")
        out[key] = check_value(value, params[key][1], f"{path}.{key}")
    for key, (p, hint) in params.items():
        if p.default is inspect.Parameter.empty and key not in out:
            raise ConfigError(f"missing required key '{path}.{key}' ({_type_name(hint)}) for {name}")
    return out


def check_components(section: str, entries: Any, reg: dict[str, str] | None = None) -> dict:
    """Checks an ``algorithms`` / ``callbacks`` / ``loggers`` section: ``{name: options}``, each name registered and
    its options checked against its class; ``name: false`` drops an entry, ``name: true`` means no options."""
    if entries is None:
        return {}
    if not isinstance(entries, dict):
        raise ConfigError(f"{section}: expected a mapping of name -> options, got {entries!r}")
    reg = COMPONENTS[section] if reg is None else reg
    kind = section[:-1]
    out = {}
    for name, options in entries.items():
        if options is False:  # switched off (a base recipe turned it on)
            continue
        if name not in reg:
            raise ConfigError(f"unknown {kind} '{section}.{name}'; valid names are: {', '.join(sorted(reg))}")
        if options is True:
            options = None
        cls = registry.resolve(reg, name, kind)
        out[name] = check_options(cls, options, f"{section}.{name}", INJECTED.get(section, ()))
    return out


def check_named_section(
    section: str, options: Any, reg: dict[str, str], default: str, injected: tuple[str, ...] = ()
) -> dict:
    """Checks a section whose ``name`` key chooses its owner in ``reg`` (the ``model`` section: ``name: simclr``);
    the other keys and their types are checked against that class's signature.

    Returns:
        dict: the checked options, with ``name`` if the recipe gave it.

    Raises:
        ConfigError: an unknown name (the valid ones listed), or a key or type the chosen class does not take.
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"{section}: expected a mapping of options, got {options!r} ({type(options).__name__})")
    options = dict(options)
    given = "name" in options
    name = options.pop("name", default)
    if not isinstance(name, str) or name not in reg:
        raise ConfigError(f"{section}.name: unknown {section} {name!r}; valid names are: {', '.join(sorted(reg))}")
    cls = registry.resolve(reg, name, section)
    checked = check_options(cls, options, section, injected)
    return {"name": name, **checked} if given else checked


def section_class(section: str, options: dict | None) -> Any:
    """The class a checked named section (:data:`NAMED_SECTIONS`) builds: e.g. ``ComposerSimCLR`` for
    ``model: {name: simclr}``."""
    reg, default = NAMED_SECTIONS[section]
    return registry.resolve(reg, (options or {}).get("name", default), section)


def _resolve_owner(path: str) -> Any:
    module, _, attr = path.partition(":")
    import importlib

    return getattr(importlib.import_module(module), attr)


def validate(
    raw: Any,
    config_class: type | None = None,
    owners: dict[str, str] | None = None,
    injected: dict[str, tuple[str, ...]] | None = None,
    components: dict[str, dict[str, str]] | None = None,
    named: dict[str, tuple[dict[str, str], str]] | None = None,
) -> Any:
    """Checks a raw recipe's keys and types; returns the config dataclass or raises :class:`ConfigError`.

    Args:
        raw: the recipe mapping.
        config_class: the dataclass of the run's own keys and its sections (default :class:`TrainConfig`).
        owners: ``{section: 'module:owner'}`` (default :data:`SECTION_OWNERS`); ``algorithms`` / ``callbacks`` /
            ``loggers`` are checked against the registries.
        injected: per section, the owner's arguments that the builder fills in (default :data:`INJECTED`).
        components: the registries of the ``algorithms`` / ``callbacks`` / ``loggers`` sections (default
            :data:`COMPONENTS`).
        named: sections whose ``name`` key chooses the owner (default :data:`NAMED_SECTIONS`); ``owners`` take
            precedence (an evaluation recipe's ``model`` has one fixed owner).
    """
    config_class = config_class or TrainConfig
    owners = SECTION_OWNERS if owners is None else owners
    injected = INJECTED if injected is None else injected
    components = COMPONENTS if components is None else components
    named = NAMED_SECTIONS if named is None else named
    if not isinstance(raw, dict):
        raise ConfigError(f"the recipe must be a mapping of keys, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; valid top-level keys are: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {name!r}")
            continue
        value = raw[name]
        if name in owners:
            if value is None and f.default is None:  # an optional section switched off
                kwargs[name] = None
                continue
            kwargs[name] = check_options(_resolve_owner(owners[name]), value, name, injected.get(name, ()))
        elif name in named:
            kwargs[name] = check_named_section(name, value, *named[name], injected.get(name, ()))
        elif name in components:
            kwargs[name] = check_components(name, value, components[name])
        else:
            kwargs[name] = check_value(value, hints[name], name)
    return config_class(**kwargs)


# ---------------------------------------------------------------------- files and overrides
def parse_overrides(items: list[str]) -> list[tuple[tuple[str, ...], Any]]:
    """``['a.b=1', 'c=[1, 2]']`` -> ``[(('a', 'b'), 1), (('c',), [1, 2])]``; values are parsed as YAML."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        parts = tuple(key.strip().split("."))
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        out.append((parts, read_yaml(value, f"the value of override {key!r}") if value != "" else None))
    return out


def apply_overrides(recipe: dict, overrides: list[tuple[tuple[str, ...], Any]]) -> dict:
    """Sets each override's value at its path, replacing what was there (a mapping too); returns a new recipe."""
    import copy

    recipe = copy.deepcopy(recipe)
    for parts, value in overrides:
        node = recipe
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or child is True:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {'.'.join(parts)}: {where} is {child!r}, not a mapping with a key {parts[i + 1]!r}"
                )
            node = child
        node[parts[-1]] = value
    return recipe


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for k, v in over.items():
            merged[k] = _merge(base[k], v) if k in base else v
        return merged
    return over


def _read_recipe_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Reads one recipe file, resolving its ``base:`` (a recipe path, relative to this file, or a list)."""
    if not path.is_file():
        where = f" (the base of {str(chain[-1])!r})" if chain else ""
        raise ConfigError(f"recipe {str(path)!r}{where} does not exist (or is not a file)")
    if path.resolve() in chain:
        raise ConfigError(f"recipe {str(path)!r}: 'base' recipes form a cycle")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {exc}") from None
    raw = read_yaml(text, f"recipe {str(path)!r}")
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
        merged = _merge(merged, _read_recipe_file(path.parent / base, chain + (path.resolve(),)))
    return _merge(merged, raw)


def read_recipe(path: Union[str, Path], overrides: list[str] | None = None) -> dict:
    """Reads a recipe file (and its ``base:`` recipes) and applies ``key.path=value`` overrides; checks nothing else.

    Raises:
        ConfigError: a missing/unreadable file, bad YAML, a bad ``base`` or a malformed override.
    """
    raw = _read_recipe_file(Path(path))
    return apply_overrides(raw, parse_overrides(overrides or []))


def load_config(path: Union[str, Path], overrides: list[str] | None = None) -> TrainConfig:
    """Reads a training recipe (and its ``base:`` recipes), applies ``key.path=value`` overrides and checks it.

    Raises:
        ConfigError: a missing/unreadable file, bad YAML, or a bad key (named by its path).
    """
    return validate(read_recipe(path, overrides))


def build_section(path: str, build: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Calls an owner with a section's options; its complaints become :class:`ConfigError` named by ``path``.

    ``OptionError`` names the option (``model.mask_ratio: ...``); other ``ValueError`` / ``TypeError`` /
    ``OSError`` / ``ImportError`` name the section. Set ``MAGMA_COMPOSER_DEBUG=1`` to see the traceback instead.
    """
    import os

    from magma_composer.options import OptionError

    if os.environ.get("MAGMA_COMPOSER_DEBUG"):
        return build(*args, **kwargs)
    try:
        return build(*args, **kwargs)
    except ConfigError:
        raise
    except OptionError as exc:
        raise ConfigError(f"{path}.{exc.key}: {exc.message}") from exc
    except ImportError as exc:
        raise ConfigError(f"{path}: needs a package that is not installed: {exc}") from exc
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(path) else f"{path}: {message}") from exc
