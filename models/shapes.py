"""Output shape and receptive field of every node of a model's forward graph, worked out from the
layers' hyperparameters without running a layer.

The graph is the model's forward as torch.fx traces it: leaf layers (convolutions, pools, batch norm,
ReLU, fully connected layers, ...) and the tensor functions between them (residual additions,
concatenations of inception branches, flatten).

Output sides follow floor((W - K + 2P) / S) + 1, where a dilated kernel reaches D(K - 1) + 1 pixels. Pools
in ceil mode (GoogLeNet's) round up instead, but, as PyTorch does, drop a last window that would start
in the right padding.

Receptive fields follow Araujo, Norris & Sim, "Computing receptive fields of convolutional neural
networks" (Distill, 2019). From r = j = 1 at the input, a layer with kernel K, stride S and dilation D
gives
    r_out = r_in + (K - 1) * D * j_in,    j_out = j_in * S,
where r is the side of the square of input pixels that one output position sees and j is the distance
in input pixels between neighbouring output positions. r counts the padding's positions too, so it may
exceed the input side; such a position sees the whole image. Where paths meet (residual additions, concatenated
inception branches) the largest receptive field is taken. A global pool or a fully connected layer
sees its whole input map, whose receptive field is the map's span, r + (side - 1) * j.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import count

import torch
import torch.nn.functional as F
from torch import fx, nn

RGB = 3

ADDITIONS = (operator.add, torch.add)
CONCATENATIONS = (torch.cat,)
# Layers and functions that keep their input's shape and the positions it sees.
_SHAPE_KEEPING_LAYERS = (nn.BatchNorm2d, nn.ReLU, nn.Tanh, nn.Dropout, nn.LocalResponseNorm)
_SHAPE_KEEPING_FUNCTIONS = (F.relu, torch.relu)


@dataclass(frozen=True)
class FeatureMap:
    """One graph node's output for one square image: `channels` maps of side x side pixels (a flat
    vector of `channels` values has side 1), and how much of the input its positions see."""

    channels: int
    side: int
    receptive_field: int
    # Input pixels between neighbouring positions. None once positions no longer lie on a regular grid:
    # after flatten or an adaptive pool whose windows start at uneven steps.
    jump: int | None
    # Side of the square of input pixels that all positions together see.
    span: int


class InputTooSmall(ValueError):
    """A layer has no output pixel left for the input side it is given."""


def trace(model: nn.Module) -> fx.GraphModule:
    """The forward graph of `model` in its current mode: training graphs include training-only layers
    such as GoogLeNet's auxiliary classifiers, evaluation graphs do not."""
    return fx.symbolic_trace(model)


def feature_maps(graph: fx.GraphModule, side: int, channels: int = RGB) -> dict[fx.Node, FeatureMap]:
    """The output of every tensor-valued node of `graph` for a `channels` x side x side input, in
    execution order.

    Raises InputTooSmall when a layer has no output pixel left, and TypeError for a layer or function
    these rules do not cover.
    """
    maps: dict[fx.Node, FeatureMap] = {}
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            maps[node] = FeatureMap(channels, side, receptive_field=1, jump=1, span=side)
        elif node.op == "call_module":
            maps[node] = _through_layer(graph.get_submodule(node.target), maps[node.args[0]])
        elif node.op == "call_function":
            if not _builds_a_tuple(node):
                maps[node] = _through_function(node, maps)
        elif node.op != "output":
            raise TypeError(f"cannot follow the {node.op} node {node.name} through the graph")
    return maps


def min_input_side(model: nn.Module) -> int:
    """Smallest square input side for which every convolution and pool of `model` keeps an output pixel.

    PyTorch rejects exactly the layer inputs that leave an output side below 1 (for a convolution: a
    padded side smaller than the kernel). Output sides only grow with the input side, so the first
    side that survives every layer is the minimum.
    """
    graph = trace(model)

    def survives(side: int) -> bool:
        try:
            feature_maps(graph, side)
        except InputTooSmall:
            return False
        return True

    return next(side for side in count(1) if survives(side))


def _builds_a_tuple(node: fx.Node) -> bool:
    # GoogLeNet's training outputs (a namedtuple of three logits) become a node that holds no tensor.
    return isinstance(node.target, type) and issubclass(node.target, tuple)


