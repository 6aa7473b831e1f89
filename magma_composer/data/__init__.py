"""Data: MDS image data sets, transforms, ImageFolder -> MDS conversion and the demo data set."""

from magma_composer.data.dataset import StreamingImageDataset, decode_image
from magma_composer.data.transforms import eval_transform, train_transform

__all__ = ["StreamingImageDataset", "decode_image", "eval_transform", "train_transform"]
