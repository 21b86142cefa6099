"""models/: parameter counts, torchvision compatibility, input-size limits, the registry's recipe API and
the layer table."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import fx, nn

import models
from models.layer_table import LayerTable, layer_table, main, receptive_field_comparison
from models.shapes import feature_maps, trace

# torchvision's published counts (each model's ImageNet weights list them: e.g.
# torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["num_params"]); alexnet2012 summed by hand from
# the paper's layer sizes.
PARAMETERS_AT_1000_CLASSES = {
    "alexnet2012": 62_378_344,
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
}
# Half the weights of conv2, conv4 and conv5 go: 307,200 + 663,552 + 442,368 fewer.
GROUPED_ALEXNET2012_PARAMETERS = 60_965_224
TORCHVISION_NAMES = sorted(set(PARAMETERS_AT_1000_CLASSES) - {"alexnet2012"})

# By hand, backwards from one output pixel of the last pool with floor((W - K + 2P) / S) + 1:
# AlexNet's 3/2 pools need 3 -> 7 -> 15 pixels at conv1's output (the 3x3 and 5x5 convolutions are
# padded to keep their size), and conv1 gives 15 from 67 (11x11/4, no padding) or 63 (padding 2).
# VGG's five 2x2/2 pools need 2**5 = 32.
MIN_RESOLUTIONS = {"alexnet2012": 67, "alexnet": 63} | {
    name: 32 for name in PARAMETERS_AT_1000_CLASSES if name.startswith("vgg")
}

# torchvision's published GFLOPs at 224 (its weights' meta["_ops"]), counted as MACs; batch norm folds
# into the convolutions and adds none.
GIGA_MACS_AT_224 = {"alexnet": 0.714, "vgg11": 7.609, "vgg13": 11.308, "vgg16": 15.470, "vgg19": 19.632}

RECIPE_KEYS = {"alexnet2012": ("dropout", "alexnet_groups", "alexnet_init")} | {
    name: ("dropout",) for name in TORCHVISION_NAMES
}
# A value for each recipe key other than the architectures' defaults.
RECIPE_VALUES = {"dropout": 0.1, "alexnet_groups": 2, "alexnet_init": "kaiming"}

# One model per builder, built for real and shared by the tests that run small inputs through it.
FAMILIES = ["alexnet2012", "alexnet", "vgg11"]
SMALL_NUM_CLASSES = 7
SMALL_DROPOUT = 0.25


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def dropouts_by_module(model: nn.Module) -> dict[str, float]:
    return {name: module.p for name, module in model.named_modules() if isinstance(module, nn.Dropout)}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest) -> models.InputSizeChecked:
    return models.build(request.param, SMALL_NUM_CLASSES, dropout=SMALL_DROPOUT).eval()


# --- registry -----------------------------------------------------------------------------------


def test_names_are_sorted_and_complete() -> None:
    assert models.names() == sorted(PARAMETERS_AT_1000_CLASSES)


@pytest.mark.parametrize(
    "lookup",
    [
        lambda: models.build("resnet50", 10),
        lambda: models.min_resolution("resnet50"),
        lambda: models.recipe_keys("resnet50"),
    ],
    ids=["build", "min_resolution", "recipe_keys"],
)
def test_unknown_name_lists_the_known_names(lookup: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet50'") as error:
        lookup()
    for name in PARAMETERS_AT_1000_CLASSES:
        assert name in str(error.value)


def test_groups_apply_to_alexnet2012_only() -> None:
    with pytest.raises(ValueError, match="alexnet2012"):
        models.build("vgg11", 10, groups=2)
    with pytest.raises(ValueError, match="got 3"):
        models.build("alexnet2012", 10, groups=3)


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        models.build("alexnet", 0)


def test_recipe_keys() -> None:
    assert {name: models.recipe_keys(name) for name in models.names()} == RECIPE_KEYS


@pytest.mark.parametrize("name", sorted(PARAMETERS_AT_1000_CLASSES))
def test_build_takes_exactly_the_options_of_the_recipe_keys(name: str) -> None:
    used = models.recipe_keys(name)
    with torch.device("meta"):
        models.build(name, 10, **{models.RECIPE_OPTIONS[key]: RECIPE_VALUES[key] for key in used})
    for key in sorted(set(RECIPE_VALUES) - set(used)):
        option, value = models.RECIPE_OPTIONS[key], RECIPE_VALUES[key]
        message = rf"^{option}={value!r} applies only to .*; {name} has no such option"
        with pytest.raises(ValueError, match=message):
            models.build(name, 10, **{option: value})


def test_unset_dropout_is_the_architectures_own() -> None:
    with torch.device("meta"):
        vgg = models.build("vgg11", 10)
    assert list(dropouts_by_module(vgg).values()) == [0.5, 0.5]


# --- parameter counts and initialisation -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARAMETERS_AT_1000_CLASSES))
def test_parameter_count(name: str) -> None:
    # Counting needs no values: on the meta device VGG's 138M weights are neither allocated nor drawn.
    # family_model builds every builder's models for real.
    with torch.device("meta"):
        model = models.build(name, 1000)
    assert parameter_count(model) == PARAMETERS_AT_1000_CLASSES[name]


def test_grouped_alexnet2012_splits_conv2_conv4_conv5() -> None:
    model = models.build("alexnet2012", 1000, groups=2)
    assert [layer.groups for layer in model.features if isinstance(layer, nn.Conv2d)] == [1, 2, 1, 2, 2]
    assert parameter_count(model) == GROUPED_ALEXNET2012_PARAMETERS


def test_alexnet2012_has_the_papers_initialisation() -> None:
    model = models.build("alexnet2012", 1000)
    convs = [layer for layer in model.features if isinstance(layer, nn.Conv2d)]
    fcs = [layer for layer in model.classifier if isinstance(layer, nn.Linear)]
    assert len(convs) == 5 and len(fcs) == 3
    for layer, bias in zip(convs + fcs, [0, 1, 0, 1, 1, 1, 1, 0], strict=True):
        assert torch.all(layer.bias == bias)
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert abs(layer.weight.mean().item()) < 1e-3


def test_alexnet2012_kaiming_initialisation() -> None:
    model = models.build("alexnet2012", 10, init="kaiming")
    conv2 = [layer for layer in model.features if isinstance(layer, nn.Conv2d)][1]
    fan_out = conv2.out_channels * 5 * 5 // conv2.groups
    assert conv2.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert torch.all(conv2.bias == 0)
    with pytest.raises(ValueError, match="init must be one of paper, kaiming"):
        models.build("alexnet2012", 10, init="xavier")
    with pytest.raises(ValueError, match="init='kaiming' applies only to alexnet2012"):
        models.build("vgg11", 10, init="kaiming")


def test_alexnet2012_lrn_is_the_papers_formula() -> None:
    # b = a / (k + alpha * sum of a^2 over n=5 adjacent maps)^beta with the paper's k=2, alpha=1e-4, beta=0.75.
    lrn = next(layer for layer in models.build("alexnet2012", 10).features if isinstance(layer, nn.LocalResponseNorm))
    activations = torch.rand(1, 7, 2, 2) * 50
    squares = torch.nn.functional.pad(activations**2, (0, 0, 0, 0, 2, 2))
    window_sums = sum(squares[:, i : i + 7] for i in range(5))
    expected = activations / (2 + 1e-4 * window_sums) ** 0.75
    assert torch.allclose(lrn(activations), expected, rtol=1e-5)


# --- torchvision compatibility -----------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    # Non-default running statistics, so the outputs also show the batch-norm buffers carried over.
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    # On the meta device ours holds no values of its own: every tensor it computes with comes from the
    # reference's state dict (assign=True). family_model builds one model of each builder for real.
    with torch.device("meta"):
        ours = models.build(name, 1000)
    assert type(ours) is not type(reference)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    ours.eval()
    side = MIN_RESOLUTIONS[name]  # the smallest valid input keeps VGG cheap
    images = torch.randn(1, 3, side, side)
    with torch.no_grad():
        assert torch.allclose(ours(images), reference(images))


# --- input size ---------------------------------------------------------------------------------


def test_min_resolution_matches_the_hand_calculation() -> None:
    assert {name: models.min_resolution(name) for name in models.names()} == MIN_RESOLUTIONS


def test_minimum_input_works_and_honours_num_classes(family_model: models.ConvNet) -> None:
    side = MIN_RESOLUTIONS[family_model.name]
    with torch.no_grad():
        assert family_model(torch.randn(2, 3, side, side)).shape == (2, SMALL_NUM_CLASSES)


def test_below_minimum_raises_naming_the_minimum(family_model: models.ConvNet) -> None:
    side = MIN_RESOLUTIONS[family_model.name]
    message = f"{family_model.name} needs inputs of at least {side}x{side} pixels, got {side - 1}x{side - 1}"
    with pytest.raises(ValueError, match=message):
        family_model(torch.randn(1, 3, side - 1, side - 1))
    with pytest.raises(ValueError, match=f"got {side}x{side - 1}"):
        family_model(torch.randn(1, 3, side, side - 1))


def test_minimum_is_where_the_layers_themselves_fail(family_model: models.InputSizeChecked) -> None:
    side = MIN_RESOLUTIONS[family_model.name]
    # forward itself, without the pre-hook that checks the input size.
    with torch.no_grad(), pytest.raises(RuntimeError):
        family_model.forward(torch.randn(1, 3, side - 1, side - 1))


def test_dropout_is_honoured(family_model: models.ConvNet) -> None:
    dropouts = [module.p for module in family_model.modules() if isinstance(module, nn.Dropout)]
    assert dropouts == [SMALL_DROPOUT, SMALL_DROPOUT]


# --- layer table ----------------------------------------------------------------------------------


def rows_by_name(table: LayerTable) -> dict[str, tuple[tuple[int, int, int], int, int, int]]:
    return {row.name: (row.shape, row.activations, row.params, row.macs) for row in table.rows}


def receptive_fields(table: LayerTable) -> dict[str, int]:
    return {row.name: row.receptive_field for row in table.rows}


def test_vgg16_layer_table_matches_cs231n() -> None:
    table = layer_table("vgg16", 224)
    rows = rows_by_name(table)
    # (shape, activations, weights + biases, MACs); CS231n lists weights only (1,728, 36,864, ...).
    assert rows["input"] == ((3, 224, 224), 150_528, 0, 0)
    assert rows["conv1_1"] == ((64, 224, 224), 3_211_264, 1_792, 86_704_128)
    assert rows["conv1_2"] == ((64, 224, 224), 3_211_264, 36_928, 1_849_688_064)
    assert rows["pool1"] == ((64, 112, 112), 802_816, 0, 0)
    assert rows["conv3_3"] == ((256, 56, 56), 802_816, 590_080, 1_849_688_064)
    assert rows["conv5_3"] == ((512, 14, 14), 100_352, 2_359_808, 462_422_016)
    assert rows["pool5"] == ((512, 7, 7), 25_088, 0, 0)
    assert rows["fc6"] == ((4096, 1, 1), 4_096, 102_764_544, 102_760_448)
    assert rows["fc7"] == ((4096, 1, 1), 4_096, 16_781_312, 16_777_216)
    assert rows["fc8"] == ((1000, 1, 1), 1_000, 4_097_000, 4_096_000)
    assert table.rows[1].activation_bytes == 12_845_056
    assert table.total_params == 138_357_544
    # CS231n's rows (input to fc8) sum to 15.24M activations; the avgpool output adds 25,088.
    assert table.total_activations == 15_237_608 + 25_088
    assert round(table.total_macs / 1e9, 2) == 15.47


def test_alexnet2012_layer_table_matches_the_paper() -> None:
    shapes = {row.name: row.shape for row in layer_table("alexnet2012", 227).rows}
    assert shapes == {
        "input": (3, 227, 227),
        "conv1": (96, 55, 55),
        "pool1": (96, 27, 27),
        "conv2": (256, 27, 27),
        "pool2": (256, 13, 13),
        "conv3": (384, 13, 13),
        "conv4": (384, 13, 13),
        "conv5": (256, 13, 13),
        "pool5": (256, 6, 6),
        "avgpool": (256, 6, 6),
        "fc6": (4096, 1, 1),
        "fc7": (4096, 1, 1),
        "fc8": (1000, 1, 1),
    }


@pytest.mark.parametrize("name", sorted(PARAMETERS_AT_1000_CLASSES))
def test_layer_table_totals(name: str) -> None:
    table = layer_table(name, 224)
    assert table.total_params == PARAMETERS_AT_1000_CLASSES[name]
    assert table.training_only_params == 0
    family = name.removesuffix("_bn")
    if family in GIGA_MACS_AT_224:
        assert round(table.total_macs / 1e9, 3) == GIGA_MACS_AT_224[family]


def test_receptive_fields_of_vgg16_and_alexnet2012() -> None:
    # r_out = r_in + (K - 1) * j_in, j_out = j_in * S. VGG16: a 3x3 convolution adds 2j, a 2x2/2 pool adds
    # j and doubles it. j = 1: 3, 5, pool1 6; j = 2: 10, 14, pool2 16; j = 4: 24, 32, 40, pool3 44;
    # j = 8: 60, 76, 92, pool4 100; j = 16: 132, 164, conv5_3 196, pool5 212 (j = 32). fc6 sees pool5's
    # whole 7x7 map: 212 + 6 * 32 = 404.
    vgg16 = receptive_fields(layer_table("vgg16", 224))
    assert [vgg16[name] for name in ("conv1_1", "conv1_2", "pool1", "conv3_3")] == [3, 5, 6, 40]
    assert (vgg16["conv5_3"], vgg16["pool5"], vgg16["avgpool"], vgg16["fc6"]) == (196, 212, 212, 404)
    # AlexNet 2012: conv1 11 (j = 4), pool1 3/2 11 + 2 * 4 = 19 (j = 8), conv2 5x5 19 + 4 * 8 = 51,
    # pool2 51 + 2 * 8 = 67 (j = 16), conv3 67 + 2 * 16 = 99, conv4 131, conv5 163, pool5 195 (j = 32);
    # fc6 sees pool5's 6x6 map: 195 + 5 * 32 = 355.
    alexnet2012 = receptive_fields(layer_table("alexnet2012", 227))
    assert [alexnet2012[f"conv{i}"] for i in range(1, 6)] == [11, 51, 99, 131, 163]
    assert (alexnet2012["pool1"], alexnet2012["pool2"], alexnet2012["pool5"]) == (19, 67, 195)
    assert alexnet2012["fc6"] == alexnet2012["fc8"] == 355


def test_receptive_field_comparison() -> None:
    # Simonyan & Zisserman, section 2.3: three 3x3 layers see 7x7 with 3 x 3^2 C^2 weights, one 7x7 layer
    # 7^2 C^2. 64 channels: 27 x 4,096 = 110,592 and 49 x 4,096 = 200,704; 5 channels: 675 and 1,225.
    lines = receptive_field_comparison(channels=64).splitlines()
    assert "three 3x3 convolutions: receptive field 7, 110,592 weights = 27 C^2" in lines
    assert "one 7x7 convolution: receptive field 7, 200,704 weights = 49 C^2" in lines
    stack = [line.split() for line in lines if line.startswith("three 3x3 convolutions  conv")]
    assert [(cells[4], cells[5]) for cells in stack] == [("3", "36,864"), ("5", "36,864"), ("7", "36,864")]
    lines = receptive_field_comparison(channels=5).splitlines()
    assert "three 3x3 convolutions: receptive field 7, 675 weights = 27 C^2" in lines
    assert "one 7x7 convolution: receptive field 7, 1,225 weights = 49 C^2" in lines
    assert lines[-1] == (
        "one 7x7 convolution needs 81% more weights than three 3x3 convolutions for the same receptive field"
    )


def test_grouped_layer_table_counts_the_grouped_convolutions() -> None:
    table = layer_table("alexnet2012", 227, groups=2)
    ungrouped = layer_table("alexnet2012", 227)
    assert table.total_params == GROUPED_ALEXNET2012_PARAMETERS
    conv2_macs = {row.name: row.macs for row in table.rows}["conv2"]
    assert 2 * conv2_macs == {row.name: row.macs for row in ungrouped.rows}["conv2"] == 447_897_600


def test_layer_table_rejects_inputs_below_the_minimum() -> None:
    with pytest.raises(ValueError, match="at least 32x32"):
        layer_table("vgg11", 31)


# Odd sides exercise the floor in the pools; both AlexNets at their minimum and native sizes.
HOOKED_RESOLUTIONS = {"alexnet2012": [67, 227], "alexnet": [63, 224], "vgg11": [32, 57, 64]}


def test_layer_table_shapes_match_a_forward_pass(family_model: models.ConvNet) -> None:
    shapes: list[tuple[int, ...]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        per_image = tuple(output.shape[1:])
        shapes.append(per_image + (1,) * (3 - len(per_image)))  # FC outputs read as C x 1 x 1

    counted = (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear)
    hooks = [
        module.register_forward_hook(record)
        for module in family_model.modules()
        if isinstance(module, counted)
    ]
    try:
        for side in HOOKED_RESOLUTIONS[family_model.name]:
            shapes.clear()
            with torch.no_grad():
                family_model(torch.randn(1, 3, side, side))
            table = layer_table(family_model.name, side, num_classes=SMALL_NUM_CLASSES)
            assert [row.shape for row in table.rows[1:]] == shapes
    finally:  # the model is shared with other tests
        for hook in hooks:
            hook.remove()


class ShapeRecorder(fx.Interpreter):
    """Runs a traced graph and keeps each node's output shape per image, flat vectors as C x 1 x 1."""

    def __init__(self, graph: fx.GraphModule) -> None:
        super().__init__(graph)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, node: fx.Node) -> object:
        result = super().run_node(node)
        if isinstance(result, torch.Tensor) and node.op != "output":
            per_image = tuple(result.shape[1:])
            self.shapes[node] = per_image + (1,) * (3 - len(per_image))
        return result


