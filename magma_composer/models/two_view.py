"""The shared base of the two-view self-supervised models (SimCLR, VICReg): backbone, views, features, state.

:func:`build_backbone` builds the encoder: a timm ViT (through :func:`~magma_composer.models.mae.build_vit`) or any
other timm model with its classifier removed (a ResNet...). :class:`TwoViewModel` is a ComposerModel that takes
``(B x 2 x C x S x S, labels)`` batches (``StreamingImageDataset(views=...)``), encodes view 1 normally and view 2
inside :func:`~magma_composer.models.taps.tap_paused` (so MAGMA and Uniformity read view 1 only), projects both
with the method's head and leaves the loss to the subclass (``ComposerSimCLR``, ``ComposerVICReg``).
"""

from __future__ import annotations

import re
from typing import Any, Union

import timm
import torch
from composer.models import ComposerModel
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torchmetrics import MeanMetric, Metric

from magma_composer.distributed import all_gather_with_grad
from magma_composer.models.mae import build_vit, encoder_architecture
from magma_composer.models.taps import tap_paused
from magma_composer.options import OptionError, check_choice, check_int
from magma_composer.precision import autocast_on_cpu

__all__ = ["LossFigure", "TwoViewModel", "backbone_architecture", "build_backbone"]

_VIT_MODULE = "timm.models.vision_transformer"


def _default_patch_size(name: str) -> int:
    """The patch side in a timm ViT name (``vit_small_patch8_224`` -> 8); 16 when the name has none."""
    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else 16


