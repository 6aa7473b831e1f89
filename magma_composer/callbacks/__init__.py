"""Callbacks: kNN monitor and reconstruction pictures."""

from magma_composer.callbacks.knn_monitor import KNNMonitor
from magma_composer.callbacks.reconstruction_images import ReconstructionImages, save_grid

__all__ = ["KNNMonitor", "ReconstructionImages", "save_grid"]
