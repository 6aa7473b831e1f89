"""PCA masking (PMAE): mask principal components of the image instead of patches.

See the method card (README.md in this folder) and docs/algorithms.md §3.
"""

from magma_composer.algorithms.pca_masking.pca_masking import STRATEGIES as STRATEGIES
from magma_composer.algorithms.pca_masking.pca_masking import PCAMasking as PCAMasking
from magma_composer.algorithms.pca_masking.pca_masking import component_mask as component_mask
from magma_composer.algorithms.pca_masking.pca_masking import mask_generator as mask_generator
from magma_composer.algorithms.pca_masking.pca_masking import ordered_component_mask as ordered_component_mask
from magma_composer.algorithms.pca_masking.pca_masking import pmae_loss as pmae_loss
from magma_composer.algorithms.pca_masking.pca_masking import project_visible as project_visible
from magma_composer.algorithms.pca_masking.pca_masking import sample_component_mask as sample_component_mask

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
