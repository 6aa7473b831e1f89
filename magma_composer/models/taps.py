"""Feature taps: the per-step block features that the algorithms read from any timm ViT.

The algorithms in this package (MAGMA, uniformity) need, on every training step, the output of
some encoder blocks and the final CLS token. :class:`FeatureTap` gets them from any model that
holds a timm :class:`~timm.models.vision_transformer.VisionTransformer`, with forward hooks on its
``blocks[i]`` and ``norm`` modules:

* hooks are registered on the *original* block modules at ``Event.INIT``, before Composer wraps
  the model in DDP or FSDP; wrapping keeps the module objects, so the hooks survive it;
* a tap only records while it is armed (``BEFORE_FORWARD`` to ``AFTER_FORWARD`` of a training
  microbatch): evaluation forwards and activation-checkpoint recomputation during backward
  happen while it is disarmed and cannot leak in;
* each hook reduces what it sees at once (the mean over the non-prefix tokens, or the CLS token)
  and upcasts it to float32, so a step keeps a ``B x D`` tensor per tapped block, not the whole
  ``B x N x D`` activation;
* with *non-reentrant* activation checkpointing the recorded tensors stay in the autograd graph;
  reentrant checkpointing runs blocks under ``no_grad`` and is detected (the term would carry no
  gradient) and reported as an error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["FeatureTap", "find_vit", "get_feature_tap", "tap_paused"]

_TAP_ATTR = "_magma_composer_feature_tap"


def find_vit(model: nn.Module) -> VisionTransformer:
    """Returns the first timm ``VisionTransformer`` inside ``model``.

    Args:
        model (nn.Module): any module, e.g. a ComposerModel, possibly wrapped in DDP or FSDP.

    Raises:
        ValueError: if ``model`` holds no timm ``VisionTransformer``.
    """
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            return module
    raise ValueError(
        f"{type(model).__name__} holds no timm VisionTransformer: MAGMA and Uniformity read block "
        "features from a timm ViT encoder (timm.models.vision_transformer.VisionTransformer). "
        "Build the encoder with timm.create_model('vit_...') or magma_composer.models.ComposerMAE."
    )


class FeatureTap:
    """Records reduced block outputs and the final CLS token of a timm ViT during training forwards.

    Args:
        vit (VisionTransformer): the encoder to tap.
    """

    def __init__(self, vit: VisionTransformer) -> None:
        self.vit = vit
        self.depth = len(vit.blocks)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        self.armed = False
        self._paused = 0
        self._block_requests: set[int] = set()
        self._want_cls = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.block_means: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.cls_tokens: list[torch.Tensor] = []
        self._grad_missing = False
        self._grad_expected = False

    # ------------------------------------------------------------------ set-up
    def normalize_block_index(self, index: int, what: str = "layer") -> int:
        """Maps a possibly negative block index to ``0..depth-1``; raises a clear error if out of range."""
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"{what} must be an int block index, got {index!r} ({type(index).__name__})")
        if not -self.depth <= index < self.depth:
            raise ValueError(
                f"{what}={index} is out of range: the ViT has {self.depth} blocks, so valid indices are "
                f"0..{self.depth - 1} (or -{self.depth}..-1 counting from the end)"
            )
        return index % self.depth

    def request_blocks(self, indices: list[int]) -> None:
        """Asks the tap to record the patch-token mean of these blocks' outputs (hooks added lazily)."""
        for i in indices:
            i = self.normalize_block_index(i)
            if i not in self._block_requests:
                self._block_requests.add(i)
                self._handles.append(self.vit.blocks[i].register_forward_hook(self._make_block_hook(i)))

    def check_cls(self) -> None:
        """Raises a clear ``ValueError`` unless the ViT has a class token to record."""
        if self.num_prefix_tokens < 1 or getattr(self.vit, "cls_token", None) is None:
            raise ValueError(
                "the timm ViT has no class token (class_token=False): the uniformity term reads the "
                "CLS token after the final norm"
            )

    def request_cls(self) -> None:
        """Asks the tap to record the CLS token after the final LayerNorm."""
        if not self._want_cls:
            self.check_cls()
            self._want_cls = True
            self._handles.append(self.vit.norm.register_forward_hook(self._cls_hook))

    def _make_block_hook(self, index: int):
        def hook(module: nn.Module, args, output) -> None:
            if not self.recording:
                return
            tokens = output[0] if isinstance(output, (tuple, list)) else output
            if self._grad_expected and not tokens.requires_grad:
                self._grad_missing = True
            # reduce in float32 (float64 stays float64) without a float32 copy of the whole activation
            dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
            self.block_means[index].append(tokens[:, self.num_prefix_tokens :].mean(dim=1, dtype=dtype))

        return hook

    def _cls_hook(self, module: nn.Module, args, output) -> None:
        if not self.recording:
            return
        tokens = output[0] if isinstance(output, (tuple, list)) else output
        cls = tokens[:, 0]
        self.cls_tokens.append(cls if cls.dtype == torch.float64 else cls.float())

    # ------------------------------------------------------------------ per step
    @property
    def recording(self) -> bool:
        """True while the hooks record: armed and not inside :func:`tap_paused`."""
        return self.armed and not self._paused

    def arm(self) -> None:
        """Clears the last step's records and starts recording (call at ``BEFORE_FORWARD``)."""
        self.clear()
        # training forwards run with gradients on; a block output without one then means reentrant checkpointing
        self._grad_expected = torch.is_grad_enabled()
        self.armed = True

    def disarm(self) -> None:
        """Stops recording (call at ``AFTER_FORWARD``)."""
        self.armed = False

    def clear(self) -> None:
        """Drops the records (and with them the references into the autograd graph)."""
        self.block_means = defaultdict(list)
        self.cls_tokens = []
        self._grad_missing = False

    def block_features(self, index: int) -> list[torch.Tensor]:
        """The ``B x D`` patch-token means of block ``index``, one tensor per forward call of the step.

        Raises:
            RuntimeError: if nothing was recorded, or the record carries no gradient (reentrant
                activation checkpointing).
        """
        index = self.normalize_block_index(index)
        records = self.block_means.get(index, [])
        if not records:
            raise RuntimeError(
                f"no output of ViT block {index} was recorded this step: the model's training forward "
                "did not run that block (is the tapped ViT the one the model uses?)"
            )
        self._check_grad()
        return records

    def final_cls(self) -> list[torch.Tensor]:
        """The ``B x D`` CLS tokens after the final norm, one tensor per forward call of the step."""
        if not self.cls_tokens:
            raise RuntimeError(
                "no CLS token was recorded this step: the model's training forward did not call the ViT's norm"
            )
        self._check_grad()
        return self.cls_tokens

    def _check_grad(self) -> None:
        if self._grad_missing:
            raise RuntimeError(
                "a tapped ViT block produced an output without gradient while gradients were enabled: this "
                "happens with reentrant activation checkpointing. Use non-reentrant checkpointing "
                "(parallelism_config.fsdp.activation_checkpointing_reentrant: false)."
            )

    def remove(self) -> None:
        """Removes every hook (call at ``FIT_END``)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._block_requests = set()
        self._want_cls = False
        self.armed = False
        self.clear()


def get_feature_tap(model: nn.Module, vit: VisionTransformer | None = None) -> FeatureTap:
    """Returns the one :class:`FeatureTap` of the ViT in ``model``, creating it on first use.

    Several algorithms share it, so each block is hooked at most once.
    """
    vit = vit if vit is not None else find_vit(model)
    tap = vit.__dict__.get(_TAP_ATTR)
    if tap is None:
        tap = FeatureTap(vit)
        # stored in __dict__ directly: not a submodule, not in the state dict
        vit.__dict__[_TAP_ATTR] = tap
    return tap


@contextmanager
def tap_paused(model: nn.Module) -> Iterator[None]:
    """Forwards inside this context are not recorded by any :class:`FeatureTap` of ``model``.

    A two-view model encodes its first view normally and further views inside it, so that the
    regularisers read the first view only. A no-op when the model has no tap; nesting is safe (a
    counter per tap), and the tap's armed state is left as it was.

    Args:
        model (nn.Module): the model (or any module holding the tapped encoder), wrapped or not.

    Example:
        .. code-block:: python

            z1 = self.encoder(view1)
            with tap_paused(self):
                z2 = self.encoder(view2)
    """
    taps = [module.__dict__[_TAP_ATTR] for module in model.modules() if _TAP_ATTR in module.__dict__]
    for tap in taps:
        tap._paused += 1
    try:
        yield
    finally:
        for tap in taps:
            tap._paused -= 1
