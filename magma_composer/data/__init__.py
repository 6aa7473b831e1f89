"""Data: MDS image data sets, transforms, ImageFolder -> MDS conversion and the demo data set.

The names below are imported on first use (module ``__getattr__``): importing the package eagerly imported
``convert``, and ``python -m magma_composer.data.convert`` then warned that the module was already in
``sys.modules`` before runpy executed it.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_LAZY = {
    "CheckedStreamingDataset": "checked_streaming",
    "StreamingDataError": "checked_streaming",
    "RemoteDataError": "storage",
    "check_remote": "storage",
    "convert_image_folder": "convert",
    "StreamingImageDataset": "dataset",
    "build_image_dataloader": "loader",
    "decode_image": "dataset",
    "eval_transform": "transforms",
    "train_transform": "transforms",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
