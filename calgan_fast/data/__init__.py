"""Data: MATLAB-compatible bicubic resizing, image I/O, folder datasets, sample images."""

from .datasets import (
    HRFolderDataset,
    PairedFolderDataset,
    TrainSampler,
    augment,
    img2tensor,
    tensor2img,
)
from .imresize import imresize, resize_weights
from .io import IMAGE_EXTENSIONS, ImageError, image_size, list_images, read_image, write_image
from .samples import SAMPLE_NAMES, sample_images

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_NAMES",
    "HRFolderDataset",
    "ImageError",
    "PairedFolderDataset",
    "TrainSampler",
    "augment",
    "image_size",
    "img2tensor",
    "imresize",
    "list_images",
    "read_image",
    "resize_weights",
    "sample_images",
    "tensor2img",
    "write_image",
]
