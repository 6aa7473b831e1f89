"""Self-supervised losses, one per file with its formula in the docstring: SimCLR's NT-Xent and VICReg's loss.

Both take the two views' ``B x D`` projections and compute in float32 (float64 for float64 input) with autocast
disabled. Gathering a batch across ranks is the caller's (``magma_composer.distributed.all_gather_with_grad``, as
``ComposerSimCLR`` / ``ComposerVICReg`` do with ``gather=True``).
"""

from magma_composer.losses.nt_xent import nt_xent_loss
from magma_composer.losses.vicreg import vicreg_loss

__all__ = ["nt_xent_loss", "vicreg_loss"]
