"""magma_composer: MAGMA, uniformity and PCA masking for masked autoencoders in MosaicML Composer."""

__version__ = "0.1.0"
