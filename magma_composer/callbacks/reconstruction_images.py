"""Reconstruction pictures: originals, masked inputs and reconstructions, as a PNG grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from PIL import Image

from magma_composer.callbacks.interval import parse_interval
from magma_composer.data.transforms import NORMALIZATIONS, normalization, unnormalize
from magma_composer.options import check_choice, check_int

__all__ = ["ReconstructionImages", "save_grid"]


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Union[str, Path], scale: int = 4) -> Path:
    """Writes rows of ``N x 3 x H x W`` images in [0, 1] as one PNG (one row per entry, upscaled ``scale`` x)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(r.shape[0] for _, r in rows)
    h, w = rows[0][1].shape[-2:]
    pad = 2
    canvas = Image.new("RGB", (n * (w * scale + pad) + pad, len(rows) * (h * scale + pad) + pad), (255, 255, 255))
    for i, (_, images) in enumerate(rows):
        arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for j, a in enumerate(arr):
            tile = Image.fromarray(a).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (pad + j * (w * scale + pad), pad + i * (h * scale + pad)))
    canvas.save(path)
    return path


def to_pixels(images: torch.Tensor, normalize: str, pixel_stats: Any = None) -> torch.Tensor:
    """Undoes the data set normalisation (``'imagenet'``, ``'none'``, or ``'pixel'`` with its statistics file or
    loaded ``PixelStandardize``) to pixels in [0, 1]."""
    return unnormalize(images, normalize, pixel_stats)


class ReconstructionImages(Callback):
    """Writes a PNG of originals, masked inputs and reconstructions of fixed test images.

    The rows are the model's ``reconstruction_panels`` (``ComposerMAE``: original, masked input, reconstruction;
    with PCA masking: original, visible-component input, prediction).

    Args:
        test_loader: ``(images, labels)`` batches; the first ``num_images`` images are used throughout.
        folder (str): where the PNGs go (``{run_name}`` is filled in).
        num_images (int): images per row.
        interval (str | int): also write during training at this Composer time (``'5ep'``); ``0``: only at the end.
        normalize (str): the loader's normalisation, ``'imagenet'``, ``'none'`` or ``'pixel'``.
        pixel_stats (str, optional): with ``normalize: pixel``: the loader's per-pixel statistics file.
        seed (int): seed of the mask drawn for the picture.
    """

    def __init__(
        self,
        test_loader: Any,
        folder: str = "runs/{run_name}/pictures",
        num_images: int = 8,
        interval: Union[str, int] = 0,
        normalize: str = "imagenet",
        seed: int = 0,
        pixel_stats: str | None = None,
    ) -> None:
        self.test_loader = test_loader
        self.folder = folder
        self.num_images = check_int("num_images", num_images, 1)
        self.interval = parse_interval(interval)
        self.normalize = check_choice("normalize", normalize, NORMALIZATIONS)
        if normalize != "pixel" or pixel_stats is None:
            normalization(normalize, pixel_stats)  # normalize: pixel <-> pixel_stats, checked now
        self.pixel_stats = pixel_stats
        self._pixel: Any = None  # the statistics, loaded on first use (the images' size is known then)
        self.seed = check_int("seed", seed, 0)
        self._images: torch.Tensor | None = None
        #: paths written so far
        self.paths: list[Path] = []

    def _fixed_images(self) -> torch.Tensor:
        if self._images is None:
            chunks, n = [], 0
            for images, _ in self.test_loader:
                chunks.append(images)
                n += len(images)
                if n >= self.num_images:
                    break
            if not chunks:
                raise ValueError("reconstruction_images: the test loader yielded no images")
            self._images = torch.cat(chunks)[: self.num_images]
        return self._images

    @torch.no_grad()
    def write(self, state: State, tag: str) -> Path | None:
        """Writes the picture for the model's current weights; returns its path (rank 0 only)."""
        images = self._fixed_images()
        if dist.get_global_rank() != 0:
            return None
        model = getattr(state.model, "module", state.model)
        device = next(model.parameters()).device
        images = images.to(device)
        if self.normalize == "pixel" and self._pixel is None:
            self._pixel = normalization("pixel", self.pixel_stats, images.shape[-1])
        was_training = model.training
        model.eval()
        try:
            rows = [
                (title, to_pixels(x, self.normalize, self._pixel))
                for title, x in model.reconstruction_panels(images, self.seed)
            ]
        finally:
            model.train(was_training)
        folder = Path(self.folder.format(run_name=state.run_name))
        path = save_grid(rows, folder / f"reconstruction-{tag}.png")
        self.paths.append(path)
        return path

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self.interval is not None and self.interval.unit == TimeUnit.EPOCH:
            if int(state.timestamp.epoch) % self.interval.value == 0:
                self.write(state, f"ep{int(state.timestamp.epoch)}")

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.interval is not None and self.interval.unit == TimeUnit.BATCH:
            if int(state.timestamp.batch) % self.interval.value == 0:
                self.write(state, f"ba{int(state.timestamp.batch)}")

    def fit_end(self, state: State, logger: Logger) -> None:
        self.write(state, "final")
