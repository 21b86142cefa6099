"""The layout of the AlexNet, VGG and LeNet-5 models: convolutional features, adaptive average pool,
classifier."""

from __future__ import annotations

import torch
from torch import nn

from models.input_size import InputSizeChecked


class ConvNet(InputSizeChecked):
    """torchvision's AlexNet/VGG layout and parameter names (features.N, avgpool, classifier.N), so
    torchvision's state dicts load, plus a readable error for inputs too small for the features."""

    def __init__(
        self, name: str, features: nn.Sequential, pooled_side: int, classifier: nn.Sequential
    ) -> None:
        super().__init__()
        self.features = features
        # Brings any feature map to the size the classifier was built for, so every input side from
        # min_resolution up works; at the papers' input sizes it changes nothing.
        self.avgpool = nn.AdaptiveAvgPool2d((pooled_side, pooled_side))
        self.classifier = classifier
        self.check_input_size_from_now_on(name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.avgpool(self.features(images))
        return self.classifier(torch.flatten(pooled, 1))
