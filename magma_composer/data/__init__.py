"""Data: MDS image data sets, transforms, ImageFolder -> MDS conversion and the demo data set."""

from magma_composer.data.convert import convert_image_folder
from magma_composer.data.dataset import StreamingImageDataset, decode_image
from magma_composer.data.checked_streaming import CheckedStreamingDataset, StreamingDataError
from magma_composer.data.storage import RemoteDataError, check_remote
from magma_composer.data.transforms import eval_transform, train_transform

__all__ = [
    "CheckedStreamingDataset",
    "RemoteDataError",
    "StreamingDataError",
    "StreamingImageDataset",
    "check_remote",
    "convert_image_folder",
    "decode_image",
    "eval_transform",
    "train_transform",
]
