"""PCA bases for PCA masking (PMAE): fit once per data set and image size, save, load and check.

Fit from the command line (``python -m magma_composer.pca fit --help``) or from Python:

.. code-block:: python

    from magma_composer.pca import fit_basis, load_basis
    basis = fit_basis('/data/cifar10-mds', split='train', image_size=32, out='cifar10-32.pt')
    basis = load_basis('cifar10-32.pt', expected_image_size=32, expected_channels=3)

Pixel statistics alone (per-pixel mean and std, for the data sets' ``normalize: pixel``):
``python -m magma_composer.pca stats ...`` writes them; :func:`load_pixel_stats` reads such a file or a basis.
"""

from magma_composer.pca.basis import (
    PCABasis,
    PixelStats,
    basis_sha256,
    load_basis,
    load_pixel_stats,
    save_basis,
    save_pixel_stats,
)
from magma_composer.pca.fit import compute_pixel_stats, fit_basis, fit_pca, fit_pixel_stats

__all__ = [
    "PCABasis",
    "PixelStats",
    "basis_sha256",
    "compute_pixel_stats",
    "fit_basis",
    "fit_pca",
    "fit_pixel_stats",
    "load_basis",
    "load_pixel_stats",
    "save_basis",
    "save_pixel_stats",
]
