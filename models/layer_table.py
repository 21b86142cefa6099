"""Per-layer output shape, activation memory, parameters and MACs of a model, in the style of the CS231n
notes' VGG16 walk-through, worked out from each layer's hyperparameters without running the model.

    python -m models.layer_table vgg16 --resolution 224

Rows are the input, every convolution (with the batch norm after it folded in), every pool and every
fully connected layer. ReLU, LRN and dropout keep the shape and hold no parameters, so they get no row.
MACs count the multiply-accumulates of convolutions and FC layers only, the convention of the GFLOPS
figures torchvision publishes; pools cost none.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from models import build, names
from models.convnet import ConvNet
from models.shapes import output_side

BYTES_PER_ACTIVATION = 4  # float32
_SHAPE_KEEPING_LAYERS = (nn.ReLU, nn.LocalResponseNorm, nn.Dropout)


@dataclass(frozen=True)
class LayerRow:
    name: str
    shape: tuple[int, int, int]  # output channels, height, width; FC layers are C x 1 x 1
    params: int  # weights + biases
    macs: int

    @property
    def activations(self) -> int:
        return math.prod(self.shape)

    @property
    def activation_bytes(self) -> int:
        return self.activations * BYTES_PER_ACTIVATION


@dataclass(frozen=True)
class LayerTable:
    model: str
    resolution: int
    num_classes: int
    rows: list[LayerRow]

    @property
    def total_activations(self) -> int:
        """Elements in the layer outputs of one image's forward pass; backward needs about as many again."""
        return sum(row.activations for row in self.rows)

    @property
    def total_activation_bytes(self) -> int:
        return self.total_activations * BYTES_PER_ACTIVATION

    @property
    def total_params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def total_macs(self) -> int:
        return sum(row.macs for row in self.rows)


def layer_table(
    name: str, resolution: int, *, num_classes: int = 1000, groups: int | None = None
) -> LayerTable:
    """The table of model `name` for square inputs of `resolution` pixels."""
    # The meta device gives the layers and parameter shapes without allocating or initialising weights.
    with torch.device("meta"):
        model = build(name, num_classes, groups=groups)
    model.check_input_size(resolution, resolution)
    return LayerTable(name, resolution, num_classes, _rows(model, resolution))


def _rows(model: ConvNet, resolution: int) -> list[LayerRow]:
    channels, side = 3, resolution
    rows = [LayerRow("input", (channels, side, side), params=0, macs=0)]
    # Caffe's layer names, which the papers' released models use: VGG numbers convolutions within each
    # pooling block (conv3_2), AlexNet in order (conv3). Pools and FC layers continue the numbering.
    numbered_in_blocks = model.name.startswith("vgg")
    stage, convs_in_stage, after_pool = 0, 0, True
    for layer in model.features:
        if isinstance(layer, nn.Conv2d):
            if after_pool or not numbered_in_blocks:
                stage, convs_in_stage = stage + 1, 0
            convs_in_stage += 1
            after_pool = False
            side = output_side(layer, side)
            channels = layer.out_channels
            kernel_height, kernel_width = layer.kernel_size
            macs_per_output = layer.in_channels // layer.groups * kernel_height * kernel_width
            rows.append(
                LayerRow(
                    f"conv{stage}_{convs_in_stage}" if numbered_in_blocks else f"conv{stage}",
                    (channels, side, side),
                    params=_parameter_count(layer),
                    macs=channels * side * side * macs_per_output,
                )
            )
        elif isinstance(layer, nn.BatchNorm2d):
            # Inference folds batch norm into the convolution before it, so its scale and shift count
            # as that row's parameters and add no MACs.
            rows[-1] = replace(rows[-1], params=rows[-1].params + _parameter_count(layer))
        elif isinstance(layer, nn.MaxPool2d):
            after_pool = True
            side = output_side(layer, side)
            rows.append(LayerRow(f"pool{stage}", (channels, side, side), params=0, macs=0))
        elif not isinstance(layer, _SHAPE_KEEPING_LAYERS):
            raise TypeError(f"the layer table cannot count a {type(layer).__name__}")

    pooled_height, pooled_width = model.avgpool.output_size
    rows.append(LayerRow("avgpool", (channels, pooled_height, pooled_width), params=0, macs=0))

    for layer in model.classifier:
        if isinstance(layer, nn.Linear):
            stage += 1
            rows.append(
                LayerRow(
                    f"fc{stage}",
                    (layer.out_features, 1, 1),
                    params=_parameter_count(layer),
                    macs=layer.in_features * layer.out_features,
                )
            )
        elif not isinstance(layer, _SHAPE_KEEPING_LAYERS):
            raise TypeError(f"the layer table cannot count a {type(layer).__name__}")
    return rows


def _parameter_count(layer: nn.Module) -> int:
    return sum(parameter.numel() for parameter in layer.parameters())


def format_table(table: LayerTable) -> str:
    """The table as aligned text, one line per layer, then the totals."""
    header = ("layer", "output CxHxW", "activations", "memory", "params", "MACs")
    lines = [
        (
            row.name,
            "x".join(map(str, row.shape)),
            f"{row.activations:,}",
            _format_bytes(row.activation_bytes),
            f"{row.params:,}",
            f"{row.macs:,}",
        )
        for row in table.rows
    ]
    totals = (
        "total",
        "",
        f"{table.total_activations:,}",
        _format_bytes(table.total_activation_bytes),
        f"{table.total_params:,}",
        f"{table.total_macs:,}",
    )
    widths = [max(len(line[column]) for line in (header, *lines, totals)) for column in range(len(header))]

    def align(cells: tuple[str, ...]) -> str:
        # Names and shapes read left to right, numbers line up on their last digit.
        return "  ".join(
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(
        [
            f"{table.model} at {table.resolution}x{table.resolution}, {table.num_classes} classes, float32",
            align(header),
            *map(align, lines),
            align(totals),
            f"forward activations per image: {table.total_activations:,} "
            f"({_format_bytes(table.total_activation_bytes)}; about twice that with the backward pass)",
            f"parameters: {table.total_params:,}",
            f"MACs per image: {table.total_macs / 1e9:.2f} G",
        ]
    )


def _format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="layer-table",
        description="Per-layer output shape, activation memory, parameters and MACs of a model.",
    )
    parser.add_argument("model", choices=names())
    parser.add_argument(
        "--resolution", type=int, default=224, help="side of the square input in pixels (default 224)"
    )
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--groups", type=int, help="alexnet2012 only: 2 for the paper's two-GPU split")
    args = parser.parse_args(argv)
    try:
        table = layer_table(args.model, args.resolution, num_classes=args.num_classes, groups=args.groups)
    except ValueError as error:
        parser.error(str(error))
    print(format_table(table))


if __name__ == "__main__":
    main()
