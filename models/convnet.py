"""The layout every model here shares: convolutional features, adaptive average pool, classifier."""

from __future__ import annotations

import torch
from torch import nn

from models.shapes import min_input_side


class ConvNet(nn.Module):
    """torchvision's AlexNet/VGG layout and parameter names (features.N, avgpool, classifier.N), so
    torchvision's state dicts load, plus a readable error for inputs too small for the features."""

    def __init__(
        self, name: str, features: nn.Sequential, pooled_side: int, classifier: nn.Sequential
    ) -> None:
        super().__init__()
        self.name = name
        self.features = features
        # Brings any feature map to the size the classifier was built for, so every input side from
        # min_resolution up works; at the papers' input sizes it changes nothing.
        self.avgpool = nn.AdaptiveAvgPool2d((pooled_side, pooled_side))
        self.classifier = classifier
        self.min_resolution = min_input_side(features)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ValueError when an image of height x width pixels is too small for the features."""
        if height < self.min_resolution or width < self.min_resolution:
            side = self.min_resolution
            raise ValueError(
                f"{self.name} needs inputs of at least {side}x{side} pixels, got {height}x{width}"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Checked up front: deep in the features PyTorch's own error names a layer, not the input size.
        self.check_input_size(images.shape[-2], images.shape[-1])
        pooled = self.avgpool(self.features(images))
        return self.classifier(torch.flatten(pooled, 1))
