"""MAGMA: manifold regularisation of a ViT's block features (Dondera, Singh, Jamali-Rad, arXiv 2412.02871).

See the method card ``README.md`` in this package.
"""

from magma_composer.algorithms.magma.magma import MAGMA, MagmaStats, magma_loss

__all__ = ["MAGMA", "MagmaStats", "magma_loss"]
