"""Evaluation of pre-trained encoders: the papers' kNN, linear-probe and fine-tuning protocols.

Run one from a recipe (``python -m magma_composer.evaluate PROTOCOL RECIPE.yaml [key=value ...]``, see
:mod:`magma_composer.evaluate.__main__`), or call the parts: :func:`load_encoder` (our checkpoints, timm state
dicts, facebookresearch/mae checkpoints), :func:`extract_features`, :func:`knn_grid`, :func:`fit_linear_probe`,
:class:`EncoderClassifier` and :func:`run_supervised`. Imports are lazy, so that the command line's ``--help``
does not load Composer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EncoderError": "encoders",
    "LoadedEncoder": "encoders",
    "load_encoder": "encoders",
    "encode": "features",
    "extract_features": "features",
    "knn_grid": "knn",
    "KNNProtocol": "knn",
    "fit_linear_probe": "linear",
    "FastLinearProbe": "linear",
    "EncoderClassifier": "classifier",
    "build_eval_optimizer": "optim",
    "layer_decay_groups": "optim",
    "run_supervised": "supervised",
    "EvalConfig": "recipe",
    "PROTOCOLS": "recipe",
    "run_evaluation": "recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
