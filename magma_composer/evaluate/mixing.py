r"""MixUp or CutMix, one of the two per batch: the mixing of MAE's fine-tuning recipe, as a Composer algorithm.

MAE fine-tunes ViT-B with timm's ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)``: every batch gets
*either* MixUp *or* CutMix, never both. Composer's :class:`~composer.algorithms.MixUp` and
:class:`~composer.algorithms.CutMix` each mix every batch, so adding both to a Trainer applies both to every batch.
:class:`MixUpOrCutMix` draws the branch per batch and reuses Composer's functional forms
(:func:`composer.functional.mixup_batch`, :func:`composer.functional.cutmix_batch`) with a coefficient, a box and a
permutation drawn from its own generator.

For a batch of images :math:`x`, class targets :math:`y` (one-hot, or already soft) and a uniformly random
permutation :math:`\pi` of the batch:

* with probability ``switch_prob``, **CutMix**: :math:`\lambda_0 \sim \mathrm{Beta}(\alpha_c, \alpha_c)`, a box of
  sides :math:`\lfloor H \sqrt{1 - \lambda_0} \rfloor \times \lfloor W \sqrt{1 - \lambda_0} \rfloor` centred on a
  uniformly drawn pixel and clipped to the image is filled from :math:`x_{\pi}`, and

  .. math:: \lambda = 1 - \frac{|\mathrm{box}|}{H W}

  is the area ratio kept *after* the clipping (timm's ``correct_lam``, Composer's adjusted lambda);
* otherwise **MixUp**: :math:`\lambda \sim \mathrm{Beta}(\alpha_m, \alpha_m)` and
  :math:`\tilde x = \lambda x + (1 - \lambda) x_{\pi}`.

Either way the targets become

.. math:: q = \lambda y + (1 - \lambda) y_{\pi}.

:math:`\lambda` is not folded to :math:`\max(\lambda, 1 - \lambda)` as Composer's MixUp does: timm's Mixup, which the
published recipe uses, does not fold it. The permutation is Composer's (a random one; timm pairs a batch with its
reverse), so a sample the permutation maps onto itself stays unmixed.

Randomness: each batch's draw comes from
``seeded_generator(seed, global rank, batch, microbatch)`` (:func:`mixing_generator`), a pure function of the step,
so a resumed run mixes exactly as the uninterrupted one, and no global RNG (torch, numpy, Python) is consumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.functional import cutmix_batch, mixup_batch
from composer.loggers import Logger
from composer.loss.utils import ensure_targets_one_hot
from composer.utils import dist

from magma_composer.options import OptionError, check_int, check_number
from magma_composer.seeding import seeded_generator

__all__ = [
    "MixUpOrCutMix",
    "MixingDraw",
    "check_mixing_options",
    "mix_targets",
    "mixing_generator",
    "mixup_or_cutmix_batch",
]


@dataclass(frozen=True)
class MixingDraw:
    """One batch's draw.

    Attributes:
        cutmix (bool): CutMix (True) or MixUp (False).
        lam (float): :math:`\\lambda`, the weight of each sample's own target (CutMix: the area kept, after clipping).
        indices (torch.Tensor): the permutation :math:`\\pi` (CPU, int64); sample ``i`` is mixed with ``indices[i]``.
        bbox (tuple, optional): CutMix's box ``(top, left, bottom, right)`` in pixels (rows ``top:bottom``,
            columns ``left:right``, Composer's ``(x1, y1, x2, y2)``); ``None`` for MixUp.
    """

    cutmix: bool
    lam: float
    indices: torch.Tensor
    bbox: tuple[int, int, int, int] | None = None


def check_mixing_options(mixup_alpha: float, cutmix_alpha: float, switch_prob: float | None) -> float:
    """Checks the three options; returns the probability of CutMix that applies.

    ``switch_prob`` chooses between two branches, so it is refused when one of them is off, unless it names the
    branch that is left (1.0 with ``mixup_alpha=0``, 0.0 with ``cutmix_alpha=0``).

    Raises:
        OptionError: a bad value, named by its option.
    """
    check_number("mixup_alpha", mixup_alpha, 0.0)
    check_number("cutmix_alpha", cutmix_alpha, 0.0)
    if switch_prob is not None:
        check_number("switch_prob", switch_prob, 0.0, 1.0)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        raise OptionError(
            "mixup_alpha", "and cutmix_alpha are both 0, which mixes nothing; set one of them > 0 (MAE: 0.8 and 1.0)"
        )
    for off, alpha, only in (("mixup_alpha", mixup_alpha, 1.0), ("cutmix_alpha", cutmix_alpha, 0.0)):
        if alpha == 0:
            if switch_prob is not None and switch_prob != only:
                raise OptionError(
                    "switch_prob",
                    f"{switch_prob} has no effect with {off}: 0 (every batch gets the other branch); remove it",
                )
            return only
    return 0.5 if switch_prob is None else float(switch_prob)


def mixing_generator(seed: int, rank: int, batch: int, microbatch: int = 0) -> torch.Generator:
    """The CPU generator of one microbatch's draw: ``seeded_generator(seed, rank, batch, microbatch)``."""
    return seeded_generator(seed, rank, batch, microbatch)


