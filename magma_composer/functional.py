"""The functional forms of every algorithm in one import.

Example:
    .. code-block:: python

        from magma_composer import functional as F
        loss = F.magma_loss(reference_feats, target_feats)          # B x D each
        u = F.uniformity_loss(cls_feats)
        masked = F.component_mask(rho, ratio=0.2, permutation=torch.randperm(len(rho)))
        pmae = F.pmae_loss(z, z_hat, basis, masked)
"""

from magma_composer.algorithms.magma.magma import magma_loss
from magma_composer.algorithms.pca_masking.pca_masking import component_mask, pmae_loss
from magma_composer.algorithms.uniformity.uniformity import uniformity_loss

__all__ = ["component_mask", "magma_loss", "pmae_loss", "uniformity_loss"]
