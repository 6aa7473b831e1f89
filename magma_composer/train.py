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

import hashlib
import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from composer.utils import dist, reproducibility

from magma_composer import registry
from magma_composer.config import ConfigError, DataConfig, ModelConfig, OptimizerConfig, TrainConfig, load_config
from magma_composer.models import ComposerMAE

__all__ = ["build_dataloader", "build_model", "build_optimizer", "build_trainer", "main"]


def _is_uri(path: str) -> bool:
    return "://" in path


def build_model(cfg: ModelConfig) -> ComposerMAE:
    """The ComposerMAE of ``model:``."""
    return ComposerMAE(
        encoder=cfg.encoder,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
    )


def _cache_folder(remote: str, split: str | None, tag: str) -> str:
    digest = hashlib.sha1(f"{remote}|{split}|{tag}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "magma_composer_cache", digest)


def build_dataset(cfg: DataConfig, image_size: int, train: bool, seed: int, tag: str = "") -> Any:
    """A :class:`~magma_composer.data.StreamingImageDataset` for a ``train_data`` / ``eval_data`` section.

    A local ``remote`` folder is read in place; a URI streams into ``local`` (default: a temporary
    cache folder unique per remote, split and ``tag``).
    """
    from magma_composer.data import StreamingImageDataset

    if _is_uri(cfg.remote):
        remote, local = cfg.remote, cfg.local or _cache_folder(cfg.remote, cfg.split, tag)
    else:
        root = Path(cfg.remote) / (cfg.split or "")
        if not (root / "index.json").is_file():
            raise FileNotFoundError(
                f"no MDS index at {root / 'index.json'}: 'remote' must be an MDS folder (written by "
                "python -m magma_composer.data.convert) or a URI such as s3://bucket/prefix"
            )
        remote, local = None, cfg.remote
        if cfg.local is not None:
            remote, local = cfg.remote, cfg.local
    # evaluation data is shuffled too (seeded, so deterministic): capped kNN queries and pictures then span the classes
    shuffle = True if cfg.shuffle is None else cfg.shuffle
    kwargs: dict[str, Any] = dict(
        shuffle=shuffle,
        shuffle_seed=cfg.shuffle_seed if cfg.shuffle_seed is not None else seed,
        shuffle_algo=cfg.shuffle_algo,
        batch_size=cfg.batch_size,
        download_retry=cfg.download_retry,
        download_timeout=cfg.download_timeout,
        download_threads=cfg.download_threads,
        shard_deadline=cfg.shard_deadline,
    )
    kwargs["validate_hash"] = None if cfg.validate_hash == "none" else cfg.validate_hash
    for key in ("num_canonical_nodes", "predownload", "cache_limit"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    if cfg.max_samples is not None:
        kwargs["epoch_size"] = cfg.max_samples
    return StreamingImageDataset(
        remote=remote,
        local=local,
        split=cfg.split,
        image_size=image_size,
        train=train,
        crop_scale=cfg.crop_scale,
        hflip=cfg.hflip,
        normalize=cfg.normalize,
        resize_ratio=cfg.resize_ratio,
        **kwargs,
    )


def build_dataloader(cfg: DataConfig, image_size: int, train: bool, seed: int, tag: str = "") -> Any:
    """A resumable :class:`streaming.StreamingDataLoader` over :func:`build_dataset`."""
    from streaming import StreamingDataLoader

    dataset = build_dataset(cfg, image_size, train, seed, tag)
    return StreamingDataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        drop_last=cfg.drop_last if train else False,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
    )


_NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "reg_token")


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, global_batch: int) -> DecoupledAdamW:
    """DecoupledAdamW; with ``no_decay_norm_bias`` norms, biases and tokens get no weight decay.

    ``cfg.weight_decay`` follows ``torch.optim.AdamW`` (and the papers): each step multiplies the weights by
    ``1 - lr_t * weight_decay``. Composer's DecoupledAdamW takes the unscaled factor, so it gets
    ``lr * weight_decay`` (and scales it by the schedule as AdamW does).
    """
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * global_batch / 256
    if cfg.no_decay_norm_bias:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES else decay).append(p)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [p for p in model.parameters() if p.requires_grad]
    return DecoupledAdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=lr * cfg.weight_decay)


