"""The validation transform for one image file, as the pipeline applies it to the .beton's images:
stored by the preprocess stage's rules (pipeline/data/images.load_rgb: converted to RGB, resized by
max_resolution and short_side), then FFCV's centre crop (the central square of crop_ratio times the
short side, ffcv.fields.rgb_image.get_center_crop, resized to resolution with OpenCV's INTER_AREA as
FFCV's resize_crop does) and ImageNet normalisation. The same numbers travel with a logged MLflow model
as its metadata, so predictions need nothing but the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.config import VAL_CROP_RATIO
from pipeline.data.images import UnusableImage, load_rgb

# ImageNet statistics on the 0..255 scale the decoders produce; the loaders' pipelines use them too.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255

@dataclass(frozen=True)
class ValTransform:
    resolution: int
    max_resolution: int
    short_side: int | None
    crop_ratio: float = VAL_CROP_RATIO

    @classmethod
    def for_data(cls, preprocess: dict, resolution: int) -> ValTransform:
        """From the preprocess settings a dataset.json records and the model's input side."""
        return cls(resolution, preprocess["max_resolution"], preprocess.get("short_side"))

    def metadata(self) -> dict:
        return asdict(self)

    def __call__(self, path: Path) -> torch.Tensor:
        """(3, resolution, resolution) float32; raises UnusableImage for a file that is not an image."""
        pixels, _ = load_rgb(path, self.max_resolution, self.short_side)
        height, width = pixels.shape[:2]
        # At least one pixel: an image of a side or two (a 1x1 icon) is enlarged like any other.
        side = max(1, int(self.crop_ratio * min(height, width)))
        top, left = (height - side) // 2, (width - side) // 2
        crop = cv2.resize(pixels[top : top + side, left : left + side], (self.resolution, self.resolution),
                          interpolation=cv2.INTER_AREA)
        normalised = (crop.astype(np.float32) - IMAGENET_MEAN.astype(np.float32)) / IMAGENET_STD.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


__all__ = ["UnusableImage", "ValTransform"]
