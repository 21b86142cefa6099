"""Output sizes of convolutions and pools, floor((W - K + 2P) / S) + 1, computed without running a layer."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import count

from torch import nn

SpatialLayer = nn.Conv2d | nn.MaxPool2d


def _side(value: int | tuple[int, ...]) -> int:
    # Conv2d stores (height, width) pairs while MaxPool2d keeps the int it was given; every kernel,
    # stride and padding in these models is square, so one side describes both.
    return value[0] if isinstance(value, tuple) else value


def output_side(layer: SpatialLayer, side: int) -> int:
    """Side of the square output of `layer` for a square input of `side` pixels."""
    kernel, stride, padding, dilation = (
        _side(value) for value in (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    )
    reach = dilation * (kernel - 1) + 1  # the kernel's footprint; equals K when not dilated
    return (side - reach + 2 * padding) // stride + 1


def min_input_side(layers: Iterable[nn.Module]) -> int:
    """Smallest square input side for which every convolution and pool in `layers` keeps an output pixel.

    PyTorch rejects an input whose padded size is smaller than a kernel, which is exactly an output
    side below 1. Output sides only grow with the input side, so the first side that survives every
    layer is the minimum.
    """
    spatial_layers = [layer for layer in layers if isinstance(layer, SpatialLayer)]

    def survives(side: int) -> bool:
        for layer in spatial_layers:
            side = output_side(layer, side)
            if side < 1:
                return False
        return True

    return next(side for side in count(1) if survives(side))
