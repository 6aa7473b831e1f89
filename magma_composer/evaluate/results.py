"""Evaluation results: one JSON record per evaluation, a console line, and Weights & Biases when configured."""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Sequence
from typing import Any

from magma_composer.options import check_choice

__all__ = ["console_line", "log_to_wandb", "make_record", "write_record"]

#: the version of the record's layout; bump it when a key changes meaning
RECORD_VERSION = 1


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for package in ("magma_composer", "torch", "mosaicml", "timm", "mosaicml-streaming"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def make_record(
    protocol: str,
    run_name: str,
    encoder: dict[str, Any],
    data: dict[str, Any],
    settings: dict[str, Any],
    metrics: dict[str, Any],
    seconds: float,
    world_size: int,
    device: str,
) -> dict[str, Any]:
    """The JSON record of one evaluation.

    Args:
        protocol (str): the protocol's name (``knn``, ``linear-fast``, ``linear``, ``mlp``, ``finetune``).
        run_name (str): the evaluation's name.
        encoder (dict): where the encoder came from: ``source``, ``format``, ``sha256``, ``arch``, ``weights``.
        data (dict): per split, the data set's options and its number of samples.
        settings (dict): the whole recipe as run (after ``base:`` and overrides).
        metrics (dict): ``top1`` and ``top5`` (the headline, %) and the protocol's other figures.
        seconds (float): wall time of the evaluation, encoder loading included.
        world_size (int): ranks that took part.
        device (str): ``cpu`` or ``gpu``.
    """
    return {
        "record_version": RECORD_VERSION,
        "protocol": protocol,
        "run_name": run_name,
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "encoder": encoder,
        "data": data,
        "top1": metrics.get("top1"),
        "top5": metrics.get("top5"),
        "metrics": metrics,
        "settings": settings,
        "world_size": world_size,
        "device": device,
        "versions": _versions(),
    }


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def console_line(record: dict[str, Any], path: str | None = None) -> str:
    """The console line: ``linear-fast: top-1 61.20 %  top-5 95.10 % | encoder X (sha256 ...) | 12.3 s | record: P``."""
    metrics = record["metrics"]
    parts = [f"{record['protocol']}: top-1 {_pct(record['top1'])}  top-5 {_pct(record['top5'])}"]
    if metrics.get("best_top1") is not None:  # protocols that evaluate several times: the best is optimistic
        parts[0] += f"  (best evaluation: top-1 {_pct(metrics['best_top1'])} at {metrics.get('best_at', '?')})"
    enc = record["encoder"]
    what = enc.get("source") or "random initialisation"
    if enc.get("weights") == "random":
        what = f"random initialisation of {what}"
    parts.append(f"encoder {what} (sha256 {str(enc.get('sha256', ''))[:12]})")
    parts.append(f"{record['seconds']:.1f} s")
    if path:
        parts.append(f"record: {path}")
    return " | ".join(parts)


def write_record(record: dict[str, Any], path: str) -> str:
    """Writes the record as indented JSON, atomically, with ``<path>.sha256`` beside it; returns the file's sha256."""
    from magma_composer.checkpoints import write_with_hash

    text = json.dumps(record, indent=2, sort_keys=False, default=str).encode()
    return write_with_hash(path, lambda f: f.write(text))


def _flat(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}/{key}", item, out)


def log_to_wandb(
    record: dict[str, Any],
    project: str = "magma-composer",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    mode: str | None = None,
) -> str:
    """Logs the record to Weights & Biases (the recipe's ``wandb:`` section): its figures as the run's summary and
    one logged step, the whole record as the run's config; returns the run's URL (or its local folder offline).

    Args:
        record (dict): from :func:`make_record`.
        project (str): the W&B project.
        entity (str, optional): the W&B team or user.
        name (str, optional): the W&B run's name. Default: the evaluation's ``run_name``.
        group (str, optional): a W&B group (e.g. the pre-training run's name).
        tags (Sequence[str]): W&B tags; the protocol is always added.
        mode (str, optional): ``online``, ``offline`` or ``disabled``. Default: W&B's own (``WANDB_MODE``).
    """
    if mode is not None:
        check_choice("mode", mode, ("online", "offline", "disabled"))
    import wandb

    metrics: dict[str, float] = {}
    _flat(f"eval/{record['protocol']}", {k: v for k, v in record["metrics"].items() if k != "history"}, metrics)
    run = wandb.init(
        project=project,
        entity=entity,
        name=name or record["run_name"],
        group=group,
        tags=sorted({record["protocol"], *tags}),
        mode=mode,
        config={k: v for k, v in record.items() if k not in ("metrics", "top1", "top5")},
        reinit=True,
    )
    try:
        for _label, top1, top5 in record["metrics"].get("history", []):
            run.log({f"eval/{record['protocol']}/history_top1": top1, f"eval/{record['protocol']}/history_top5": top5})
        run.log(metrics)
        run.summary.update(metrics)
        where = run.url or run.dir
    finally:
        run.finish()
    return str(where)