def _through_layer(layer: nn.Module, given: FeatureMap) -> FeatureMap:
    if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
        kernel, stride, padding, dilation = (
            _square(value) for value in (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        )
        if isinstance(layer, nn.Conv2d):
            return _slide(given, layer.out_channels, kernel, stride, padding, dilation, ceil_mode=False)
        return _slide(given, given.channels, kernel, stride, padding, dilation, ceil_mode=layer.ceil_mode)
    if isinstance(layer, nn.AvgPool2d):
        kernel, stride, padding = (_square(value) for value in (layer.kernel_size, layer.stride, layer.padding))
        return _slide(given, given.channels, kernel, stride, padding, dilation=1, ceil_mode=layer.ceil_mode)
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return _adaptive_pool(given, _square(layer.output_size))
    if isinstance(layer, nn.Linear):
        return FeatureMap(layer.out_features, 1, receptive_field=given.span, jump=None, span=given.span)
    if isinstance(layer, _SHAPE_KEEPING_LAYERS):
        return given
    raise TypeError(f"cannot follow a {type(layer).__name__} layer through the graph")


def _through_function(node: fx.Node, maps: dict[fx.Node, FeatureMap]) -> FeatureMap:
    if node.target in _SHAPE_KEEPING_FUNCTIONS:
        return maps[node.args[0]]
    if node.target is torch.flatten:
        given = maps[node.args[0]]
        return FeatureMap(
            given.channels * given.side * given.side, 1, given.receptive_field, jump=None, span=given.span
        )
    if node.target is F.adaptive_avg_pool2d:
        return _adaptive_pool(maps[node.args[0]], _square(node.args[1]))
    if node.target in ADDITIONS:
        first, second = (maps[arg] for arg in node.args)
        return _merge([first, second], channels=first.channels)
    if node.target in CONCATENATIONS:
        parts = [maps[part] for part in node.args[0]]
        return _merge(parts, channels=sum(part.channels for part in parts))
    raise TypeError(f"cannot follow {node.target} through the graph")


def _slide(
    given: FeatureMap,
    channels: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    *,
    ceil_mode: bool,
) -> FeatureMap:
    """A kernel slid over `given`: a convolution or a pool."""
    reach = dilation * (kernel - 1) + 1  # the kernel's footprint; equals K when not dilated
    padded = given.side + 2 * padding
    if ceil_mode:
        side = -(-(padded - reach) // stride) + 1
        if (side - 1) * stride >= given.side + padding:
            side -= 1
    else:
        side = (padded - reach) // stride + 1
    if side < 1:
        raise InputTooSmall(f"a {kernel}x{kernel}/{stride} layer gets {given.side}x{given.side} pixels")
    if given.jump is None:
        # Off a regular grid only a 1x1 kernel at stride 1 has a receptive field: its input position's.
        if (kernel, stride) != (1, 1):
            raise TypeError(f"a {kernel}x{kernel}/{stride} kernel slides over positions off a regular grid")
        return replace(given, channels=channels, side=side)
    receptive_field = given.receptive_field + (kernel - 1) * dilation * given.jump
    jump = given.jump * stride
    return FeatureMap(channels, side, receptive_field, jump, span=receptive_field + (side - 1) * jump)


def _adaptive_pool(given: FeatureMap, side: int) -> FeatureMap:
    if given.side % side == 0:
        window = given.side // side
        return _slide(given, given.channels, window, window, padding=0, dilation=1, ceil_mode=False)
    # PyTorch's window i covers input positions floor(i * n / side) up to ceil((i + 1) * n / side): uneven
    # steps, so no regular grid remains. The widest window sets the receptive field.
    widest = max(-(-(i + 1) * given.side // side) - i * given.side // side for i in range(side))
    widened = _slide(given, given.channels, widest, 1, padding=0, dilation=1, ceil_mode=False)
    return FeatureMap(given.channels, side, widened.receptive_field, jump=None, span=given.span)


def _merge(parts: Sequence[FeatureMap], channels: int) -> FeatureMap:
    """Paths meeting in an addition or a concatenation along channels."""
    grids = {(part.side, part.jump) for part in parts}
    if len(grids) != 1:
        raise TypeError(f"cannot merge maps on different grids (side, jump): {sorted(grids, key=str)}")
    [(side, jump)] = grids
    return FeatureMap(
        channels,
        side,
        receptive_field=max(part.receptive_field for part in parts),
        jump=jump,
        span=max(part.span for part in parts),
    )


def _square(value: int | Sequence[int]) -> int:
    # Layers store (height, width) pairs or the int they were given; every kernel, stride, padding and
    # pooled size in these models is square, so one side describes both.
    if isinstance(value, int):
        return value
    height, width = value
    if height != width:
        raise TypeError(f"only square kernels, strides, paddings and pooled sizes are covered, got {value}")
    return height
