"""Name -> class registries for the YAML builder (``magma_composer.train``).

Entries are import paths, resolved on first use, so that a registry never imports optional code it
does not need and each algorithm package stays the single place that defines its class.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ALGORITHMS", "CALLBACKS", "EVAL_ALGORITHMS", "LOGGERS", "MODELS", "resolve"]

#: The models of a training recipe, chosen by ``model.name`` (default ``mae``); the section's other keys are the
#: chosen class's constructor arguments.
MODELS: dict[str, str] = {
    "mae": "magma_composer.models.mae:ComposerMAE",
    "simclr": "magma_composer.models.simclr:ComposerSimCLR",
    "vicreg": "magma_composer.models.vicreg:ComposerVICReg",
}

ALGORITHMS: dict[str, str] = {
    "magma": "magma_composer.algorithms.magma:MAGMA",
    "uniformity": "magma_composer.algorithms.uniformity:Uniformity",
    "pca_masking": "magma_composer.algorithms.pca_masking:PCAMasking",
}

#: The algorithms of supervised evaluation recipes (``python -m magma_composer.evaluate finetune``): Composer's
#: own, and MAE's per-batch choice between MixUp and CutMix. They need a classifier's logits, so a pre-training
#: recipe does not offer them.
EVAL_ALGORITHMS: dict[str, str] = {
    "mixup": "composer.algorithms:MixUp",
    "cutmix": "composer.algorithms:CutMix",
    "label_smoothing": "composer.algorithms:LabelSmoothing",
    "mixup_cutmix": "magma_composer.evaluate.mixing:MixUpOrCutMix",
}

CALLBACKS: dict[str, str] = {
    "knn_monitor": "magma_composer.callbacks.knn_monitor:KNNMonitor",
    "reconstruction_images": "magma_composer.callbacks.reconstruction_images:ReconstructionImages",
    "online_probe": "magma_composer.callbacks.online_probe:OnlineLinearProbe",
    "lr_monitor": "composer.callbacks:LRMonitor",
    "speed_monitor": "composer.callbacks:SpeedMonitor",
    "memory_monitor": "composer.callbacks:MemoryMonitor",
    "optimizer_monitor": "composer.callbacks:OptimizerMonitor",
    "activation_monitor": "composer.callbacks:ActivationMonitor",
    "nan_monitor": "composer.callbacks:NaNMonitor",
    "runtime_estimator": "composer.callbacks:RuntimeEstimator",
    "system_metrics_monitor": "composer.callbacks:SystemMetricsMonitor",
    "early_stopper": "composer.callbacks:EarlyStopper",
    "threshold_stopper": "composer.callbacks:ThresholdStopper",
    "memory_snapshot": "composer.callbacks:MemorySnapshot",
    "oom_observer": "composer.callbacks:OOMObserver",
}

#: Every logger Composer ships, by name (console output is the recipe's ``progress_bar`` / ``log_to_console``).
#: Loggers that need a package Composer does not install (mlflow, tensorboard, comet_ml, neptune, slack_sdk)
#: say which when the recipe is read.
LOGGERS: dict[str, str] = {
    "wandb": "composer.loggers:WandBLogger",
    "file": "composer.loggers:FileLogger",
    "mlflow": "composer.loggers:MLFlowLogger",
    "tensorboard": "composer.loggers:TensorboardLogger",
    "cometml": "composer.loggers:CometMLLogger",
    "neptune": "composer.loggers:NeptuneLogger",
    "slack": "composer.loggers:SlackLogger",
    "mosaicml": "composer.loggers:MosaicMLLogger",
    "remote_uploader_downloader": "composer.loggers:RemoteUploaderDownloader",
    "in_memory": "composer.loggers:InMemoryLogger",
}


def resolve(registry: dict[str, str], name: str, kind: str) -> Any:
    """Imports the class registered under ``name``.

    Raises:
        KeyError: naming ``kind`` and the valid names, if ``name`` is not registered.
    """
    if name not in registry:
        raise KeyError(f"unknown {kind} {name!r}; valid names are {sorted(registry)}")
    module_name, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)