def _replace_resnet_stem(model: nn.Module, name: str) -> None:
    """solo-learn's CIFAR stem: a 3x3 stride-1 first convolution and no max-pool, so 32 px images keep 32x32 maps."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(model, "maxpool", None), nn.Module):
        raise OptionError(
            "cifar_stem",
            f"replaces a timm ResNet's single conv1 and its maxpool; {name!r} ({type(model).__name__}) has no such "
            "stem (deep-stem ResNets such as resnet50d are not supported): leave cifar_stem false",
        )
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def build_backbone(
    encoder: Union[str, dict[str, Any]],
    img_size: int = 224,
    patch_size: int | None = None,
    in_chans: int = 3,
    cifar_stem: bool = False,
) -> tuple[nn.Module, int]:
    """The encoder of a two-view model and the width of its representation.

    * A timm ViT name (``'vit_small_patch16_224'``) or a mapping of sizes (``{'embed_dim': 192, 'depth': 12,
      'num_heads': 3}``): a timm ``VisionTransformer`` from :func:`~magma_composer.models.mae.build_vit`, no head;
      its representation is the CLS token after the final norm (width ``embed_dim``).
    * Any other timm model name (``'resnet18'``, ``'resnet50'``): ``timm.create_model(name, pretrained=False,
      num_classes=0, in_chans=in_chans)``; its representation is the model's pooled output (width
      ``num_features``: 512 for resnet18, 2048 for resnet50).

    Args:
        encoder (str | dict): a timm model name, or ViT sizes.
        img_size (int): square image side in pixels (a ViT is built for it; a CNN takes any size).
        patch_size (int, optional): a ViT's patch side, dividing ``img_size``. Default: the number in a timm
            ViT's name (``patch16`` -> 16), else 16. Refused for a CNN (it has no patches).
        in_chans (int): image channels.
        cifar_stem (bool): for a timm ResNet only: replace the 7x7 stride-2 stem and its max-pool by a 3x3 stride-1
            convolution, as solo-learn (and the SimCLR paper's CIFAR-10 experiments) do for 32 px images.

    Returns:
        tuple[nn.Module, int]: the encoder and its representation width.

    Raises:
        OptionError: an unknown name, a bad size, ``patch_size`` for a CNN, ``cifar_stem`` for a non-ResNet.
    """
    check_int("img_size", img_size, 1)
    check_int("in_chans", in_chans, 1)
    if patch_size is not None:
        check_int("patch_size", patch_size, 1, img_size)
    if not isinstance(cifar_stem, bool):
        raise OptionError("cifar_stem", f"expected true or false, got {cifar_stem!r}")
    if isinstance(encoder, str):
        if not timm.is_model(encoder):
            raise OptionError(
                "encoder",
                f"{encoder!r} is not a timm model name; e.g. 'resnet18', 'resnet50', 'vit_small_patch16_224', or give "
                "ViT sizes {embed_dim, depth, num_heads}",
            )
        vit_name = timm.models.model_entrypoint(encoder).__module__ == _VIT_MODULE
        model = None
        if not vit_name:
            model = timm.create_model(encoder, pretrained=False, num_classes=0, in_chans=in_chans)
        if vit_name or isinstance(model, VisionTransformer):
            patch_size = _default_patch_size(encoder) if patch_size is None else patch_size
            model = None
    elif isinstance(encoder, dict):
        patch_size = 16 if patch_size is None else patch_size
        model = None
    else:
        raise OptionError("encoder", f"expected a timm model name or a mapping of ViT sizes, got {encoder!r}")

    if model is None:  # a ViT
        if cifar_stem:
            raise OptionError("cifar_stem", "applies to a timm ResNet only; this encoder is a ViT: leave it false")
        if img_size % patch_size:
            raise OptionError("patch_size", f"{patch_size} does not divide img_size {img_size}")
        vit = build_vit(encoder, img_size, patch_size, in_chans)
        if vit.cls_token is None:
            raise OptionError("encoder", "a two-view ViT needs a CLS token (its representation); this one has none")
        return vit, int(vit.embed_dim)

    if patch_size is not None:
        raise OptionError(
            "patch_size",
            f"applies to ViT encoders only; {encoder!r} is a {type(model).__name__}, which has no patches: leave "
            "patch_size out",
        )
    if cifar_stem:
        _replace_resnet_stem(model, encoder)
    return model, int(model.num_features)


def backbone_architecture(encoder: nn.Module, name: str | None, img_size: int, cifar_stem: bool) -> dict[str, Any]:
    """What rebuilds ``encoder`` with :func:`build_backbone`: recorded in checkpoints (the model's extra state).

    A ViT: :func:`~magma_composer.models.mae.encoder_architecture` (the same record as ``ComposerMAE``'s). Any
    other timm model: ``{'timm_model': name, 'in_chans', 'img_size', 'cifar_stem'}``.
    """
    if isinstance(encoder, VisionTransformer):
        return encoder_architecture(encoder)
    first_conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = int(first_conv.in_channels) if first_conv is not None else None
    return {"timm_model": name, "in_chans": in_chans, "img_size": int(img_size), "cifar_stem": bool(cifar_stem)}


class TwoViewModel(ComposerModel):
    """A Composer model that trains an encoder and a projection head on two views of every image.

    Subclasses set :attr:`method` and :attr:`metric_prefix`, build :attr:`projector` with :meth:`build_projector`
    and compute the loss in :meth:`loss_terms`. This base class does the rest:

    * ``forward(batch)`` takes ``(views, labels)`` or ``(views, labels, indices)`` with ``views`` of shape
      ``B x 2 x C x S x S`` (``train_data.views`` set in a recipe). View 1 is encoded normally, view 2 inside
      :func:`~magma_composer.models.taps.tap_paused`, so a feature tap (MAGMA, Uniformity) records the first
      view only. Outputs: ``{'h1', 'h2'}`` the representations, ``{'z1', 'z2'}`` the projections.
    * ``loss(outputs, batch)``: with ``gather=True`` both projections are first gathered from every rank with
      :func:`~magma_composer.distributed.all_gather_with_grad`, so the loss sees the global batch (SimCLR's
      negatives from every device, VICReg's statistics over the global batch).
    * Evaluation: the method's loss on the evaluation batches, as ``MeanMetric`` s weighted by the batch size. A
      single-view evaluation batch (the usual evaluation loader) counts as two identical views: its figure then
      measures only the spread of the embeddings (SimCLR: the negatives' part; VICReg: variance and covariance),
      a collapse check on held-out images, not comparable with the training loss. Batches of fewer than 2
      samples are left out (the losses need 2).
    * ``extract_features`` / ``prepare_images`` / ``encoder`` for the kNN monitor, the online probe and the
      evaluation command; the encoder's architecture in the extra state (checkpoints rebuild it).

    Args:
        encoder (str | dict): a timm model name or ViT sizes, see :func:`build_backbone`.
        img_size (int): image side in pixels.
        patch_size (int, optional): a ViT's patch side; refused for a CNN.
        in_chans (int): image channels.
        cifar_stem (bool): a timm ResNet's 3x3 stride-1 stem without max-pool, for 32 px images.
        gather (bool): compute the loss on the batch gathered from every rank (with gradient).
    """

    #: bf16 on a CPU: ``forward``, ``loss``, ``eval_forward`` and ``extract_features`` run under
    #: ``torch.autocast("cpu", dtype)`` (set by :func:`magma_composer.precision.cpu_autocast`; None: float32)
    cpu_autocast_dtype: torch.dtype | None = None

    #: the method's name (the loss key prefix)
    method = "two_view"
    #: the prefix of the evaluation metrics' names
    metric_prefix = "TwoView"

    def __init__(
        self,
        encoder: Union[str, dict[str, Any]],
        img_size: int = 224,
        patch_size: int | None = None,
        in_chans: int = 3,
        cifar_stem: bool = False,
        gather: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(gather, bool):
            raise OptionError("gather", f"expected true or false, got {gather!r}")
        self.encoder, self.feature_dim = build_backbone(encoder, img_size, patch_size, in_chans, cifar_stem)
        self.is_vit = isinstance(self.encoder, VisionTransformer)
        self.encoder_name = encoder if isinstance(encoder, str) else None
        self.img_size = img_size
        self.patch_size = int(self.encoder.patch_embed.patch_size[0]) if self.is_vit else None
        self.in_chans = in_chans
        self.cifar_stem = cifar_stem
        self.gather = gather
        self.projector = self.build_projector(self.feature_dim)
        self.val_metrics = {f"{self.metric_prefix}{name}": LossFigure(name) for name in self.metric_names()}

    # ------------------------------------------------------------------ for subclasses
    def build_projector(self, feature_dim: int) -> nn.Module:
        """The projection head from the ``B x feature_dim`` representation."""
        raise NotImplementedError

    def loss_terms(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(loss dict, evaluation figures)`` of the projections: the loss dict's values sum to the objective;
        the figures are keyed by :meth:`metric_names`."""
        raise NotImplementedError

    def metric_names(self) -> list[str]:
        """The evaluation figures of :meth:`loss_terms`, each logged as ``metric_prefix + name``."""
        return ["Loss"]

    # ------------------------------------------------------------------ FSDP / checkpointing
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        """FSDP wraps every ViT block (a CNN encoder is wrapped whole)."""
        return isinstance(module, Block)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        """Activation checkpointing applies to every ViT block."""
        return isinstance(module, Block)

    def get_extra_state(self) -> dict[str, Any]:
        """The method and the encoder's architecture (:func:`backbone_architecture`), saved with the weights."""
        return {
            "method": self.method,
            "encoder": backbone_architecture(self.encoder, self.encoder_name, self.img_size, self.cifar_stem),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved_method = state.get("method")
        if saved_method is not None and saved_method != self.method:
            raise ValueError(f"the checkpoint is a {saved_method!r} model, this one is {self.method!r}")
        recorded = state.get("encoder")
        current = backbone_architecture(self.encoder, self.encoder_name, self.img_size, self.cifar_stem)
        if recorded is not None and recorded != current:
            keys = sorted(set(recorded) | set(current), key=str)
            shown = ", ".join(
                f"{k} {recorded.get(k)!r} (this model: {current.get(k)!r})"
                for k in keys
                if recorded.get(k) != current.get(k)
            )
            raise ValueError(f"the checkpoint's encoder differs from this model's: {shown}; build the same model")

    # ------------------------------------------------------------------ views and encoding
    def split_views(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(view 1, view 2)``, each ``B x C x S x S``, from a two-view batch.

        Raises:
            ValueError: the batch holds single images (``B x C x S x S``) or another number of views.
            TypeError: the batch is not ``(views, labels[, indices])`` or a tensor.
        """
        images = self._images(batch)
        name = type(self).__name__
        if images.dim() == 4:
            raise ValueError(
                f"{name} trains on two views of every image, but the batch holds single images of shape "
                f"{tuple(images.shape)}: set train_data.views: {self.method} in the recipe "
                f"(StreamingImageDataset(views='{self.method}')), which yields B x 2 x C x S x S batches"
            )
        if images.dim() != 5 or images.shape[1] != 2:
            raise ValueError(
                f"{name} expects B x 2 x C x S x S two-view batches (view 1 then view 2), got shape "
                f"{tuple(images.shape)}"
            )
        return images[:, 0], images[:, 1]

    @staticmethod
    def _images(batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            return batch[0]
        raise TypeError(
            f"unsupported batch {type(batch).__name__}: expected (views, labels[, indices]) with views "
            "B x 2 x C x S x S, or a tensor"
        )

    def represent(self, images: torch.Tensor) -> torch.Tensor:
        """``B x feature_dim`` representations: a ViT's CLS token after the final norm, a CNN's pooled output."""
        return self.encoder(images)

    @autocast_on_cpu
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        view1, view2 = self.split_views(batch)
        h1 = self.represent(view1)
        with tap_paused(self):  # the regularisers read the first view only
            h2 = self.represent(view2)
        return {"h1": h1, "h2": h2, "z1": self.projector(h1), "z2": self.projector(h2)}

    @autocast_on_cpu
    def loss(self, outputs: dict[str, torch.Tensor], batch: Any, *args, **kwargs) -> dict[str, torch.Tensor]:
        z1, z2 = outputs["z1"], outputs["z2"]
        if self.gather:
            z1, z2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
        return self.loss_terms(z1, z2)[0]

    # ------------------------------------------------------------------ evaluation
    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the data set yields them -> this model's input (the identity)."""
        return images

    @torch.no_grad()
    @autocast_on_cpu
    def extract_features(self, images: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """Features of data-set images (``B x D``), from the encoder.

        Args:
            images (torch.Tensor): ``B x C x H x W`` single images.
            pool (str, optional): ViT: ``'cls'`` the CLS token after the final norm (the representation; the
                default), ``'mean'`` the mean of the patch tokens after it (CLS excluded). CNN: ``'mean'`` or
                the default, the pooled output (the representation); ``'cls'`` is an error (no CLS token).
        """
        if pool is not None:
            check_choice("pool", pool, ("cls", "mean"))
        images = self.prepare_images(images)
        if not self.is_vit:
            if pool == "cls":
                raise OptionError(
                    "pool",
                    f"'cls' needs a ViT's CLS token; the {type(self.encoder).__name__} encoder has none: use "
                    "pool: mean (its global average pooled output)",
                )
            return self.represent(images).float()
        tokens = self.encoder.forward_features(images)
        if pool == "mean":
            return tokens[:, self.encoder.num_prefix_tokens :].mean(dim=1).float()
        return tokens[:, 0].float()

    @autocast_on_cpu
    def eval_forward(self, batch: Any, outputs: Any | None = None) -> dict[str, Any]:
        if outputs is not None:
            return outputs
        images = self._images(batch)
        if images.dim() == 4:  # single views: each image against itself
            z = self.projector(self.represent(images))
            z1 = z2 = z
        else:
            view1, view2 = self.split_views(batch)
            z1, z2 = self.projector(self.represent(view1)), self.projector(self.represent(view2))
        figures = self.loss_terms(z1, z2)[1] if z1.shape[0] >= 2 else {}
        return {"z1": z1, "z2": z2, "figures": figures}

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else self.val_metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        value = outputs["figures"].get(getattr(metric, "figure", None))
        if value is not None:  # none for a batch of fewer than 2 samples
            metric.update(value.detach(), weight=outputs["z1"].shape[0])


class LossFigure(MeanMetric):
    """The batch-size-weighted mean of one figure of :meth:`TwoViewModel.loss_terms` over the evaluation batches.

    Args:
        figure (str): the figure's name (a key of the figures that ``loss_terms`` returns).
    """

    def __init__(self, figure: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.figure = figure
