"""The layer-table command: the table of models/layers.py printed, and the receptive-field comparison.

    layer-table vgg16 --resolution 224
    layer-table --receptive-field-comparison
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from models import names
from models.layers import LayerTable, layer_table, rows_of
from models.shapes import feature_maps, trace


def format_table(table: LayerTable) -> str:
    """The table as aligned text, one line per layer, then the totals."""
    header = ("layer", "output CxHxW", "receptive field", "activations", "memory", "params", "MACs")
    lines = [
        (
            row.name,
            "x".join(map(str, row.shape)),
            str(row.receptive_field),
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
        "",
        f"{table.total_activations:,}",
        _format_bytes(table.total_activation_bytes),
        f"{table.total_params:,}",
        f"{table.total_macs:,}",
    )
    footer = [
        f"forward activations per image: {table.total_activations:,} "
        f"({_format_bytes(table.total_activation_bytes)}; about twice that with the backward pass)",
        f"parameters: {table.total_params:,}",
        f"MACs per image: {table.total_macs / 1e9:.2f} G",
    ]
    if table.training_only_params:
        footer.append(f"not in the table: {table.training_only_params:,} parameters of training-only layers")
    return "\n".join(
        [
            f"{table.model} at {table.resolution}x{table.resolution}, {table.num_classes} classes, float32; "
            "params count weights and biases (batch norm's in its convolution's row), "
            "MACs those of convolutions and FC layers",
            *_aligned([header, *lines, totals], text_columns=2),
            *footer,
        ]
    )


def receptive_field_comparison(channels: int = 64, resolution: int = 56) -> str:
    """VGG's case for small kernels (Simonyan & Zisserman 2014, section 2.3), worked out by the code
    that builds the layer tables: a stack of three 3x3 convolutions sees a 7x7 square of its input, as
    one 7x7 convolution does, with 3 x 3^2 C^2 = 27 C^2 weights instead of 7^2 C^2 = 49 C^2 for C
    channels in and out and no bias, and with three ReLUs instead of one."""

    def stack(kernel: int, depth: int) -> nn.Sequential:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for index in range(1, depth + 1):
            layers[f"conv{index}"] = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False)
            layers[f"relu{index}"] = nn.ReLU(inplace=True)
        return nn.Sequential(layers)

    with torch.device("meta"):
        stacks = {"three 3x3 convolutions": stack(3, depth=3), "one 7x7 convolution": stack(7, depth=1)}
    header = ("stack", "layer", "receptive field", "weights", "weights / C^2")
    lines, summaries = [], []
    for title, layers in stacks.items():
        graph = trace(layers)
        convs = rows_of(graph, feature_maps(graph, resolution, channels))[1:]
        lines += [
            (title, row.name, str(row.receptive_field), f"{row.params:,}", f"{row.params / channels**2:g}")
            for row in convs
        ]
        weights = sum(row.params for row in convs)
        summaries.append((title, convs[-1].receptive_field, weights))
    (small, small_field, small_weights), (large, large_field, large_weights) = summaries
    return "\n".join(
        [
            f"Receptive field comparison for C = {channels} channels in and out, no bias, "
            f"{resolution}x{resolution} input:",
            *_aligned([header, *lines], text_columns=2),
            *(
                f"{title}: receptive field {field}, {weights:,} weights = {weights / channels**2:g} C^2"
                for title, field, weights in summaries
            ),
            f"{large} needs {large_weights / small_weights - 1:.0%} more weights than {small}"
            + (" for the same receptive field" if large_field == small_field else ""),
        ]
    )


def _aligned(table: list[tuple[str, ...]], text_columns: int) -> list[str]:
    # The first text_columns read left to right, numbers line up on their last digit.
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    return [
        "  ".join(
            cell.ljust(width) if column < text_columns else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )
        for cells in table
    ]


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
        description="Per-layer output shape, receptive field, activation memory, parameters and MACs of a model.",
    )
    parser.add_argument("model", nargs="?", choices=names())
    parser.add_argument(
        "--resolution", type=int, default=224, help="side of the square input in pixels (default 224)"
    )
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--groups", type=int, help="alexnet2012 only: 2 for the paper's two-GPU split")
    parser.add_argument(
        "--receptive-field-comparison",
        action="store_true",
        help="print VGG's comparison of three stacked 3x3 convolutions with one 7x7",
    )
    args = parser.parse_args(argv)
    if args.model is None and not args.receptive_field_comparison:
        parser.error("name a model, or give --receptive-field-comparison")
    if args.receptive_field_comparison:
        print(receptive_field_comparison())
    if args.model is not None:
        try:
            table = layer_table(args.model, args.resolution, num_classes=args.num_classes, groups=args.groups)
        except ValueError as error:
            parser.error(str(error))
        print(format_table(table))


if __name__ == "__main__":
    main()
