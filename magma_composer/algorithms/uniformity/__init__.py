"""Uniformity (U-MAE): a uniformity term on the encoder's CLS features (Zhang, Wang, Wang, NeurIPS 2022).

See the method card ``README.md`` in this package.
"""

from magma_composer.algorithms.uniformity.uniformity import Uniformity, UniformityStats, uniformity_loss

__all__ = ["Uniformity", "UniformityStats", "uniformity_loss"]