def _build_components(section: dict, reg: dict, kind: str, injected: dict) -> list:
    out = []
    for name, options in section.items():
        cls = registry.resolve(reg, name, kind)
        options = dict(options or {})
        params = inspect.signature(cls.__init__).parameters
        for key, value in injected.items():
            if key in params and key not in options:
                options[key] = value() if callable(value) else value
        try:
            out.append(cls(**options))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{kind}s.{name}: {exc}") from exc
    return out


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Builds the model, data, optimizer, schedule, algorithms, callbacks and loggers, then the Trainer."""
    reproducibility.seed_all(cfg.seed)
    # algorithms first: their options (schedules, basis files) fail before any model or data is built
    algorithms = _build_components(cfg.algorithms, registry.ALGORITHMS, "algorithm", {})
    model = build_model(cfg.model)
    image_size = cfg.train_data.image_size or cfg.model.img_size
    train_loader = build_dataloader(cfg.train_data, image_size, train=True, seed=cfg.seed, tag="train")
    eval_loader = None
    if cfg.eval_data is not None:
        eval_size = cfg.eval_data.image_size or cfg.model.img_size
        eval_loader = build_dataloader(cfg.eval_data, eval_size, train=False, seed=cfg.seed, tag="eval")

    def bank_loader():  # the kNN memory bank: the training split with the evaluation transform
        # seeded shuffle: a capped bank (knn_monitor.max_train_samples) is then a random subset, not the first classes
        bank_cfg = DataConfig(**{**cfg.train_data.__dict__, "shuffle": True, "max_samples": None})
        return build_dataloader(bank_cfg, image_size, train=False, seed=cfg.seed, tag="bank")

    def test_loader():
        if eval_loader is None:
            raise ConfigError("callbacks knn_monitor and reconstruction_images need an 'eval_data' section")
        return eval_loader

    injected = {"train_loader": bank_loader, "test_loader": test_loader, "normalize": cfg.train_data.normalize}
    callbacks = _build_components(cfg.callbacks, registry.CALLBACKS, "callback", injected)
    loggers = _build_components(cfg.loggers, registry.LOGGERS, "logger", {})

    global_batch = cfg.train_data.batch_size * dist.get_world_size()
    optimizer = build_optimizer(model, cfg.optimizer, global_batch)
    scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=cfg.scheduler.warmup, alpha_f=cfg.scheduler.alpha_f)
    device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    precision = cfg.precision or ("amp_bf16" if device == "gpu" else "fp32")
    microbatch = cfg.device_train_microbatch_size or cfg.train_data.batch_size
    if cfg.autoresume and (cfg.save_folder is None or cfg.run_name is None):
        raise ConfigError("autoresume: true needs both 'save_folder' and 'run_name'")
    return Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        eval_interval=cfg.eval_interval,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        run_name=cfg.run_name,
        progress_bar=cfg.progress_bar,
        log_to_console=cfg.log_to_console,
        console_log_interval=cfg.console_log_interval,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        load_weights_only=cfg.load_weights_only,
        parallelism_config=cfg.parallelism_config,
        device=device,
        precision=precision,
        device_train_microbatch_size=microbatch,
        seed=cfg.seed,
        dist_timeout=cfg.dist_timeout,
        compile_config={} if cfg.compile else None,
    )


def cpu_threads(cfg: TrainConfig) -> int:
    """Torch threads per rank on CPU: the recipe's ``cpu_threads``, else the cores left to each rank after its
    loader workers (oversubscribed cores make small steps several times slower)."""
    if cfg.cpu_threads is not None:
        return max(1, cfg.cpu_threads)
    per_rank = (os.cpu_count() or 1) // max(1, dist.get_local_world_size())
    return max(1, per_rank - cfg.train_data.num_workers)


def _checkpoint_path(trainer: Trainer) -> str | None:
    for cb in trainer.state.callbacks:
        saved = getattr(cb, "saved_checkpoints", None)
        if saved:
            return str(saved[-1])
    return None


def export_encoder(trainer: Trainer, path: str) -> None:
    """Writes the encoder's timm state dict (load with ``timm.create_model(name, num_classes=0)``)."""
    model = getattr(trainer.state.model, "module", trainer.state.model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.net.encoder.state_dict(), path)


def main(argv: list[str] | None = None) -> Trainer:
    """Entry point: ``python -m magma_composer.train RECIPE.yaml [key.path=value ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as exc:
        print(f"magma_composer.train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    trainer = build_trainer(cfg)
    trainer.fit()
    if cfg.export_encoder and dist.get_global_rank() == 0:
        export_encoder(trainer, cfg.export_encoder)
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
        if cfg.export_encoder:
            lines.append(f"encoder (timm state dict): {cfg.export_encoder}")
        print("\n".join(["", "=" * 72, *lines, "=" * 72]), flush=True)
    return trainer


if __name__ == "__main__":
    main()
