"""Callbacks: kNN / linear-probe monitor, online linear probe, reconstruction pictures, per-step metrics."""

from magma_composer.callbacks.knn_monitor import KNNMonitor
from magma_composer.callbacks.online_probe import OnlineLinearProbe
from magma_composer.callbacks.reconstruction_images import ReconstructionImages, save_grid
from magma_composer.callbacks.step_metrics import StepMetrics

__all__ = ["KNNMonitor", "OnlineLinearProbe", "ReconstructionImages", "StepMetrics", "save_grid"]
