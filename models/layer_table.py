"""Per-layer output shape, receptive field, activation memory, parameters and MACs of a model, in the style
of the CS231n notes' VGG16 walk-through, worked out from each layer's hyperparameters without running the
model.

    python -m models.layer_table vgg16 --resolution 224
    python -m models.layer_table --receptive-field-comparison

Rows follow the model's evaluation graph (models.shapes): the input, every convolution (with the batch
norm after it folded in), every pool (global pools included), every fully connected layer, every residual
addition and every concatenation of inception branches. ReLU, LRN, dropout and flatten hold no
parameters and keep the values' count, so they get no row. Layers that only training runs (GoogLeNet's
auxiliary classifiers) are not in the table; a line after it counts their parameters.

MACs count the multiply-accumulates of convolutions and FC layers only, the convention of the GFLOPS
figures torchvision publishes. The other rows have 0 MACs because they multiply nothing: a residual
addition costs one addition per output value, a k x k pool k*k - 1 comparisons (max) or additions
(average, then a division) per output value, a concatenation a copy; batch norm folds into the weights
and bias of the convolution before it at inference.

The receptive field column is the side of the square of input pixels that one output position sees,
r_out = r_in + (K - 1) * dilation * j_in with jump j_out = j_in * stride (see models.shapes); where
paths meet it is the largest, and global pools and FC layers see their whole input map.

Row names: AlexNet, VGG and LeNet-5 rows carry Caffe's layer names (conv3_2, pool5, fc6); the other
models' rows carry their module paths, which are torchvision's parameter names (layer1.0.conv2), with
.add and .cat for the additions and concatenations inside a module.
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from models import build, names
from models.convnet import ConvNet
from models.shapes import ADDITIONS, CONCATENATIONS, FeatureMap, feature_maps, trace

BYTES_PER_ACTIVATION = 4  # float32
_POOLS = nn.MaxPool2d | nn.AvgPool2d | nn.AdaptiveAvgPool2d


@dataclass(frozen=True)
class LayerRow:
    name: str
    shape: tuple[int, int, int]  # output channels, height, width; FC layers are C x 1 x 1
    params: int  # weights + biases
    macs: int
    receptive_field: int  # side in input pixels

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
    # Parameters of layers the evaluation graph does not run (GoogLeNet's auxiliary classifiers).
    training_only_params: int

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
    graph = trace(model.eval())
    rows = _rows(graph, feature_maps(graph, resolution))
    if isinstance(model, ConvNet):
        rows = _caffe_names(model, rows)
    layers_run = {node.target for node in graph.graph.nodes if node.op == "call_module"}
    training_only_params = sum(
        parameter.numel()
        for parameter_name, parameter in model.named_parameters()
        if parameter_name.rpartition(".")[0] not in layers_run
    )
    return LayerTable(name, resolution, num_classes, rows, training_only_params)


def _rows(graph: fx.GraphModule, maps: dict[fx.Node, FeatureMap]) -> list[LayerRow]:
    rows: dict[fx.Node, LayerRow] = {}
    for node, output in maps.items():
        shape = (output.channels, output.side, output.side)
        if node.op == "placeholder":
            rows[node] = LayerRow("input", shape, params=0, macs=0, receptive_field=output.receptive_field)
        elif node.op == "call_module":
            layer = graph.get_submodule(node.target)
            if isinstance(layer, nn.BatchNorm2d):
                # Inference folds batch norm into the convolution before it, so its scale and shift
                # count as that row's parameters and add no MACs.
                conv = node.args[0]
                if conv.op != "call_module" or not isinstance(graph.get_submodule(conv.target), nn.Conv2d):
                    raise TypeError(f"batch norm {node.target} follows no convolution to fold into")
                rows[conv] = replace(rows[conv], params=rows[conv].params + _parameter_count(layer))
            elif isinstance(layer, nn.Conv2d | nn.Linear | _POOLS):
                rows[node] = LayerRow(
                    node.target,
                    shape,
                    params=_parameter_count(layer),
                    macs=_macs(layer, output),
                    receptive_field=output.receptive_field,
                )
        elif node.target in ADDITIONS or node.target in CONCATENATIONS:
            operation = "add" if node.target in ADDITIONS else "cat"
            scopes = list(node.meta.get("nn_module_stack", {}).values())
            name = f"{scopes[-1][0]}.{operation}" if scopes else operation
            rows[node] = LayerRow(name, shape, params=0, macs=0, receptive_field=output.receptive_field)
    return list(rows.values())


def _macs(layer: nn.Module, output: FeatureMap) -> int:
    if isinstance(layer, nn.Conv2d):
        kernel_height, kernel_width = layer.kernel_size
        macs_per_output = layer.in_channels // layer.groups * kernel_height * kernel_width
        return output.channels * output.side * output.side * macs_per_output
    if isinstance(layer, nn.Linear):
        return layer.in_features * layer.out_features
    return 0


def _caffe_names(model: ConvNet, rows: list[LayerRow]) -> list[LayerRow]:
    # Caffe's layer names, which the papers' released models use: VGG numbers convolutions within each
    # pooling block (conv3_2), AlexNet in order (conv3). Pools and FC layers continue the numbering.
    numbered_in_blocks = model.name.startswith("vgg")
    stage, convs_in_stage, after_pool = 0, 0, True
    named = [rows[0]]  # the input
    for row in rows[1:]:
        layer = model.get_submodule(row.name)
        if isinstance(layer, nn.Conv2d):
            if after_pool or not numbered_in_blocks:
                stage, convs_in_stage = stage + 1, 0
            convs_in_stage += 1
            after_pool = False
            name = f"conv{stage}_{convs_in_stage}" if numbered_in_blocks else f"conv{stage}"
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            name = "avgpool"
        elif isinstance(layer, nn.MaxPool2d | nn.AvgPool2d):
            after_pool = True
            name = f"pool{stage}"
        else:  # nn.Linear, the only other layer with a row in a ConvNet
            stage += 1
            name = f"fc{stage}"
        named.append(replace(row, name=name))
    return named


def _parameter_count(layer: nn.Module) -> int:
    return sum(parameter.numel() for parameter in layer.parameters())


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
            f"{table.model} at {table.resolution}x{table.resolution}, {table.num_classes} classes, float32",
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
        convs = _rows(graph, feature_maps(graph, resolution, channels))[1:]
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
