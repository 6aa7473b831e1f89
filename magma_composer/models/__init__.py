"""Models: the Composer MAE and the feature taps that the algorithms read."""

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
from magma_composer.models.taps import FeatureTap, find_encoder, find_vit, get_feature_tap, tap_paused

__all__ = [
    "ComposerMAE",
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
