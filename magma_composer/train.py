"""Train from a YAML recipe: ``YAML -> builders -> composer.Trainer``.

One process::

    python -m magma_composer.train yamls/demo/mae.yaml max_duration=2ep optimizer.lr=1e-3

Several processes or nodes (the composer launcher)::

    composer -n 8 -m magma_composer.train yamls/imagenet/mu-mae-vitb16.yaml
    composer -n 8 --world_size 16 --node_rank 0 --master_addr HOST --master_port 29500 \\
        -m magma_composer.train yamls/imagenet/mu-mae-vitb16.yaml

Every key of the recipe is checked (:mod:`magma_composer.config`) before any model or data is built.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch
from composer import Callback, Trainer
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from composer.utils import dist, get_device, reproducibility

from magma_composer import registry
from magma_composer.checkpoints import (
    CheckpointHashes,
    check_output_file,
    check_output_folder,
    export_encoder,
    guard_run,
    resolve_run_name,
    verify_checkpoint,
)
from magma_composer.config import INJECTED, ConfigError, TrainConfig, build_section, load_config, section_class
from magma_composer.data.loader import build_image_dataloader
from magma_composer.distributed import cores_per_rank
from magma_composer.options import OptionError, check_choice, check_number
from magma_composer.precision import cpu_autocast, default_precision

__all__ = [
    "OPTIMIZERS",
    "build_components",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "main",
]

_NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "reg_token")


OPTIMIZERS = ("adamw", "lars")


def build_optimizer(
    model: torch.nn.Module,
    global_batch: int,
    name: str = "adamw",
    lr: float | None = None,
    base_lr: float | None = None,
    weight_decay: float | None = None,
    betas: Sequence[float] | None = None,
    eps: float = 1e-8,
    momentum: float | None = None,
    trust_coefficient: float | None = None,
    trust_clip: bool | None = None,
    no_decay_norm_bias: bool = True,
) -> torch.optim.Optimizer:
    r"""The optimizer of a training recipe (its ``optimizer:`` section); give ``lr``, or ``base_lr`` x the batch.

    * ``name: adamw`` (default, the MAE recipes): Composer's DecoupledAdamW. ``weight_decay`` follows
      ``torch.optim.AdamW`` (and the papers): each step multiplies the weights by ``1 - lr_t * weight_decay``.
      Composer's DecoupledAdamW takes the unscaled factor, so it gets ``lr * weight_decay`` (and scales it by the
      schedule as AdamW does).
    * ``name: lars`` (the SimCLR / VICReg recipes): timm's ``Lars``, SGD with momentum whose step for each weight
      tensor :math:`w` with gradient :math:`g` is scaled by the layer-wise trust ratio

      .. math::

          u = \eta \frac{\|w\|}{\|g\| + \lambda \|w\| + \epsilon} (g + \lambda w), \qquad
          b \leftarrow \mu b + u, \qquad w \leftarrow w - \mathrm{lr}_t\, b

      (:math:`\eta` = ``trust_coefficient``, :math:`\lambda` = ``weight_decay``, coupled L2 decay as in SGD,
      :math:`\mu` = ``momentum``; the buffer :math:`b` starts as the first :math:`u`; the ratio is 1 when
      :math:`\|w\|` or :math:`\|g\|` is 0). With ``trust_clip`` the ratio is capped so that the adapted rate
      never exceeds the scheduled one (solo-learn's ``clip_lr``, NVIDIA's LARC): :math:`\min(\text{ratio} /
      \mathrm{lr}_t, 1)`. The excluded parameters (below) get neither the ratio nor decay: plain SGD with momentum,
      :math:`b \leftarrow \mu b + g`, :math:`w \leftarrow w - \mathrm{lr}_t b` (solo-learn's
      ``exclude_bias_n_norm``). timm applies the ratio per parameter group (a group with weight decay 0 and
      ``always_adapt`` off skips it), so the two kinds are two groups.

    Biases, norms (every parameter with at most one dimension), CLS/mask/register tokens and position embeddings
    are excluded from weight decay (and, for LARS, from the trust ratio) unless ``no_decay_norm_bias`` is false.

    Args:
        model (torch.nn.Module): the model whose trainable parameters are optimised.
        global_batch (int): samples per step over all ranks (for ``base_lr``).
        name (str): ``'adamw'`` or ``'lars'``.
        lr (float, optional): the peak learning rate.
        base_lr (float, optional): the peak learning rate per 256 samples: ``lr = base_lr * global_batch / 256``
            (solo-learn's ``lr`` is this ``base_lr``).
        weight_decay (float, optional): AdamW: decoupled, AdamW convention, default 0.05; LARS: coupled L2 decay
            inside the trust ratio, default 1e-6 (SimCLR's and VICReg's papers).
        betas (Sequence[float], optional): Adam's betas, each in [0, 1) (adamw only). Default: (0.9, 0.95).
        eps (float): Adam's epsilon (adamw), or the trust ratio's denominator term (lars).
        momentum (float, optional): LARS momentum in [0, 1) (lars only). Default: 0.9.
        trust_coefficient (float, optional): LARS's :math:`\eta` > 0 (lars only). Default: 0.001 (the LARS paper,
            timm); solo-learn's SimCLR / VICReg recipes use 0.02.
        trust_clip (bool, optional): cap the trust ratio at the scheduled learning rate (lars only). Default: false.
        no_decay_norm_bias (bool): exclude norms, biases, tokens and position embeddings from weight decay (and from
            LARS's trust ratio).
    """
    check_choice("name", name, OPTIMIZERS)
    if (lr is None) == (base_lr is None):
        raise OptionError("lr", "give exactly one of 'lr' (absolute) or 'base_lr' (x global batch / 256)")
    key, value = ("lr", lr) if lr is not None else ("base_lr", base_lr)
    check_number(key, value, 0.0, open_min=True)
    check_number("eps", eps, 0.0, open_min=True)
    # options of the other optimizer would be accepted and then ignored
    only = {"betas": ("adamw", betas), "momentum": ("lars", momentum), "trust_coefficient": ("lars", trust_coefficient),
            "trust_clip": ("lars", trust_clip)}  # fmt: skip
    for option, (owner, given) in only.items():
        if given is not None and name != owner:
            raise OptionError(option, f"applies to name: {owner} only, but name is {name!r}; remove it")
    if name == "adamw":
        weight_decay = 0.05 if weight_decay is None else weight_decay
        betas = (0.9, 0.95) if betas is None else betas
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise OptionError("betas", f"expected two numbers in [0, 1), got {list(betas)}")
    else:
        weight_decay = 1e-6 if weight_decay is None else weight_decay
        momentum = check_number("momentum", 0.9 if momentum is None else momentum, 0.0, 1.0, open_max=True)
        trust_coefficient = 0.001 if trust_coefficient is None else trust_coefficient
        check_number("trust_coefficient", trust_coefficient, 0.0, open_min=True)
        trust_clip = bool(trust_clip)
    check_number("weight_decay", weight_decay, 0.0)
    lr = lr if lr is not None else base_lr * global_batch / 256

    decay, no_decay = [], []
    for param_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = no_decay_norm_bias and (p.ndim <= 1 or param_name.split(".")[-1] in _NO_DECAY_NAMES)
        (no_decay if excluded else decay).append(p)
    if not decay and not no_decay:
        raise OptionError("model", f"{type(model).__name__} has no trainable parameters")
    if name == "adamw":
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}] if no_decay_norm_bias else decay
        return DecoupledAdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=lr * weight_decay)
    from timm.optim import Lars

    # always_adapt: the trust ratio even when weight_decay is 0; the excluded group (decay 0, no always_adapt)
    # is plain SGD with momentum
    groups = [{"params": decay, "weight_decay": weight_decay, "always_adapt": True}]
    if no_decay_norm_bias:
        groups.append({"params": no_decay, "weight_decay": 0.0, "always_adapt": False})
    return Lars(groups, lr=lr, momentum=momentum, trust_coeff=trust_coefficient, eps=eps, trust_clip=trust_clip)


def build_scheduler(warmup: str = "0ba", alpha_f: float = 0.0) -> CosineAnnealingWithWarmupScheduler:
    """Linear warm-up then cosine decay (the recipe's ``scheduler:`` section), stepped every batch.

    Args:
        warmup (str): the warm-up length in Composer time (``10ep``, ``500ba``, ``0.025dur``).
        alpha_f (float): the final learning rate as a fraction of the peak, in [0, 1].
    """
    from composer.core import Time

    try:
        Time.from_timestring(warmup)
    except (ValueError, TypeError):
        raise OptionError("warmup", f"{warmup!r} is not a Composer time string such as '10ep' or '500ba'") from None
    check_number("alpha_f", alpha_f, 0.0, 1.0)
    return CosineAnnealingWithWarmupScheduler(t_warmup=warmup, alpha_f=alpha_f)


def build_components(section: str, entries: dict, reg: dict, available: dict[str, Any]) -> list:
    """Builds each checked ``name: options`` entry of an ``algorithms`` / ``callbacks`` / ``loggers`` section.

    Arguments the builder fills in (:data:`magma_composer.config.INJECTED`) come from ``available`` (a value, or a
    function that makes it); a required one that is missing is a :class:`ConfigError` saying what it needs.
    """
    out = []
    for name, options in entries.items():
        cls = registry.resolve(reg, name, section[:-1])
        kwargs = dict(options)
        params = inspect.signature(cls.__init__).parameters
        for key in INJECTED.get(section, ()):
            if key not in params:
                continue
            if available.get(key) is None:
                if params[key].default is inspect.Parameter.empty:
                    raise ConfigError(f"{section}.{name}: needs {_NEEDS[key]}")
                continue
            kwargs[key] = available[key]() if callable(available[key]) else available[key]
        out.append(build_section(f"{section}.{name}", cls, **kwargs))
    return out


_NEEDS = {
    "test_loader": "an 'eval_data' section (its held-out images)",
    "train_loader": "a 'train_data' section",
    "normalize": "a data set",
}


class ReleaseData(Callback):
    """Frees the shared memory of the run's data sets when the Trainer is closed.

    streaming keeps a data set's shared memory until the process exits, and every new data set opens that of the
    earlier ones: a process that builds Trainer after Trainer (a notebook, a sweep, a test suite) would run out of
    file descriptors. Loaders built later (the kNN bank) are in the same list, so they are freed too.
    """

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def close(self, state: Any, logger: Any) -> None:
        for loader in self.loaders:
            loader.dataset.release()
        self.loaders.clear()


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Builds the model, data, optimizer, schedule, algorithms, callbacks and loggers, then the Trainer.

    Every option is checked by the constructor that owns it; a bad one is a :class:`ConfigError` naming its key
    path, raised before the Trainer starts.
    """
    reproducibility.seed_all(cfg.seed)
    device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device: 'gpu', but torch sees no CUDA GPU on this machine; use cpu (or leave device unset)")
    # joined now (the Trainer's own call is then a no-op) so that every rank agrees on a generated run name
    dist.initialize_dist(get_device(device), cfg.dist_timeout)
    run_name = resolve_run_name(cfg.run_name)
    save_folder = None if cfg.save_folder is None else cfg.save_folder.format(run_name=run_name)
    # output places are checked before any work, so that a long run never fails at its first save
    if save_folder is not None:
        build_section("save_folder", check_output_folder, save_folder, "save_folder")
    if cfg.export_encoder is not None:
        export_path = cfg.export_encoder.format(run_name=run_name)
        build_section(
            "export_encoder",
            check_output_file,
            export_path,
            "export_encoder",
            overwrite=bool(cfg.save_overwrite),
            overwrite_option="save_overwrite: true",
        )
    if cfg.load_path is not None:
        build_section("load_path", verify_checkpoint, cfg.load_path)
    # algorithms first: their options (schedules, basis files) fail before any model or data is built
    algorithms = build_components("algorithms", cfg.algorithms, registry.ALGORITHMS, {})
    model_options = dict(cfg.model)
    model_class = section_class("model", model_options)
    model_options.pop("name", None)
    model = build_section("model", model_class, **model_options)
    for name, algorithm in zip(cfg.algorithms, algorithms):  # options that depend on the model (block indices...)
        check_model = getattr(algorithm, "check_model", None)
        if check_model is not None:
            build_section(f"algorithms.{name}", check_model, model)
    build_section("save_folder", guard_run, save_folder, run_name, cfg.autoresume, bool(cfg.save_overwrite), model)
    global_batch = cfg.train_data.get("batch_size", 0) * dist.get_world_size()
    optimizer = build_section("optimizer", build_optimizer, model, global_batch, **cfg.optimizer)
    scheduler = build_section("scheduler", build_scheduler, **cfg.scheduler)
    loggers = build_components("loggers", cfg.loggers, registry.LOGGERS, {})

    loaders: list[Any] = []

    def data(section: str, options: dict, train: bool, tag: str) -> Any:
        options = {"image_size": model.img_size, "shuffle_seed": cfg.seed, **options}
        loader = build_section(section, build_image_dataloader, train=train, cache_tag=tag, **options)
        loaders.append(loader)
        return loader

    try:
        train_loader = data("train_data", cfg.train_data, True, "train")
        eval_loader = None if cfg.eval_data is None else data("eval_data", cfg.eval_data, False, "eval")

        def bank_loader() -> Any:  # the kNN memory bank: the training split with the evaluation transform
            # the training-only options (augmentations, two views) do not apply to the bank
            train_only = ("crop_scale", "hflip", "max_samples", "views", "auto_augment", "random_erase")
            options = {k: v for k, v in cfg.train_data.items() if k not in train_only}
            # seeded shuffle: a capped bank (knn_monitor.max_train_samples) is a random subset, not the first classes
            return data("train_data", {**options, "shuffle": True}, False, "bank")

        available = {
            "train_loader": bank_loader,
            "test_loader": eval_loader,
            "normalize": (cfg.eval_data or cfg.train_data).get("normalize", "imagenet"),
            "pixel_stats": (cfg.eval_data or cfg.train_data).get("pixel_stats"),
        }
        callbacks = build_components("callbacks", cfg.callbacks, registry.CALLBACKS, available)
        if save_folder is not None:
            callbacks.append(CheckpointHashes())
        callbacks.append(ReleaseData(loaders))

        precision = cfg.precision or default_precision(device)
        if device == "cpu":
            torch.set_num_threads(cpu_threads(cfg))
            # Composer autocasts only on GPUs: on a CPU the model autocasts itself and Composer runs in fp32
            build_section("precision", cpu_autocast, model, precision)
            precision = "fp32"
        microbatch = cfg.device_train_microbatch_size or cfg.train_data["batch_size"]
        # Composer's own checks, and the algorithms' and callbacks' INIT, run inside the Trainer's constructor
        return build_section(
            "trainer",
            Trainer,
            model=model,
            train_dataloader=train_loader,
            eval_dataloader=eval_loader,
            # Composer's default (1) when there is nothing to evaluate: it warns about any other value
            eval_interval=(cfg.eval_interval or "1ep") if eval_loader is not None else 1,
            max_duration=cfg.max_duration,
            optimizers=optimizer,
            schedulers=scheduler,
            step_schedulers_every_batch=True,
            algorithms=algorithms,
            callbacks=callbacks,
            loggers=loggers,
            run_name=run_name,
            progress_bar=cfg.progress_bar,
            log_to_console=cfg.log_to_console,
            console_log_interval=cfg.console_log_interval,
            save_folder=save_folder,
            save_interval=cfg.save_interval or "1ep",
            save_num_checkpoints_to_keep=-1
            if cfg.save_num_checkpoints_to_keep is None
            else cfg.save_num_checkpoints_to_keep,
            save_overwrite=bool(cfg.save_overwrite),
            autoresume=cfg.autoresume,
            load_path=cfg.load_path,
            load_weights_only=bool(cfg.load_weights_only),
            parallelism_config=cfg.parallelism_config,
            device=device,
            precision=precision,
            device_train_microbatch_size=microbatch,
            seed=cfg.seed,
            dist_timeout=cfg.dist_timeout,
            compile_config={} if cfg.compile else None,
        )
    except ConfigError:
        for loader in loaders:  # a failed build leaves no shared memory behind (streaming would keep it until exit)
            loader.dataset.release()
        raise


def cpu_threads(cfg: TrainConfig) -> int:
    """Torch threads per rank on CPU: the recipe's ``cpu_threads``, else every core this process may use, shared
    among the node's ranks. Loader workers are not subtracted: they decode between steps and measured runs were
    fastest with every core computing (docs/benchmarks.md, "CPU training speed")."""
    if cfg.cpu_threads is not None:
        return max(1, cfg.cpu_threads)
    return cores_per_rank()


def _checkpoint_path(trainer: Trainer) -> str | None:
    for cb in trainer.state.callbacks:
        saved = getattr(cb, "saved_checkpoints", None)
        if saved:
            return str(saved[-1])
    return None


def main(argv: list[str] | None = None) -> Trainer:
    """Entry point: ``python -m magma_composer.train RECIPE.yaml [key.path=value ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    try:
        cfg = load_config(argv[0], argv[1:])
        trainer = build_trainer(cfg)
    except ConfigError as exc:
        print(f"magma_composer.train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    trainer.fit()
    export_path = cfg.export_encoder.format(run_name=trainer.state.run_name) if cfg.export_encoder else None
    if export_path and dist.get_global_rank() == 0:
        export_encoder(trainer.state.model, export_path)
    if dist.get_global_rank() == 0:
        lines = []
        for cb in trainer.state.callbacks:
            if hasattr(cb, "summary"):
                lines.append(cb.summary())
        ckpt = _checkpoint_path(trainer)
        lines.append(f"checkpoint: {ckpt}" if ckpt else "checkpoint: none (no save_folder)")
        for cb in trainer.state.callbacks:
            for path in getattr(cb, "paths", [])[-1:]:
                lines.append(f"reconstruction picture: {path}")
        if export_path:
            lines.append(f"encoder (timm state dict): {export_path}")
        print("\n".join(["", "=" * 72, *lines, "=" * 72]), flush=True)
    return trainer


if __name__ == "__main__":
    main()