def _draw(
    batch_size: int, height: int, width: int, generator: torch.Generator, alphas: tuple[float, float], p_cutmix: float
) -> MixingDraw:
    """The branch, the coefficient, the permutation and the box, all from ``generator``, in a fixed order."""
    use_cutmix = float(torch.rand((), generator=generator)) < p_cutmix
    alpha = alphas[1] if use_cutmix else alphas[0]
    # torch has no Beta sampler that takes a generator: numpy's, seeded from ours (one stream of randomness)
    beta_seed = int(torch.randint(2**62, (), generator=generator))
    lam = float(np.random.default_rng(beta_seed).beta(alpha, alpha))
    indices = torch.randperm(batch_size, generator=generator)
    if not use_cutmix:
        return MixingDraw(cutmix=False, lam=lam, indices=indices)
    # the CutMix paper's box (timm and Composer draw the same): sides sqrt(1 - lam) of the image's, any centre
    cut_h, cut_w = int(height * np.sqrt(1.0 - lam)), int(width * np.sqrt(1.0 - lam))
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    return MixingDraw(cutmix=True, lam=kept, indices=indices, bbox=(top, left, bottom, right))


def mixup_or_cutmix_batch(
    input: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, MixingDraw]:
    """MixUp or CutMix of a batch of images, chosen and drawn from ``generator`` (module docstring: the formulas).

    Args:
        input (torch.Tensor): images, ``N x C x H x W``.
        target (torch.Tensor): targets, ``N`` class indices or ``N x ...``; only permuted here.
        generator (torch.Generator): a CPU generator; every draw comes from it, none from a global RNG.
        mixup_alpha (float): MixUp's Beta parameter; 0 turns MixUp off. Default: 0.8 (MAE).
        cutmix_alpha (float): CutMix's Beta parameter; 0 turns CutMix off. Default: 1.0 (MAE).
        switch_prob (float, optional): the probability of CutMix when both are on. Default: 0.5 (MAE).

    Returns:
        input_mixed (torch.Tensor): the mixed images (a new tensor).
        target_perm (torch.Tensor): the targets of the mixed-in samples, ``target[draw.indices]``.
        draw (MixingDraw): the branch, :math:`\\lambda`, the permutation and the box; :func:`mix_targets` turns it
            into the soft targets.

    Raises:
        OptionError: a bad option.
        ValueError: ``input`` is not ``N x C x H x W``.
    """
    p_cutmix = check_mixing_options(mixup_alpha, cutmix_alpha, switch_prob)
    if input.ndim != 4:
        raise ValueError(f"MixUpOrCutMix mixes images of shape N x C x H x W, got shape {tuple(input.shape)}")
    draw = _draw(input.shape[0], input.shape[-2], input.shape[-1], generator, (mixup_alpha, cutmix_alpha), p_cutmix)
    indices = draw.indices.to(input.device)
    if draw.cutmix:
        # alpha=0: with a box given, cutmix_batch would still draw an unused Beta coefficient from numpy's global RNG
        mixed, target_perm, _, _ = cutmix_batch(input, target, alpha=0.0, bbox=draw.bbox, indices=indices)
    else:
        # Composer's ``mixing`` weighs the permuted copy
        mixed, target_perm, _ = mixup_batch(input, target, mixing=1.0 - draw.lam, indices=indices)
    return mixed, target_perm, draw


def mix_targets(logits: torch.Tensor, target: torch.Tensor, draw: MixingDraw) -> torch.Tensor:
    """Soft targets :math:`q = \\lambda y + (1 - \\lambda) y_{\\pi}`, ``N x C`` float.

    ``target`` is permuted here, not earlier: smoothed targets (Composer's LabelSmoothing) then mix exactly as
    one-hot ones, and since both maps are affine, smoothing before or after mixing gives the same ``q``.

    Args:
        logits (torch.Tensor): the model's ``N x C`` outputs (for the number of classes, as Composer's
            ``smooth_labels``).
        target (torch.Tensor): ``N`` class indices or ``N x C`` class probabilities.
        draw (MixingDraw): this batch's draw (:func:`mixup_or_cutmix_batch`).
    """
    y = ensure_targets_one_hot(logits, target)
    return draw.lam * y + (1.0 - draw.lam) * y[draw.indices.to(y.device)]


