"""The input-size guarantee of every registry model: an input below the model's minimum side fails with a
ValueError that names the minimum, not with PyTorch's error from whichever layer runs out of pixels."""

from __future__ import annotations

import torch
from torch import nn

from models.shapes import min_input_side


class InputSizeChecked(nn.Module):
    """Base of the registry's models, listed before the nn.Module class that builds the layers (ours or
    torchvision's). A subclass calls check_input_size_from_now_on(name) once its layers exist.

    The check runs as a forward pre-hook, not as a line of forward: torch.fx, which traces forward for
    min_input_side and the layer table, cannot follow a Python comparison of the input's size. Calling
    model(images), as training and evaluation do, runs the hook; model.forward(images) skips it.
    """

    name: str
    min_resolution: int

    def check_input_size_from_now_on(self, name: str) -> None:
        self.name = name
        self.min_resolution = min_input_side(self)
        self.register_forward_pre_hook(_check_images)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ValueError when an image of height x width pixels is too small for the model."""
        if height < self.min_resolution or width < self.min_resolution:
            side = self.min_resolution
            raise ValueError(f"{self.name} needs inputs of at least {side}x{side} pixels, got {height}x{width}")


def _check_images(model: InputSizeChecked, inputs: tuple[torch.Tensor, ...]) -> None:
    (images,) = inputs
    model.check_input_size(images.shape[-2], images.shape[-1])
