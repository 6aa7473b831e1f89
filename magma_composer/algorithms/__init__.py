"""The algorithms, one package each: MAGMA, uniformity and PCA masking."""

from magma_composer.algorithms.magma import MAGMA, magma_loss
from magma_composer.algorithms.pca_masking import PCAMasking, component_mask, pmae_loss
from magma_composer.algorithms.uniformity import Uniformity, uniformity_loss

__all__ = ["MAGMA", "PCAMasking", "Uniformity", "component_mask", "magma_loss", "pmae_loss", "uniformity_loss"]
