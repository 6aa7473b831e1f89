"""Callbacks: kNN / linear-probe monitor, online linear probe, reconstruction pictures."""

from magma_composer.callbacks.knn_monitor import KNNMonitor
from magma_composer.callbacks.online_probe import OnlineLinearProbe
from magma_composer.callbacks.reconstruction_images import ReconstructionImages, save_grid

__all__ = ["KNNMonitor", "OnlineLinearProbe", "ReconstructionImages", "save_grid"]
