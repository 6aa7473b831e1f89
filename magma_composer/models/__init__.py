"""Models: the Composer MAE, the two-view SimCLR and VICReg models, and the feature taps that the algorithms read."""

from magma_composer.models.mae import (
    ComposerMAE,
    InputTransform,
    MaskedAutoencoder,
    build_vit,
    masked_mse_loss,
    patchify,
    random_masking,
    unpatchify,
)
from magma_composer.models.simclr import ComposerSimCLR
from magma_composer.models.taps import FeatureTap, find_encoder, find_vit, get_feature_tap, tap_paused
from magma_composer.models.two_view import TwoViewModel, build_backbone
from magma_composer.models.vicreg import ComposerVICReg

__all__ = [
    "ComposerMAE",
    "ComposerSimCLR",
    "ComposerVICReg",
    "TwoViewModel",
    "build_backbone",
    "InputTransform",
    "MaskedAutoencoder",
    "build_vit",
    "FeatureTap",
    "find_encoder",
    "find_vit",
    "get_feature_tap",
    "masked_mse_loss",
    "patchify",
    "random_masking",
    "tap_paused",
    "unpatchify",
]
