"""Per-layer output shape, receptive field, activation memory, parameters and MACs of a model, in the style
of the CS231n notes' VGG16 walk-through, worked out from each layer's hyperparameters without running the
model.
The layer-table command (pipeline/reports/layer_table.py) prints it.

Rows follow the model's evaluation graph (models.shapes): the input, every convolution (with the batch
norm after it folded in), every local response normalisation (AlexNet's norm1 and norm2, rows of the
tables the papers and course notes give), every pool (global pools included), every fully connected
layer, every residual addition and every concatenation of inception branches. ReLU, dropout and flatten
hold no parameters and keep the values' count, so they get no row. Parameter counts are weights plus
biases (plus batch norm's scale and shift, folded into the convolution's row). Layers that only training runs (GoogLeNet's
auxiliary classifiers) are not in the table; a line after it counts their parameters.

MACs count the multiply-accumulates of convolutions and FC layers only, the convention of the GFLOPS
figures torchvision publishes. The other rows have 0 MACs: a local response normalisation costs a few multiplications per
output value (a sum of 5 squares, a power, a division) but no multiply-accumulate of weights; a residual
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

import math
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from models import build
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
    rows = rows_of(graph, feature_maps(graph, resolution))
    if isinstance(model, ConvNet):
        rows = _caffe_names(model, rows)
    layers_run = {node.target for node in graph.graph.nodes if node.op == "call_module"}
    training_only_params = sum(
        parameter.numel()
        for parameter_name, parameter in model.named_parameters()
        if parameter_name.rpartition(".")[0] not in layers_run
    )
    return LayerTable(name, resolution, num_classes, rows, training_only_params)


def rows_of(graph: fx.GraphModule, maps: dict[fx.Node, FeatureMap]) -> list[LayerRow]:
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
            elif isinstance(layer, nn.Conv2d | nn.Linear | nn.LocalResponseNorm | _POOLS):
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
        elif isinstance(layer, nn.LocalResponseNorm):
            name = f"norm{stage}"  # Caffe's norm1 and norm2 follow conv1 and conv2
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
