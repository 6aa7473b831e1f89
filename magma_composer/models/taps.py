"""Feature taps: the per-step features that the algorithms read from the modules of an encoder.

The algorithms in this package (MAGMA, uniformity) need, on every training step, the reduced outputs
of some encoder modules and, for uniformity, a ViT's final CLS token. :class:`FeatureTap` records them
with forward hooks on the modules of one encoder, the *tapped encoder*, which :func:`find_encoder`
picks in this order:

1. the first timm :class:`~timm.models.vision_transformer.VisionTransformer` inside the model: its
   blocks are named by int index (``3`` is ``blocks[3]``, negative counts from the end) or, like any
   of its modules, by dotted name (``'blocks.3'`` is the same block, ``'norm'``...);
2. otherwise the model's ``encoder`` attribute, if it is a torch module (``ComposerSimCLR`` and
   ``ComposerVICReg`` expose their backbone there), e.g. a timm ResNet, whose modules are named by
   dotted name (``'layer3'``, ``'layer4.1.conv2'``); an int index is an error there;
3. otherwise the model itself (dotted names inside it).

Each hook reduces the output it sees to ``B x D`` at once, by the output's rank:

* 4-D ``B x C x H x W``: global average pooling over ``H, W`` (for a timm ResNet, the pooled
  ``layer4`` is exactly the network's pooled output);
* 3-D ``B x N x D``: the mean over the tokens; in a ViT over the non-prefix tokens (CLS and register
  tokens excluded), except for the outputs of ``patch_embed`` and its submodules, which carry no
  prefix tokens yet;
* 2-D ``B x D``: kept as is.

The reduction runs in float32 (float64 stays float64); on a GPU the mean accumulates half-precision
input in float32 without an upcast copy of the whole activation, so a step keeps one ``B x D`` tensor
per tapped module. The reduced tensors stay in the autograd graph.

Recording is controlled in three ways:

* hooks are registered on the *original* modules at ``Event.INIT``, before Composer wraps the model
  in DDP or FSDP; wrapping keeps the module objects, so the hooks survive it;
* a tap only records while it is armed (``BEFORE_FORWARD`` to ``AFTER_FORWARD`` of a training
  microbatch): evaluation forwards and activation-checkpoint recomputation during backward happen
  while it is disarmed and cannot leak in;
* forwards inside :func:`tap_paused` are not recorded: a two-view model encodes its further views
  there, so that the regularisers read the first view only.

With *non-reentrant* activation checkpointing the recorded tensors stay in the autograd graph;
reentrant checkpointing runs the modules under ``no_grad`` and is detected (the term would carry no
gradient) and reported as an error.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Union

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["FeatureTap", "find_encoder", "find_vit", "get_feature_tap", "tap_paused"]

_TAP_ATTR = "_magma_composer_feature_tap"

Layer = Union[int, str]  # what a user names: a ViT block index or a dotted module name
Key = Union[int, str]  # what the tap records under: a ViT block index (0..depth-1) or a module name


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP wrappers (they keep the original module object as ``.module``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, FullyShardedDataParallel)):
        model = model.module
    return model


def find_encoder(model: nn.Module) -> tuple[nn.Module, str]:
    """Returns the encoder a :class:`FeatureTap` of ``model`` reads, and a description of where it was found.

    The first timm ``VisionTransformer`` inside the model; otherwise the model's ``encoder`` attribute if it
    is a torch module; otherwise the model itself. DDP / FSDP wrappers are looked through.

    Args:
        model (nn.Module): any module, e.g. a ComposerModel, possibly wrapped in DDP or FSDP.

    Returns:
        tuple[nn.Module, str]: the encoder, and where it is for messages, e.g. ``"MyModel's `encoder` attribute
        (a ResNet)"``.
    """
    model = _unwrap(model)
    owner = type(model).__name__
    for name, module in model.named_modules():
        if isinstance(module, VisionTransformer):
            return module, f"{owner}'s timm VisionTransformer ({name or 'the model itself'})"
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module):
        encoder = _unwrap(encoder)
        return encoder, f"{owner}'s `encoder` attribute (a {type(encoder).__name__})"
    return model, f"the model itself ({owner}: no timm ViT inside it and no `encoder` module attribute)"


class FeatureTap:
    """Records reduced module outputs (and a ViT's final CLS token) of one encoder during training forwards.

    Args:
        encoder (nn.Module): the encoder to tap: a timm ``VisionTransformer`` or any module.
        description (str, optional): where the encoder is, for error messages (see :func:`find_encoder`).
        owner (str, optional): the model's class name, for error messages.
    """

    def __init__(self, encoder: nn.Module, description: str | None = None, owner: str | None = None) -> None:
        self.encoder = encoder
        self.vit: VisionTransformer | None = encoder if isinstance(encoder, VisionTransformer) else None
        self.depth: int | None = len(encoder.blocks) if self.vit is not None else None
        self.num_prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 1)) if self.vit is not None else 0
        self.description = description or type(encoder).__name__
        self.owner = owner or type(encoder).__name__
        self.armed = False
        self._paused = 0
        self._block_requests: set[Key] = set()
        self._want_cls = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.block_means: dict[Key, list[torch.Tensor]] = defaultdict(list)
        self.cls_tokens: list[torch.Tensor] = []
        self._grad_missing = False
        self._grad_expected = False

    # ------------------------------------------------------------------ names
    def normalize_block_index(self, index: int, what: str = "layer") -> int:
        """Maps a possibly negative ViT block index to ``0..depth-1``; raises a clear error if out of range."""
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"{what} must be an int block index, got {index!r} ({type(index).__name__})")
        if self.vit is None:
            raise ValueError(
                f"{self.owner} holds no timm VisionTransformer, so {what}={index} (a ViT block index) names no "
                f"module: the tap reads {self.description}, whose modules are named by their dotted names. "
                f"{self._children_hint()} For a timm ResNet, e.g. `reference_layers: [layer3], target_layer: layer4`."
            )
        if not -self.depth <= index < self.depth:
            raise ValueError(
                f"{what}={index} is out of range: the ViT has {self.depth} blocks, so valid indices are "
                f"0..{self.depth - 1} (or -{self.depth}..-1 counting from the end)"
            )
        return index % self.depth

    def resolve(self, layer: Layer, what: str = "layer") -> Key:
        """The record key of ``layer``: an int ViT block index, or a dotted module name of the encoder.

        On a ViT, ints and the names ``'blocks.<i>'`` give the same key (the block index), so that a
        block is hooked once.

        Raises:
            TypeError: ``layer`` is neither an int nor a str.
            ValueError: an int on an encoder that is not a ViT, an index out of range, or an unknown name
                (the message lists the encoder's top-level child modules).
        """
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise TypeError(
                f"{what} must be an int block index or a module name, got {layer!r} ({type(layer).__name__})"
            )
        if isinstance(layer, int):
            return self.normalize_block_index(layer, what)
        modules = dict(self.encoder.named_modules())
        if not layer or layer not in modules:
            raise ValueError(
                f"{what}={layer!r} names no module of the tapped encoder, {self.description}. "
                f"{self._children_hint()}{self._deeper_hint()}"
            )
        match = re.fullmatch(r"blocks\.(\d+)", layer) if self.vit is not None else None
        return int(match.group(1)) if match else layer

    def module_name(self, key: Key) -> str:
        """The dotted name, inside the encoder, of the module recorded under ``key``."""
        return f"blocks.{key}" if isinstance(key, int) else key

    def module_order(self, key: Key) -> int:
        """The position of ``key``'s module in registration order (``encoder.named_modules()``, parents first)."""
        name = self.module_name(key)
        for position, (other, _) in enumerate(self.encoder.named_modules()):
            if other == name:
                return position
        raise KeyError(name)

    def _children_hint(self) -> str:
        children = [name for name, _ in self.encoder.named_children()]
        return f"Its top-level child modules: {', '.join(children) if children else '(none)'}."

    def _deeper_hint(self) -> str:
        deeper = next((name for name, _ in self.encoder.named_modules() if name.count(".") == 1), None)
        return f" Deeper modules by their dotted path, e.g. {deeper!r}." if deeper else ""

    def _module(self, key: Key) -> nn.Module:
        return self.encoder.blocks[key] if isinstance(key, int) else self.encoder.get_submodule(key)

    # ------------------------------------------------------------------ set-up
    def request_blocks(self, layers: list[Layer]) -> None:
        """Asks the tap to record the reduced outputs of these modules (int ViT blocks or dotted names).

        Hooks are added once per module, however many algorithms ask for it.
        """
        for layer in layers:
            key = self.resolve(layer)
            if key in self._block_requests:
                continue
            self._block_requests.add(key)
            name = self.module_name(key)
            # patch_embed runs before the prefix tokens are prepended
            in_patch_embed = name == "patch_embed" or name.startswith("patch_embed.")
            start = self.num_prefix_tokens if self.vit is not None and not in_patch_embed else 0
            self._handles.append(self._module(key).register_forward_hook(self._make_block_hook(key, start)))

    def check_cls(self) -> None:
        """Raises a clear ``ValueError`` unless the encoder is a ViT with a class token to record."""
        if self.vit is None:
            raise ValueError(
                f"the tapped encoder, {self.description}, has no CLS token: the uniformity term "
                "reads the CLS token after the final norm of a timm VisionTransformer (class_token=True)"
            )
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

    def _make_block_hook(self, key: Key, start: int):
        def hook(module: nn.Module, args, output) -> None:
            if not self.recording:
                return
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            reduced = self._reduce(tensor, key, start)
            if self._grad_expected and not tensor.requires_grad:
                self._grad_missing = True
            self.block_means[key].append(reduced)

        return hook

    def _reduce(self, tensor: torch.Tensor, key: Key, start: int) -> torch.Tensor:
        """``B x D``: GAP of a 4-D output, token mean (from ``start``) of a 3-D one, a 2-D one as is."""
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() not in (2, 3, 4):
            got = (
                f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}"
                if isinstance(tensor, torch.Tensor)
                else type(tensor).__name__
            )
            raise RuntimeError(
                f"the tapped {self._describe(key)} returned {got}: the tap reduces floating-point outputs of "
                "shape B x D (kept), B x N x D (token mean) or B x C x H x W (global average pooling); "
                "name another module"
            )
        # reduce in float32 (float64 stays float64) without a float32 copy of the whole activation
        dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        if tensor.dim() == 4:
            return tensor.mean(dim=(2, 3), dtype=dtype)
        if tensor.dim() == 3:
            return tensor[:, start:].mean(dim=1, dtype=dtype)
        return tensor.to(dtype)

    def _describe(self, key: Key) -> str:
        return f"ViT block {key}" if isinstance(key, int) else f"module {key!r}"

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
        # training forwards run with gradients on; an output without one then means reentrant checkpointing
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

    def block_features(self, layer: Layer) -> list[torch.Tensor]:
        """The ``B x D`` reduced outputs of ``layer`` (see :meth:`resolve`), one tensor per forward call of the step.

        Raises:
            RuntimeError: if nothing was recorded, or the record carries no gradient (reentrant
                activation checkpointing).
        """
        # a requested name is its own key: no module lookup on every step
        key = layer if isinstance(layer, str) and layer in self._block_requests else self.resolve(layer)
        records = self.block_means.get(key, [])
        if not records:
            raise RuntimeError(
                f"no output of {self._describe(key)} was recorded this step: the model's training forward "
                "did not run that module (is the tapped encoder the one the model uses?)"
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
                "a tapped module produced an output without gradient while gradients were enabled: this "
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


def get_feature_tap(model: nn.Module, encoder: nn.Module | None = None) -> FeatureTap:
    """Returns the one :class:`FeatureTap` of ``model``'s encoder (see :func:`find_encoder`), creating it on first use.

    Several algorithms share it, so each module is hooked at most once.

    Args:
        model (nn.Module): the model, possibly wrapped in DDP or FSDP.
        encoder (nn.Module, optional): the encoder to tap instead of the one :func:`find_encoder` picks.
    """
    if encoder is None:
        encoder, description = find_encoder(model)
    else:
        description = type(encoder).__name__
    tap = encoder.__dict__.get(_TAP_ATTR)
    if tap is None:
        tap = FeatureTap(encoder, description=description, owner=type(_unwrap(model)).__name__)
        # stored in __dict__ directly: not a submodule, not in the state dict
        encoder.__dict__[_TAP_ATTR] = tap
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