def assert_feature_maps_match_a_run_of_the_graph(model: models.InputSizeChecked) -> None:
    graph = trace(model)
    for side in HOOKED_RESOLUTIONS[model.name]:
        recorder = ShapeRecorder(graph)
        with torch.no_grad():
            recorder.run(torch.randn(2, 3, side, side))  # 2 images: batch norm in training needs 2 values
        maps = feature_maps(graph, side)
        computed = {node: (output.channels, output.side, output.side) for node, output in maps.items()}
        assert computed == recorder.shapes


def test_feature_maps_match_a_run_of_the_graph(family_model: models.InputSizeChecked) -> None:
    assert_feature_maps_match_a_run_of_the_graph(family_model)


def test_layer_table_command(capsys: pytest.CaptureFixture[str]) -> None:
    main(["vgg16", "--resolution", "224"])
    lines = capsys.readouterr().out.splitlines()
    conv1_1 = ["conv1_1", "64x224x224", "3", "3,211,264", "12.2", "MiB", "1,792", "86,704,128"]
    assert conv1_1 in [line.split() for line in lines]
    assert "parameters: 138,357,544" in lines
    assert "MACs per image: 15.47 G" in lines
    with pytest.raises(SystemExit) as exit_info:
        main(["alexnet2012", "--resolution", "60"])
    assert exit_info.value.code == 2
    assert "alexnet2012 needs inputs of at least 67x67 pixels, got 60x60" in capsys.readouterr().err


def test_layer_table_command_prints_the_receptive_field_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--receptive-field-comparison"])
    assert capsys.readouterr().out == receptive_field_comparison() + "\n"
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
