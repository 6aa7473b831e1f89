"""PCA masking (PMAE): mask principal components of the image instead of patches (docs/algorithms.md §3).

The functional forms come first (:func:`component_mask`, :func:`ordered_component_mask`,
:func:`sample_component_mask`, :func:`mask_generator`, :func:`project_visible`, :func:`pmae_loss`), then the
Composer algorithm :class:`PCAMasking`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Union

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from magma_composer.models.mae import ComposerMAE, unpatchify
from magma_composer.options import OptionError, check_choice, check_int, check_number
from magma_composer.pca.basis import PCABasis, load_basis
from magma_composer.seeding import seeded_generator

__all__ = [
    "STRATEGIES",
    "PCAMasking",
    "component_mask",
    "mask_generator",
    "ordered_component_mask",
    "pmae_loss",
    "project_visible",
    "sample_component_mask",
]

RESIDUALS = ("drop", "keep")
#: Which components are masked: a random order (the published PMAE), or a cut of the eigenvalue order.
STRATEGIES = ("random", "top", "bottom")


def component_mask(ratios: torch.Tensor, ratio: Union[float, torch.Tensor], permutation: torch.Tensor) -> torch.Tensor:
    """The components to mask, given a random order of them (docs/algorithms.md §3).

    With ``c_j = sum(ratios[permutation[:j + 1]])`` (0-based ``j``) and ``t = max(argmin_j |c_j - ratio|, 1)``,
    the masked components are ``permutation[:t]``: never none (the original rule allowed ``t = 0``, an empty
    mask and a NaN loss), and ``permutation[:t]`` with ``t`` the 0-based position of the closest cumulative
    sum, as the golden vectors fix.

    Args:
        ratios (torch.Tensor): ``K`` variance ratios ``rho`` of the components.
        ratio (float | torch.Tensor): target masked variance ratio ``r``; a ``B`` tensor for one per row of
            ``permutation``.
        permutation (torch.Tensor): ``K`` (or ``B x K``, one per sample) permutations of ``0..K-1``.

    Returns:
        torch.Tensor: bool ``K`` (or ``B x K``), ``True`` for a masked component.
    """
    k = ratios.shape[-1]
    if permutation.shape[-1] != k:
        raise ValueError(f"permutation has {permutation.shape[-1]} entries but there are {k} components")
    permutation = permutation.long()
    cumulative = torch.cumsum(ratios[permutation], dim=-1)
    ratio = torch.as_tensor(ratio, dtype=cumulative.dtype, device=cumulative.device)
    t = (cumulative - ratio.unsqueeze(-1)).abs().argmin(dim=-1).clamp_min(1)
    position = torch.empty_like(permutation)  # position[perm[j]] = j
    position.scatter_(-1, permutation, torch.arange(k, device=permutation.device).expand_as(permutation))
    return position < t.unsqueeze(-1)


def ordered_component_mask(ratios: torch.Tensor, ratio: float, strategy: str) -> torch.Tensor:
    """The fixed mask of the strategies ``'top'`` and ``'bottom'`` (docs/algorithms.md §3); draws nothing at random.

    The components are ordered by decreasing variance ratio (ties keep the basis's order) and cut by the rule of
    :func:`component_mask` applied to that order: with ``c_j`` the sum of the ``j + 1`` largest ratios (0-based
    ``j``), ``t = max(argmin_j |c_j - ratio|, 1)`` (the first ``j`` on a tie), so ``1 <= t <= K - 1``. The head
    is the ``t`` largest components: the boundary component (the one whose inclusion brings the sum closest to
    ``ratio``) is not in it, as in the random rule.

    * ``'top'``: the head is masked; the low-variance tail (``K - t >= 1`` components) is the input.
    * ``'bottom'``: the head is visible; the tail (``K - t >= 1`` components) is masked. ``ratio`` is then the
      visible share of the variance, as in the original code (its ``tvb`` strategy, run with 0.8).

    Both strategies cut at the same ``t``, so at the same ``ratio`` their masks are complements.

    Args:
        ratios (torch.Tensor): ``K >= 2`` variance ratios ``rho`` of the components.
        ratio (float): the target share of the variance in the head, in (0, 1).
        strategy (str): ``'top'`` or ``'bottom'``.

    Returns:
        torch.Tensor: bool ``K``, ``True`` for a masked component; at least one ``True`` and one ``False``.
    """
    check_choice("strategy", strategy, STRATEGIES[1:])
    if ratios.dim() != 1 or ratios.shape[0] < 2:
        raise ValueError(f"a mask needs at least 2 components (one masked, one visible), got {tuple(ratios.shape)}")
    order = torch.sort(ratios, descending=True, stable=True).indices
    head = component_mask(ratios, ratio, order)
    return head if strategy == "top" else ~head


def mask_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)``, e.g. ``(seed, batch, rank, microbatch)``.

    Masks drawn from it are a pure function of the step, so a resumed run draws the masks it would have drawn.
    """
    return seeded_generator(seed, *keys)


def sample_component_mask(
    ratios: torch.Tensor,
    generator: torch.Generator,
    ratio: float = 0.2,
    ratio_range: Sequence[float] | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Draws a uniformly random order of the components and masks ``ratio`` of the variance with it.

    Args:
        ratios (torch.Tensor): ``K`` variance ratios (on the CPU, like ``generator``).
        generator (torch.Generator): the source of randomness, see :func:`mask_generator`.
        ratio (float): target masked variance ratio.
        ratio_range (Sequence[float], optional): ``(lo, hi)``: draw the ratio from ``Uniform(lo, hi)`` for each
            mask instead ("random ratio" variant).
        batch_size (int, optional): draw one mask per sample (``B x K``) instead of one ``K`` mask.

    Returns:
        torch.Tensor: bool mask, ``True`` = masked.
    """
    rows = 1 if batch_size is None else batch_size
    permutation = torch.rand(rows, ratios.shape[-1], generator=generator).argsort(dim=1)
    if ratio_range is None:
        r = torch.full((rows,), float(ratio), dtype=torch.float64)
    else:
        lo, hi = ratio_range
        r = lo + (hi - lo) * torch.rand(rows, generator=generator, dtype=torch.float64)
    mask = component_mask(ratios.to(torch.float64), r, permutation)
    return mask[0] if batch_size is None else mask


def project_visible(
    z: torch.Tensor, components: torch.Tensor, masked: torch.Tensor, residual: str = "drop"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder input rebuilt from the visible components, with two matrix products.

    Args:
        z (torch.Tensor): ``B x D`` standardised images.
        components (torch.Tensor): ``D x K`` orthonormal basis ``V``.
        masked (torch.Tensor): bool ``K`` or ``B x K``, ``True`` = masked.
        residual (str): ``'drop'``: ``x_in = V_vis V_vis^T z``; ``'keep'``: also keep the part of ``z`` outside
            the basis, ``x_in = z - V_mask V_mask^T z``.

    Returns:
        ``(x_in, coefficients)``: ``B x D`` input and the ``B x K`` coefficients ``z V`` (for the loss).
    """
    coefficients = z @ components
    if residual == "drop":
        x_in = (coefficients * (~masked).to(z.dtype)) @ components.T
    elif residual == "keep":
        x_in = z - (coefficients * masked.to(z.dtype)) @ components.T
    else:
        raise ValueError(f"residual={residual!r} is not valid; choose one of {RESIDUALS}")
    return x_in, coefficients


def _masked_mean_square(diff: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean of ``diff ** 2`` (``B x K``) over the rows and the masked columns (``masked``: ``K`` or ``B x K``)."""
    weight = masked.to(diff.dtype).expand_as(diff)
    return (diff.square() * weight).sum() / weight.sum().clamp_min(1.0)


def pmae_loss(
    images: torch.Tensor, predictions: torch.Tensor, basis: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """Mean over the batch and the masked components of ``((z_hat - z) . v_k) ** 2`` (docs/algorithms.md §3).

    Args:
        images (torch.Tensor): ``B x D`` standardised images ``z``.
        predictions (torch.Tensor): ``B x D`` predicted images ``z_hat``.
        basis (torch.Tensor): ``D x K`` orthonormal components ``V``.
        masked (torch.Tensor): bool ``K`` (one mask for the batch) or ``B x K`` (one per sample), ``True`` =
            masked; or a 1-D tensor of masked component indices.

    Returns:
        torch.Tensor: the scalar loss.
    """
    if masked.dtype != torch.bool:
        index = masked.long()
        masked = torch.zeros(basis.shape[1], dtype=torch.bool, device=basis.device)
        masked[index] = True
    masked = masked.to(basis.device)
    return _masked_mean_square((predictions - images) @ basis, masked)


def _find_mae(model: nn.Module) -> ComposerMAE:
    for module in model.modules():
        if isinstance(module, ComposerMAE):
            return module
    raise ValueError(
        f"PCAMasking needs a magma_composer.models.ComposerMAE (its decoder predicts the whole image); the "
        f"trainer's model is a {type(model).__name__} that holds none"
    )


@dataclass
class _OnDevice:
    """The basis arrays that a step uses, in float32 on the accelerator."""

    mean: torch.Tensor
    inv_std: torch.Tensor
    std: torch.Tensor
    components: torch.Tensor


class PCAMasking(Algorithm):
    """Masks principal components of the standardised image instead of patches (PMAE).

    Every training step draws a random order of the ``K`` components, masks those whose variance ratios add up to
    about ``ratio`` (or, with ``strategy='top'`` / ``'bottom'``, masks a fixed cut of the eigenvalue order), gives
    the encoder the whole image rebuilt from the visible components (no patch is dropped),
    and adds ``state.loss['pmae']``: the mean squared error of the decoder's full output image along the masked
    components. The model (a :class:`~magma_composer.models.ComposerMAE`) is switched to whole images, its pixel
    loss is switched off and its (unused) mask token is frozen. Other algorithms' loss terms (MAGMA, uniformity) are
    kept.

    Batches must hold pixels in [0, 1] (data set ``normalize: none``): the basis carries its own per-pixel
    standardisation, which also becomes the model's input normalisation: the algorithm is the model's
    :class:`~magma_composer.models.InputTransform`, so evaluation, kNN features and pictures see the standardised
    image through ``ComposerMAE.prepare_images``.

    Args:
        basis (str | PathLike | PCABasis): the basis file written by ``python -m magma_composer.pca fit`` (or a
            basis object); it must match the model's image size and channels.
        ratio (float): in (0, 1), the share of the variance at the cut: masked for ``'random'`` and ``'top'``,
            kept visible (the high-variance head) for ``'bottom'``. Default ``0.2`` (the paper's).
        ratio_range (Sequence[float], optional): ``(lo, hi)`` in (0, 1): draw the ratio from ``Uniform(lo, hi)``
            for every mask instead ("random ratio"; the paper used ``(0.1, 0.9)``). ``'random'`` only.
        per_sample (bool): one mask per sample instead of one per batch (extension; same cost). ``'random'`` only.
        strategy (str): which components are masked. ``'random'`` (default, the published PMAE): a uniformly
            random order, cut at ``ratio``. ``'top'`` (ablation): the highest-variance components up to ``ratio``
            are masked and the low-variance tail is the input. ``'bottom'`` (ablation): the highest-variance
            components up to ``ratio`` stay visible and the tail is masked. See :func:`ordered_component_mask`;
            both are fixed masks that draw no random number, so resumption is unchanged.
        residual (str): ``'drop'`` (default): the part of the image outside the ``K`` components is left out of
            the input; ``'keep'`` (extension): it stays visible.
        seed (int, optional): masks are a pure function of ``(seed, batch, rank, microbatch)``. Default: the
            Trainer's seed (``state.rank_zero_seed``), so that runs with different seeds draw different masks.

    Example:
        .. code-block:: python

            from magma_composer.algorithms.pca_masking import PCAMasking
            trainer = Trainer(model=ComposerMAE('vit_tiny_patch16_224', img_size=32, patch_size=8),
                              algorithms=[PCAMasking('cifar10-32.pt', ratio=0.2)], ...)
    """

    def __init__(
        self,
        basis: Union[str, os.PathLike, PCABasis],
        ratio: float = 0.2,
        ratio_range: Sequence[float] | None = None,
        per_sample: bool = False,
        residual: str = "drop",
        seed: int | None = None,
        strategy: str = "random",
    ) -> None:
        check_number("ratio", ratio, 0.0, 1.0, open_min=True, open_max=True)
        check_choice("strategy", strategy, STRATEGIES)
        if strategy != "random":  # a fixed cut: nothing is drawn, so the drawing options would be ignored
            if ratio_range is not None:
                raise OptionError(
                    "ratio_range",
                    f"draws the ratio at random, but strategy {strategy!r} masks a fixed cut of the eigenvalue order: "
                    "give `ratio` instead, or use strategy 'random'",
                )
            if per_sample:
                raise OptionError(
                    "per_sample",
                    f"draws one random mask per sample, but strategy {strategy!r} gives every sample the same fixed "
                    "mask: leave per_sample false, or use strategy 'random'",
                )
        if ratio_range is not None:
            if len(ratio_range) != 2 or not 0.0 < ratio_range[0] <= ratio_range[1] < 1.0:
                raise OptionError("ratio_range", f"must be [lo, hi] with 0 < lo <= hi < 1, got {list(ratio_range)}")
            ratio_range = (float(ratio_range[0]), float(ratio_range[1]))
        check_choice("residual", residual, RESIDUALS)
        if seed is not None:
            check_int("seed", seed, 0)
        if not isinstance(basis, (str, os.PathLike, PCABasis)):
            raise OptionError("basis", f"expected a basis file path or a PCABasis, got {type(basis).__name__}")
        self.basis_source = basis
        self.ratio = float(ratio)
        self.ratio_range = ratio_range
        self.per_sample = bool(per_sample)
        self.residual = residual
        self.seed = seed
        self._seed = 0 if seed is None else seed  # resolved at INIT: the Trainer's seed when ``seed`` is None
        self.strategy = strategy
        try:  # a missing or corrupted basis fails here, when the algorithm is made, not at the first step
            self.basis: PCABasis | None = load_basis(basis)
        except (OSError, ValueError) as exc:
            raise OptionError("basis", str(exc)) from exc
        if self.basis.num_components < 2:
            raise OptionError(
                "basis",
                f"{self.basis.path or 'the basis'} has {self.basis.num_components} component; masking needs at least 2 "
                "(one masked, one visible): fit it with more --components",
            )
        # the fixed mask of 'top' / 'bottom', on the CPU like the random ones
        self._fixed_mask = (
            None
            if strategy == "random"
            else ordered_component_mask(self.basis.ratios.to(torch.float64), self.ratio, strategy)
        )
        self._model: ComposerMAE | None = None
        self._device: _OnDevice | None = None
        self._checked = {"train": False, "eval": False}
        self._microbatch = 0
        self._coefficients: torch.Tensor | None = None
        self._masked: torch.Tensor | None = None
        self._masked_cpu: torch.Tensor | None = None

    def __repr__(self) -> str:
        source = self.basis_source.path if isinstance(self.basis_source, PCABasis) else os.fspath(self.basis_source)
        return (
            f"PCAMasking(basis={source!r}, ratio={self.ratio}, ratio_range={self.ratio_range}, "
            f"per_sample={self.per_sample}, residual={self.residual!r}, seed={self.seed}, strategy={self.strategy!r})"
        )

    # ------------------------------------------------------------------ basis
    def _load(self) -> PCABasis:
        if self.basis is None:
            self.basis = load_basis(self.basis_source)
        return self.basis

    def _on_device(self, device: torch.device) -> _OnDevice:
        """The float32 arrays on ``device``, moved there on first use.

        ``self.basis`` then holds the device copy of the components, so the (large) CPU copy is released.
        """
        if self._device is None or self._device.components.device != device:
            basis = self._load()
            std = basis.std.to(device, torch.float32)
            components = basis.components.to(device, torch.float32)
            self.basis = replace(basis, components=components)
            self._device = _OnDevice(
                mean=basis.mean.to(device, torch.float32), inv_std=1.0 / std, std=std, components=components
            )
        return self._device

    def standardize(self, images: torch.Tensor) -> torch.Tensor:
        """``B x C x S x S`` pixels in [0, 1] to the standardised images ``z`` (same shape), the model's input.

        Use it for features computed outside the trainer's loops (e.g. a kNN monitor calling
        ``model.extract_features``) so that they see what training saw.
        """
        self._check_images(images, "images")
        dev = self._on_device(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            z = (images.reshape(images.shape[0], -1).float() - dev.mean) * dev.inv_std
        return z.reshape(images.shape)

    def _to_pixels(self, z: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        dev = self._on_device(z.device)
        return (z.reshape(shape[0], -1).float() * dev.std + dev.mean).reshape(shape).clamp(0.0, 1.0)

    def _check_images(self, images: torch.Tensor, what: str) -> None:
        basis = self._load()
        expected = (basis.channels, basis.image_size, basis.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"PCAMasking: {what} must be B x {expected[0]} x {expected[1]} x {expected[2]} (the basis' image "
                f"shape), got {found}"
            )

    def _check_pixels(self, images: torch.Tensor, phase: str) -> None:
        """Once per phase: the batch must hold pixels in [0, 1], not normalised values."""
        if self._checked[phase]:
            return
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(
                f"PCAMasking needs {phase} batches of pixels in [0, 1], but this batch spans [{lo:.3f}, {hi:.3f}]: "
                "set the data set's `normalize: none` (StreamingImageDataset(normalize='none')); the PCA basis "
                "standardises the images itself"
            )
        self._checked[phase] = True

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        return event in (
            Event.INIT,
            Event.BEFORE_TRAIN_BATCH,
            Event.BEFORE_FORWARD,
            Event.AFTER_LOSS,
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._init(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._microbatch = 0
        elif event == Event.BEFORE_FORWARD:
            self._mask_batch(state)
        elif event == Event.AFTER_LOSS:
            self._add_loss(state, logger)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input for images outside training (evaluation, features, pictures): the standardised image.

        Part of :class:`~magma_composer.models.InputTransform`: the model calls it from ``prepare_images``.
        """
        self._check_images(images, "evaluation images")
        self._check_pixels(images, "eval")
        return self.standardize(images)

    def check_model(self, model: nn.Module) -> ComposerMAE:
        """Checks that ``model`` holds a ComposerMAE whose image shape matches the basis; returns the MAE.

        The recipe builder calls it before the Trainer starts, and ``INIT`` calls it again.
        """
        mae = _find_mae(model)
        self._load().check_image_shape(mae.img_size, mae.net.in_chans, what=f"the model ({type(mae).__name__})")
        return mae

    def _init(self, state: State) -> None:
        model = self.check_model(state.model)
        model.use_input_transform(self)
        self._model = model
        self._seed = state.rank_zero_seed if self.seed is None else self.seed

    def _mask(self, keys: tuple[int, ...], batch_size: int, ratio: float | None = None) -> torch.Tensor:
        """The CPU mask for the generator keys ``keys``: drawn (``'random'``) or the fixed one (no draw at all)."""
        if self._fixed_mask is not None:
            return self._fixed_mask
        return sample_component_mask(
            self._load().ratios,
            mask_generator(self._seed, *keys),
            ratio=self.ratio if ratio is None else ratio,
            ratio_range=self.ratio_range if ratio is None else None,
            batch_size=batch_size if self.per_sample else None,
        )

    def _draw_mask(self, state: State, batch_size: int) -> torch.Tensor:
        keys = (int(state.timestamp.batch), dist.get_global_rank(), self._microbatch)
        return self._mask(keys, batch_size)

    def _mask_batch(self, state: State) -> None:
        images = state.batch_get_item(0)
        self._check_images(images, "training images")
        self._check_pixels(images, "train")
        masked_cpu = self._draw_mask(state, images.shape[0])
        self._microbatch += 1
        masked = masked_cpu.to(images.device, non_blocking=True)
        with torch.autocast(device_type=images.device.type, enabled=False):
            z = self.standardize(images).reshape(images.shape[0], -1)
            x_in, coefficients = project_visible(z, self._device.components, masked, self.residual)
        state.batch_set_item(0, x_in.reshape(images.shape))
        self._coefficients, self._masked, self._masked_cpu = coefficients, masked, masked_cpu

    def _add_loss(self, state: State, logger: Logger) -> None:
        if self._coefficients is None:
            return
        if not isinstance(state.loss, dict):
            raise TypeError(
                f"PCAMasking adds state.loss['pmae'] and needs the model's loss() to return a dict, got "
                f"{type(state.loss).__name__}"
            )
        model = self._model
        pred = state.outputs["pred"]
        with torch.autocast(device_type=pred.device.type, enabled=False):
            z_hat = unpatchify(pred.float(), model.patch_size, model.net.grid, model.net.in_chans)
            pred_coefficients = z_hat.reshape(z_hat.shape[0], -1) @ self._device.components
            state.loss["pmae"] = _masked_mean_square(pred_coefficients - self._coefficients, self._masked)
        # the monitor, from the CPU copies (no device sync): predicting zero scores the masked eigenvalues' mean
        weight = self._masked_cpu.to(torch.float64).expand(self._coefficients.shape[0], -1)
        logger.log_metrics(
            {
                "pca_masking/predict_zero_loss": float((weight * self.basis.eigenvalues).sum() / weight.sum()),
                "pca_masking/masked_variance": float((weight * self.basis.ratios).sum() / weight.shape[0]),
                "pca_masking/masked_components": float(weight.sum() / weight.shape[0]),
            }
        )
        self._coefficients = self._masked = self._masked_cpu = None

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def reconstruction_panels(self, model: nn.Module, images: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Pictures of one fixed mask: the input images, what the encoder sees, and the decoder's output.

        Args:
            model (nn.Module): the trainer's model (holding a :class:`ComposerMAE`).
            images (torch.Tensor): ``B x C x S x S`` pixels in [0, 1].

        Returns:
            ``[('original', x), ('visible components', x_in), ('prediction', z_hat)]``, each ``B x C x S x S``
            pixels in [0, 1] (de-standardised and clipped).
        """
        mae = _find_mae(model)
        z = self.standardize(images).reshape(images.shape[0], -1)
        ratio = self.ratio if self.ratio_range is None else sum(self.ratio_range) / 2
        masked = self._mask((2**32 - 1,), images.shape[0], ratio=ratio).to(images.device)
        with torch.autocast(device_type=images.device.type, enabled=False):
            x_in, _ = project_visible(z, self._device.components, masked, self.residual)
        out = mae.net(x_in.reshape(images.shape), 0.0)
        z_hat = unpatchify(out["pred"].float(), mae.patch_size, mae.net.grid, mae.net.in_chans)
        return [
            ("original", images),
            ("visible components", self._to_pixels(x_in, images.shape)),
            ("prediction", self._to_pixels(z_hat, images.shape)),
        ]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        basis = self._load()
        return {**super().state_dict(), "basis_path": basis.path, "basis_sha256": basis.sha256, "seed": self._seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.seed is None and state.get("seed") is not None:  # the run's own draws, whatever seed resumes it
            self._seed = int(state["seed"])
        saved = state.get("basis_sha256")
        if saved is None:
            return
        basis = self._load()
        if basis.sha256 != saved:
            raise ValueError(
                f"the checkpoint was trained with PCA basis {state.get('basis_path')!r} (sha256 {saved[:16]}...), "
                f"but this PCAMasking uses {basis.path!r} (sha256 {basis.sha256[:16]}...): resume with the same basis"
            )
