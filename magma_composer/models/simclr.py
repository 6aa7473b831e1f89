"""SimCLR (Chen, Kornblith, Norouzi, Hinton, ICML 2020, arXiv 2002.05709) as a Composer model; card: SIMCLR.md."""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn

from magma_composer.losses import nt_xent_loss
from magma_composer.models.two_view import TwoViewModel
from magma_composer.options import OptionError, check_int, check_number

__all__ = ["ComposerSimCLR", "simclr_projector"]


def simclr_projector(feature_dim: int, hidden_dim: int = 2048, output_dim: int = 256, batch_norm: bool = False):
    """SimCLR's two-layer projection head ``g``.

    ``batch_norm=False``: ``Linear -> ReLU -> Linear`` (solo-learn's head, the code behind MAGMA's M-SimCLR).
    ``batch_norm=True``: the SimCLR authors' released head, ``Linear -> BN -> ReLU -> Linear -> BN`` with no bias
    before a BN and an output BN that learns a scale only (its shift is frozen at 0).

    Args:
        feature_dim (int): the representation's width.
        hidden_dim (int): the hidden layer's width.
        output_dim (int): the projection's width.
        batch_norm (bool): the authors' head with batch normalisation.
    """
    if not batch_norm:
        return nn.Sequential(
            nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, output_dim)
        )
    out_bn = nn.BatchNorm1d(output_dim)
    out_bn.bias.requires_grad_(False)  # the authors' output BN has no centre (TF center=False)
    return nn.Sequential(
        nn.Linear(feature_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, output_dim, bias=False),
        out_bn,
    )


class ComposerSimCLR(TwoViewModel):
    """SimCLR: an encoder and a projection head trained with NT-Xent on two views of every image.

    ``loss()`` returns ``{'simclr': nt_xent_loss(z1, z2, temperature)}`` (logged by the trainer as
    ``loss/train/simclr``). Evaluation logs ``metrics/<eval>/SimCLRLoss`` (see :class:`TwoViewModel` for single-view
    evaluation batches). Training batches are ``(B x 2 x C x S x S views, labels)``: set ``train_data.views:
    simclr``. Everything else (views, ``tap_paused``, features, checkpoints) is :class:`TwoViewModel`'s.

    The defaults are solo-learn's SimCLR configuration (hidden 2048, output 256, temperature 0.2, no BN in the
    head), the code behind MAGMA's published M-SimCLR numbers; the SimCLR paper's ImageNet setting is
    ``proj_output_dim=128, temperature=0.1, projector_bn=True`` with the hidden width equal to the representation's
    (2048 for a ResNet-50).

    Args:
        encoder (str | dict): a timm model name (``'resnet50'``, ``'resnet18'``, ``'vit_small_patch16_224'``) or ViT
            sizes ``{'embed_dim', 'depth', 'num_heads'}``, see :func:`~magma_composer.models.two_view.build_backbone`.
        img_size (int): image side in pixels.
        patch_size (int, optional): a ViT's patch side (default: the name's, else 16); refused for a CNN.
        in_chans (int): image channels.
        proj_hidden_dim (int): the head's hidden width.
        proj_output_dim (int): the projection's width.
        temperature (float): NT-Xent's temperature, ``> 0``.
        projector_bn (bool): the SimCLR authors' head with batch normalisation (see :func:`simclr_projector`).
        cifar_stem (bool): a timm ResNet's 3x3 stride-1 stem without max-pool, for 32 px images.
        gather (bool): the loss over the batch gathered from every rank (negatives from every device).

    Example:
        .. code-block:: python

            from magma_composer.models.simclr import ComposerSimCLR
            model = ComposerSimCLR('resnet18', img_size=32, cifar_stem=True)
            trainer = Trainer(model=model, train_dataloader=two_view_loader, max_duration='1ep')
    """

    method = "simclr"
    metric_prefix = "SimCLR"

    def __init__(
        self,
        encoder: Union[str, dict[str, Any]] = "resnet50",
        img_size: int = 224,
        patch_size: int | None = None,
        in_chans: int = 3,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 256,
        temperature: float = 0.2,
        projector_bn: bool = False,
        cifar_stem: bool = False,
        gather: bool = False,
    ) -> None:
        self.proj_hidden_dim = check_int("proj_hidden_dim", proj_hidden_dim, 1)
        self.proj_output_dim = check_int("proj_output_dim", proj_output_dim, 1)
        self.temperature = check_number("temperature", temperature, 0.0, open_min=True)
        if not isinstance(projector_bn, bool):
            raise OptionError("projector_bn", f"expected true or false, got {projector_bn!r}")
        self.projector_bn = projector_bn
        super().__init__(encoder, img_size, patch_size, in_chans, cifar_stem, gather)

    def build_projector(self, feature_dim: int) -> nn.Module:
        return simclr_projector(feature_dim, self.proj_hidden_dim, self.proj_output_dim, self.projector_bn)

    def loss_terms(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        loss = nt_xent_loss(z1, z2, self.temperature)
        return {"simclr": loss}, {"Loss": loss}