class MixUpOrCutMix(Algorithm):
    """MixUp or CutMix per batch, as timm's ``Mixup`` in MAE's fine-tuning recipe (module docstring: formulas).

    At ``Event.BEFORE_FORWARD`` the images are mixed (the targets are left as they are, so the model still sees
    class indices in ``forward``); at ``Event.BEFORE_LOSS`` the targets become the soft ``q``. The loss must take
    ``N x C`` class probabilities (:class:`~magma_composer.evaluate.classifier.EncoderClassifier`'s does).

    With Composer's :class:`~composer.algorithms.LabelSmoothing` (MAE: smoothing 0.1), the order in the Trainer's
    ``algorithms`` does not matter: Composer runs ``BEFORE_LOSS`` algorithms in list order, and this one mixes
    whatever targets it finds then (permuting them at that moment), so smoothing then mixing and mixing then
    smoothing both give :math:`(1 - s) q + s / C`, timm's smoothed mixed targets. (Composer's own MixUp and CutMix
    permute the labels at ``BEFORE_FORWARD`` and need LabelSmoothing after them.) LabelSmoothing's restore at
    ``AFTER_LOSS`` (run in reverse order) is harmless either way: nothing reads the batch's targets after the loss.

    Args:
        mixup_alpha (float): MixUp's Beta parameter, >= 0; 0 turns MixUp off (every batch gets CutMix).
            Default: 0.8.
        cutmix_alpha (float): CutMix's Beta parameter, >= 0; 0 turns CutMix off (every batch gets MixUp).
            Default: 1.0. Both 0 is an error.
        switch_prob (float, optional): the probability that a batch gets CutMix, in [0, 1]. Default: 0.5. Refused
            when one branch is off (it would have no effect), unless it names the branch that is left.
        seed (int, optional): the seed of the draws, >= 0. Default: the run's seed (``Trainer(seed=...)``).
        input_key (int | str | tuple[Callable, Callable]): where the images are in the batch. Default: 0.
        target_key (int | str | tuple[Callable, Callable]): where the targets are in the batch. Default: 1.

    Raises:
        OptionError: a bad option.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float | None = None,
        seed: int | None = None,
        input_key: int | str | tuple[Callable, Callable] | Any = 0,
        target_key: int | str | tuple[Callable, Callable] | Any = 1,
    ) -> None:
        self._p_cutmix = check_mixing_options(mixup_alpha, cutmix_alpha, switch_prob)
        if seed is not None:
            check_int("seed", seed, 0)
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob = mixup_alpha, cutmix_alpha, switch_prob
        self.seed = seed
        self.input_key, self.target_key = input_key, target_key
        self.last_draw: MixingDraw | None = None  # this microbatch's draw, until its loss
        self._microbatch = 0

    def __repr__(self) -> str:
        return (
            f"MixUpOrCutMix(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
            f"switch_prob={self.switch_prob}, seed={self.seed})"
        )

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.BEFORE_TRAIN_BATCH, Event.BEFORE_FORWARD, Event.BEFORE_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BEFORE_TRAIN_BATCH:
            self._microbatch = 0
        elif event == Event.BEFORE_FORWARD:
            self._mix_input(state)
        elif event == Event.BEFORE_LOSS:
            if self.last_draw is None:
                raise RuntimeError("MixUpOrCutMix: Event.BEFORE_LOSS came without a BEFORE_FORWARD in this microbatch")
            if not isinstance(state.outputs, torch.Tensor):
                raise TypeError(f"MixUpOrCutMix needs the model's logits as outputs, got {type(state.outputs)}")
            target = state.batch_get_item(self.target_key)
            state.batch_set_item(self.target_key, mix_targets(state.outputs, target, self.last_draw))
            self.last_draw = None

    def _mix_input(self, state: State) -> None:
        images, target = state.batch_get_item(self.input_key), state.batch_get_item(self.target_key)
        seed = state.rank_zero_seed if self.seed is None else self.seed
        generator = mixing_generator(seed, dist.get_global_rank(), int(state.timestamp.batch), self._microbatch)
        self._microbatch += 1
        mixed, _, self.last_draw = mixup_or_cutmix_batch(
            images, target, generator, self.mixup_alpha, self.cutmix_alpha, self.switch_prob
        )
        state.batch_set_item(self.input_key, mixed)
