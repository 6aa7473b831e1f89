"""VICReg (Bardes, Ponce, LeCun, ICLR 2022, arXiv 2105.04906) as a Composer model; card: VICREG.md."""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import nn

from magma_composer.losses import vicreg_loss
from magma_composer.models.two_view import TwoViewModel
from magma_composer.options import check_int, check_number

__all__ = ["ComposerVICReg", "vicreg_projector"]


def vicreg_projector(feature_dim: int, hidden_dim: int = 8192, output_dim: int = 8192) -> nn.Sequential:
    """VICReg's expander: ``Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear`` (the last without a bias).

    Three layers, 8192 wide in the paper, as in the authors' released ``Projector`` (a bias on the last layer
    would not change the loss: every term is invariant to a shift of the embeddings).

    Args:
        feature_dim (int): the representation's width.
        hidden_dim (int): the two hidden layers' width.
        output_dim (int): the embedding's width.
    """
    return nn.Sequential(
        nn.Linear(feature_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, output_dim, bias=False),
    )


class ComposerVICReg(TwoViewModel):
    """VICReg: an encoder and an expander trained with the variance-invariance-covariance loss on two views.

    ``loss()`` returns the three weighted parts of :func:`~magma_composer.losses.vicreg_loss`, whose sum is the
    VICReg loss: ``{'vicreg_invariance': sim_weight * s, 'vicreg_variance': var_weight * (v(Z) + v(Z')),
    'vicreg_covariance': cov_weight * (c(Z) + c(Z'))}``; the trainer logs each as ``loss/train/<key>`` and their
    sum (with any regulariser's) as ``loss/train/total``. Evaluation logs ``metrics/<eval>/VICRegLoss`` (the
    weighted total) and the unweighted ``VICRegInvariance``, ``VICRegVariance``, ``VICRegCovariance`` (see
    :class:`~magma_composer.models.two_view.TwoViewModel` for single-view evaluation batches). Training batches
    are ``(B x 2 x C x S x S views, labels)``: set ``train_data.views: vicreg``.

    The variance and covariance terms are summed over the two branches as in the paper and solo-learn (the code
    behind MAGMA's M-VICReg); the authors' released code averages the two variance terms, so its
    ``var_weight = 25`` is ``12.5`` here. Defaults: the paper's ImageNet setting (8192-8192-8192 expander,
    weights 25 / 25 / 1); solo-learn's CIFAR configuration uses a 2048-2048-2048 expander.

    Args:
        encoder (str | dict): a timm model name (``'resnet50'``, ``'resnet18'``, ``'vit_small_patch16_224'``) or ViT
            sizes ``{'embed_dim', 'depth', 'num_heads'}``, see :func:`~magma_composer.models.two_view.build_backbone`.
        img_size (int): image side in pixels.
        patch_size (int, optional): a ViT's patch side (default: the name's, else 16); refused for a CNN.
        in_chans (int): image channels.
        proj_hidden_dim (int): the expander's hidden width.
        proj_output_dim (int): the embedding's width.
        sim_weight (float): the invariance weight ``lambda >= 0``.
        var_weight (float): the variance weight ``mu >= 0``.
        cov_weight (float): the covariance weight ``nu >= 0``.
        eps (float): added to the variance inside the square root, ``> 0``.
        cifar_stem (bool): a timm ResNet's 3x3 stride-1 stem without max-pool, for 32 px images.
        gather (bool): the loss over the batch gathered from every rank (statistics of the global batch).

    Example:
        .. code-block:: python

            from magma_composer.models.vicreg import ComposerVICReg
            model = ComposerVICReg('resnet18', img_size=32, cifar_stem=True, proj_hidden_dim=2048,
                                   proj_output_dim=2048)
            trainer = Trainer(model=model, train_dataloader=two_view_loader, max_duration='1ep')
    """

    method = "vicreg"
    metric_prefix = "VICReg"

    def __init__(
        self,
        encoder: Union[str, dict[str, Any]] = "resnet50",
        img_size: int = 224,
        patch_size: int | None = None,
        in_chans: int = 3,
        proj_hidden_dim: int = 8192,
        proj_output_dim: int = 8192,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        eps: float = 1e-4,
        cifar_stem: bool = False,
        gather: bool = False,
    ) -> None:
        self.proj_hidden_dim = check_int("proj_hidden_dim", proj_hidden_dim, 1)
        self.proj_output_dim = check_int("proj_output_dim", proj_output_dim, 1)
        self.sim_weight = check_number("sim_weight", sim_weight, 0.0)
        self.var_weight = check_number("var_weight", var_weight, 0.0)
        self.cov_weight = check_number("cov_weight", cov_weight, 0.0)
        self.eps = check_number("eps", eps, 0.0, open_min=True)
        super().__init__(encoder, img_size, patch_size, in_chans, cifar_stem, gather)

    def build_projector(self, feature_dim: int) -> nn.Module:
        return vicreg_projector(feature_dim, self.proj_hidden_dim, self.proj_output_dim)

    def metric_names(self) -> list[str]:
        return ["Loss", "Invariance", "Variance", "Covariance"]

    def loss_terms(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        total, parts = vicreg_loss(z1, z2, self.sim_weight, self.var_weight, self.cov_weight, self.eps)
        losses = {
            "vicreg_invariance": self.sim_weight * parts["invariance"],
            "vicreg_variance": self.var_weight * parts["variance"],
            "vicreg_covariance": self.cov_weight * parts["covariance"],
        }
        figures = {
            "Loss": total,
            "Invariance": parts["invariance"],
            "Variance": parts["variance"],
            "Covariance": parts["covariance"],
        }
        return losses, figures
