"""models/: parameter counts, torchvision compatibility, input-size limits, the registry's recipe API,
training losses and the layer table."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import fx, nn
from torchvision.models import GoogLeNetOutputs

import models
from models.layers import LayerTable, layer_table
from models.resnet import BLOCKS
from models.shapes import feature_maps, trace
from pipeline.reports.layer_table import main, receptive_field_comparison

# torchvision's published counts (each model's ImageNet weights list them: e.g.
# torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["num_params"]); alexnet2012 summed by hand from
# the paper's layer sizes, lenet5 in models/lenet.py's docstring (61,156 + 85 x 1,000), googlenet below.
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
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "googlenet": 13_004_888,
    "lenet5": 146_156,
}
# torchvision publishes GoogLeNet without its auxiliary classifiers. Each head is a 1x1 convolution to
# 128 maps with batch norm (512 x 128 + 2 x 128 = 65,792 on inception4a, 528 x 128 + 256 = 67,840 on
# inception4d), fc1 2048 -> 1024 (2,098,176) and fc2 1024 -> 1000 (1,025,000): 3,188,968 + 3,191,016.
GOOGLENET_WITHOUT_AUX_HEADS = 6_624_904
GOOGLENET_AUX_HEADS = 6_379_984
# Half the weights of conv2, conv4 and conv5 go: 307,200 + 663,552 + 442,368 fewer.
GROUPED_ALEXNET2012_PARAMETERS = 60_965_224
TORCHVISION_NAMES = sorted(set(PARAMETERS_AT_1000_CLASSES) - {"alexnet2012", "googlenet", "lenet5"})

# By hand, backwards from one output pixel of the last pool with floor((W - K + 2P) / S) + 1:
# AlexNet's 3/2 pools need 3 -> 7 -> 15 pixels at conv1's output (the 3x3 and 5x5 convolutions are
# padded to keep their size), and conv1 gives 15 from 67 (11x11/4, no padding) or 63 (padding 2).
# VGG's five 2x2/2 pools need 2**5 = 32.
# ResNet pads every layer enough to keep 1 pixel from 1: conv1 7x7/2 pad 3 gives (1 + 6 - 7) // 2 + 1 = 1,
# the 3x3/2 max pool with pad 1 gives (1 + 2 - 3) // 2 + 1 = 1, 3x3 convolutions have pad 1, 1x1 any stride.
# GoogLeNet's 3x3/2 pools round up (ceil mode): 1 output from 2 pixels, 2 from 4, 4 from 8, so maxpool3
# needs 2 -> maxpool2 4 -> maxpool1 8 pixels, which conv1 (7x7/2, pad 3) gives from 15 ((15 - 1) // 2 + 1);
# the 2x2/2 maxpool4 keeps 1 pixel from 1 and inception branches keep their size.
# LeNet-5: S4 (2x2/2) needs 2 -> C3 (5x5) 6 -> S2 12 -> C1 (5x5) 16.
MIN_RESOLUTIONS = {"alexnet2012": 67, "alexnet": 63, "googlenet": 15, "lenet5": 16} | {
    name: 32 if name.startswith("vgg") else 1
    for name in PARAMETERS_AT_1000_CLASSES
    if name.startswith(("vgg", "resnet"))
}

# torchvision's published GFLOPs at 224 (its weights' meta["_ops"]), counted as MACs; batch norm folds
# into the convolutions and adds none.
GIGA_MACS_AT_224 = {
    "alexnet": 0.714,
    "vgg11": 7.609,
    "vgg13": 11.308,
    "vgg16": 15.470,
    "vgg19": 19.632,
    "resnet18": 1.814,
    "resnet34": 3.664,
    "resnet50": 4.089,
    "googlenet": 1.498,
}

RECIPE_KEYS = {
    "alexnet2012": ("dropout", "alexnet_groups", "alexnet_init"),
    "alexnet": ("dropout",),
    "googlenet": ("dropout",),
    "resnet18": (),
    "resnet34": (),
    "resnet50": (),
    "lenet5": (),
} | {name: ("dropout",) for name in PARAMETERS_AT_1000_CLASSES if name.startswith("vgg")}
# A value for each recipe key other than the architectures' defaults.
RECIPE_VALUES = {"dropout": 0.1, "alexnet_groups": 2, "alexnet_init": "kaiming"}

# One model per builder, built for real and shared by the tests that run small inputs through it.
FAMILIES = ["alexnet2012", "alexnet", "vgg11", "resnet18", "googlenet", "lenet5"]
CONVNET_FAMILIES = ["alexnet2012", "alexnet", "vgg11", "lenet5"]
SMALL_NUM_CLASSES = 7
SMALL_DROPOUT = 0.25


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def dropouts_by_module(model: nn.Module) -> dict[str, float]:
    return {name: module.p for name, module in model.named_modules() if isinstance(module, nn.Dropout)}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest) -> models.InputSizeChecked:
    name = request.param
    options = {"dropout": SMALL_DROPOUT} if "dropout" in models.recipe_keys(name) else {}
    return models.build(name, SMALL_NUM_CLASSES, **options).eval()


# --- registry -----------------------------------------------------------------------------------


def test_names_are_sorted_and_complete() -> None:
    assert models.names() == sorted(PARAMETERS_AT_1000_CLASSES)
    assert set(models.RESNET_NAMES) == set(BLOCKS)


@pytest.mark.parametrize(
    "lookup",
    [
        lambda: models.build("resnet101", 10),
        lambda: models.min_resolution("resnet101"),
        lambda: models.recipe_keys("resnet101"),
    ],
    ids=["build", "min_resolution", "recipe_keys"],
)
def test_unknown_name_lists_the_known_names(lookup: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet101'") as error:
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
        vgg, googlenet = models.build("vgg11", 10), models.build("googlenet", 10)
    assert dropouts_by_module(vgg) == {"classifier.2": 0.5, "classifier.5": 0.5}
    # torchvision's defaults: 0.2 before the main classifier, the paper's 0.7 in the auxiliary heads.
    assert dropouts_by_module(googlenet) == {"aux1.dropout": 0.7, "aux2.dropout": 0.7, "dropout": 0.2}


# --- parameter counts and initialisation -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PARAMETERS_AT_1000_CLASSES))
def test_parameter_count(name: str) -> None:
    # Counting needs no values: on the meta device VGG's 138M weights are neither allocated nor drawn.
    # family_model builds every builder's models for real.
    with torch.device("meta"):
        model = models.build(name, 1000)
    assert parameter_count(model) == PARAMETERS_AT_1000_CLASSES[name]


def test_googlenet_parameters_without_the_auxiliary_heads() -> None:
    with torch.device("meta"):
        model = models.build("googlenet", 1000)
    aux_heads = parameter_count(model.aux1) + parameter_count(model.aux2)
    assert aux_heads == GOOGLENET_AUX_HEADS
    assert parameter_count(model) - aux_heads == GOOGLENET_WITHOUT_AUX_HEADS


def test_lenet5_for_ten_digits() -> None:
    # models/lenet.py's sum: 61,156 + 85 x 10.
    assert parameter_count(models.build("lenet5", 10)) == 62_006


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


def with_random_batch_norm_statistics(model: nn.Module) -> nn.Module:
    # Non-default running statistics, so the outputs also show the batch-norm buffers carried over.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def below_minimum(name: str) -> torch.Tensor:
    side = MIN_RESOLUTIONS[name]
    return torch.randn(1, 3, side - 1, side - 1)


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_state_dict_round_trip(name: str) -> None:
    torch.manual_seed(0)
    reference = with_random_batch_norm_statistics(getattr(torchvision.models, name)(weights=None)).eval()
    # On the meta device ours holds no values of its own: every tensor it computes with comes from the
    # reference's state dict (assign=True). family_model builds one model of each builder for real.
    with torch.device("meta"):
        ours = models.build(name, 1000)
    assert type(ours) is not type(reference)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    ours.eval()
    # The smallest valid input keeps VGG cheap; 32 pixels at least, so ResNet's 3x3 kernels see more
    # than the centre tap they see at its 1-pixel minimum.
    side = max(MIN_RESOLUTIONS[name], 32)
    images = torch.randn(1, 3, side, side)
    with torch.no_grad():
        assert torch.allclose(ours(images), reference(images))
    # What ours adds to torchvision's model: the input-size check.
    with pytest.raises(ValueError, match=f"{name} needs inputs of at least"):
        ours(below_minimum(name))


def test_googlenet_round_trip_with_and_without_the_auxiliary_heads() -> None:
    torch.manual_seed(0)
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    with_random_batch_norm_statistics(reference).eval()
    with torch.device("meta"):
        ours = models.build("googlenet", 1000)
    assert isinstance(ours, torchvision.models.GoogLeNet) and type(ours) is not type(reference)
    # Our loaders normalise with ImageNet's mean and std already (see models/googlenet.py).
    assert ours.transform_input is False
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours.eval()
        logits = ours(images)
        assert isinstance(logits, torch.Tensor)
        assert torch.allclose(logits, reference(images))

        # Ours without the auxiliary heads is torchvision's googlenet without them.
        with torch.device("meta"):
            plain = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
        plain.load_state_dict(
            {key: value for key, value in ours.state_dict().items() if not key.startswith(("aux1.", "aux2."))},
            strict=True,
            assign=True,
        )
        assert torch.allclose(plain.eval()(images), logits)

        # Training: main and both auxiliary logits, with the same dropout draws from the same seed.
        ours.train()
        reference.train()
        torch.manual_seed(1)
        ours_outputs = ours(images)
        torch.manual_seed(1)
        reference_outputs = reference(images)
    assert isinstance(ours_outputs, GoogLeNetOutputs)
    for ours_logits, reference_logits in zip(ours_outputs, reference_outputs, strict=True):
        assert torch.allclose(ours_logits, reference_logits)
    with pytest.raises(ValueError, match="googlenet needs inputs of at least 15x15 pixels, got 14x14"):
        ours(below_minimum("googlenet"))


# --- input size ---------------------------------------------------------------------------------


def test_min_resolution_matches_the_hand_calculation() -> None:
    assert {name: models.min_resolution(name) for name in models.names()} == MIN_RESOLUTIONS


def test_minimum_input_works_and_honours_num_classes(family_model: models.InputSizeChecked) -> None:
    side = MIN_RESOLUTIONS[family_model.name]
    with torch.no_grad():
        assert family_model(torch.randn(2, 3, side, side)).shape == (2, SMALL_NUM_CLASSES)


def test_below_minimum_raises_naming_the_minimum(family_model: models.InputSizeChecked) -> None:
    side = MIN_RESOLUTIONS[family_model.name]
    message = f"{family_model.name} needs inputs of at least {side}x{side} pixels, got {side - 1}x{side - 1}"
    with pytest.raises(ValueError, match=message):
        family_model(torch.randn(1, 3, side - 1, side - 1))
    with pytest.raises(ValueError, match=f"got {side}x{side - 1}"):
        family_model(torch.randn(1, 3, side, side - 1))


def test_minimum_is_where_the_layers_themselves_fail(family_model: models.InputSizeChecked) -> None:
    # forward itself, without the pre-hook that checks the input size.
    with torch.no_grad(), pytest.raises(RuntimeError):
        family_model.forward(below_minimum(family_model.name))


def test_dropout_is_honoured(family_model: models.InputSizeChecked) -> None:
    expected = {
        # The paper's placement (outputs of fc6 and fc7); torchvision's alexnet drops out their inputs.
        "alexnet2012": {"classifier.2": SMALL_DROPOUT, "classifier.5": SMALL_DROPOUT},
        "alexnet": {"classifier.0": SMALL_DROPOUT, "classifier.3": SMALL_DROPOUT},
        "vgg11": {"classifier.2": SMALL_DROPOUT, "classifier.5": SMALL_DROPOUT},
        "googlenet": {"aux1.dropout": 0.7, "aux2.dropout": 0.7, "dropout": SMALL_DROPOUT},
        "resnet18": {},
        "lenet5": {},
    }
    assert dropouts_by_module(family_model) == expected[family_model.name]


def test_lenet5_takes_rgb_inputs_from_32_pixels_up() -> None:
    model = models.build("lenet5", 10).eval()
    with torch.no_grad():
        for side in (32, 80):
            assert model(torch.randn(2, 3, side, side)).shape == (2, 10)
    shapes_at = {side: {row.name: row.shape for row in layer_table("lenet5", side).rows} for side in (32, 80)}
    # At the paper's 32 pixels S4 gives C5 its 5x5 maps unpooled; at 80 they are pooled down from 17x17.
    assert shapes_at[32]["pool2"] == shapes_at[32]["avgpool"] == (16, 5, 5)
    assert shapes_at[80]["pool2"] == (16, 17, 17)
    assert shapes_at[80]["avgpool"] == (16, 5, 5)


# --- training loss ------------------------------------------------------------------------------


def test_training_loss_of_plain_logits() -> None:
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    criterion = nn.CrossEntropyLoss()
    loss, main_logits = models.training_loss(logits, labels, criterion)
    assert main_logits is logits
    assert loss == criterion(logits, labels)


def test_training_loss_adds_googlenets_auxiliary_losses_at_0_3() -> None:
    # Two classes, label 1. Cross-entropy -log softmax: main [0, 0] -> ln 2; aux2 [ln 3, 0] -> ln 4;
    # aux1 [0, ln 3] -> ln(4/3). ln 2 + 0.3 * (ln 4 + ln(4/3)) = 0.693147 + 0.3 * 1.673976 = 1.195340.
    outputs = GoogLeNetOutputs(
        logits=torch.tensor([[0.0, 0.0]]),
        aux_logits2=torch.tensor([[math.log(3), 0.0]]),
        aux_logits1=torch.tensor([[0.0, math.log(3)]]),
    )
    loss, main_logits = models.training_loss(outputs, torch.tensor([1]), nn.CrossEntropyLoss())
    assert main_logits is outputs.logits
    assert loss.item() == pytest.approx(1.195340, abs=1e-6)


@pytest.mark.parametrize("family_model", ["googlenet"], indirect=True)
def test_googlenet_trains_all_three_heads(family_model: models.InputSizeChecked) -> None:
    model = copy.deepcopy(family_model).train()  # the fixture's model is shared with other tests
    side = MIN_RESOLUTIONS["googlenet"]
    outputs = model(torch.randn(2, 3, side, side))
    loss, main_logits = models.training_loss(outputs, torch.tensor([0, 1]), nn.CrossEntropyLoss())
    loss.backward()
    assert main_logits is outputs.logits
    for head in (model.aux1, model.aux2, model.fc):
        assert all(parameter.grad is not None for parameter in head.parameters())


# --- shapes and the layer table -------------------------------------------------------------------


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
        "norm1": (96, 55, 55),
        "pool1": (96, 27, 27),
        "conv2": (256, 27, 27),
        "norm2": (256, 27, 27),
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
    # The table follows the evaluation graph, which GoogLeNet's auxiliary heads are not part of.
    training_only = GOOGLENET_AUX_HEADS if name == "googlenet" else 0
    assert table.total_params == PARAMETERS_AT_1000_CLASSES[name] - training_only
    assert table.training_only_params == training_only
    family = name.removesuffix("_bn")
    if family in GIGA_MACS_AT_224:
        assert round(table.total_macs / 1e9, 3) == GIGA_MACS_AT_224[family]


def test_layer_table_counts_residual_additions_and_inception_branches() -> None:
    resnet50 = [row.name for row in layer_table("resnet50", 224).rows]
    # One addition per bottleneck (3 + 4 + 6 + 3), a projection shortcut where a stage begins.
    assert sum(name.endswith(".add") for name in resnet50) == 16
    assert sum(name.endswith(".downsample.0") for name in resnet50) == 4
    googlenet = rows_by_name(layer_table("googlenet", 224))
    inceptions = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    assert [name for name in googlenet if name.endswith(".cat")] == [f"inception{i}.cat" for i in inceptions]
    # The paper's Table 1, inception (3a): 64 + 128 + 32 + 32 maps of 28x28; no parameters, no MACs.
    assert googlenet["inception3a.cat"] == ((256, 28, 28), 200_704, 0, 0)
    # Batch norm folds into its convolution: 64 x 3 x 7 x 7 weights (no bias) + 2 x 64.
    assert googlenet["conv1.conv"][2] == 9_408 + 128
    assert googlenet["fc"] == ((1000, 1, 1), 1_000, 1_025_000, 1_024_000)


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
    # Local response normalisation mixes channels at one position: it sees what its input saw.
    assert (alexnet2012["norm1"], alexnet2012["norm2"]) == (11, 51)


def test_receptive_fields_through_residual_and_inception_branches() -> None:
    # ResNet-50: conv1 7x7/2 gives 7 (j = 2), the 3x3/2 max pool 7 + 2 * 2 = 11 (j = 4); in layer1.0
    # conv1 (1x1) keeps 11, conv2 (3x3) 11 + 2 * 4 = 19, conv3 (1x1) 19, the shortcut's 1x1 projection
    # 11, and the addition takes the larger, 19. Two more 3x3s give 35 by layer2.0, whose 3x3 strides
    # (v1.5): 35 + 2 * 4 = 43 (j = 8).
    resnet50 = receptive_fields(layer_table("resnet50", 224))
    assert [resnet50[name] for name in ("conv1", "maxpool", "layer1.0.conv1", "layer1.0.conv2")] == [7, 11, 11, 19]
    assert (resnet50["layer1.0.downsample.0"], resnet50["layer1.0.add"]) == (11, 19)
    assert (resnet50["layer2.0.conv1"], resnet50["layer2.0.conv2"]) == (35, 43)
    # GoogLeNet: conv1 7 (j = 2), maxpool1 3x3/2 11 (j = 4), conv2 1x1 11, conv3 3x3 11 + 2 * 4 = 19,
    # maxpool2 19 + 2 * 4 = 27 (j = 8). Inception (3a): the 1x1 branch keeps 27, the 1x1 -> 3x3 branches
    # reach 27 + 2 * 8 = 43 (torchvision's third branch has 3x3, not 5x5, kernels), so does the 3x3/1
    # pool branch; the concatenation takes 43.
    googlenet = receptive_fields(layer_table("googlenet", 224))
    assert [googlenet[name] for name in ("conv1.conv", "maxpool1", "conv3.conv", "maxpool2")] == [7, 11, 19, 27]
    branches = ("branch1.conv", "branch2.1.conv", "branch3.1.conv", "branch4.0")
    assert [googlenet[f"inception3a.{branch}"] for branch in branches] == [27, 43, 43, 43]
    assert googlenet["inception3a.cat"] == 43
    # LeNet-5 at 32: conv1 5, pool1 5 + 1 = 6 (j = 2), conv2 6 + 4 * 2 = 14, pool2 14 + 2 = 16 (j = 4);
    # C5 sees pool2's whole 5x5 map, 16 + 4 * 4 = 32, the whole unpadded input.
    lenet5 = receptive_fields(layer_table("lenet5", 32))
    assert [lenet5[name] for name in ("conv1", "pool1", "conv2", "pool2", "fc3")] == [5, 6, 14, 16, 32]


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
    with pytest.raises(ValueError, match="at least 15x15"):
        layer_table("googlenet", 14)


# Odd sides exercise the floor and ceil rounding of the pools; every family at its minimum.
HOOKED_RESOLUTIONS = {
    "alexnet2012": [67, 227],
    "alexnet": [63, 224],
    "vgg11": [32, 57, 64],
    "resnet18": [1, 33],
    "googlenet": [15, 32],
    "lenet5": [16, 32, 81],
}


@pytest.mark.parametrize("family_model", CONVNET_FAMILIES, indirect=True)
def test_layer_table_shapes_match_a_forward_pass(family_model: models.ConvNet) -> None:
    shapes: list[tuple[int, ...]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        per_image = tuple(output.shape[1:])
        shapes.append(per_image + (1,) * (3 - len(per_image)))  # FC outputs read as C x 1 x 1

    counted = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.LocalResponseNorm)
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


@pytest.mark.parametrize("family_model", ["googlenet"], indirect=True)
def test_feature_maps_match_a_run_of_googlenets_training_graph(family_model: models.InputSizeChecked) -> None:
    # The training graph adds the auxiliary heads. A copy trains: the fixture's model is shared.
    assert_feature_maps_match_a_run_of_the_graph(copy.deepcopy(family_model).train())


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


def test_layer_table_command_for_resnet_googlenet_and_lenet5(capsys: pytest.CaptureFixture[str]) -> None:
    main(["resnet50", "--resolution", "224"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["layer", "output", "CxHxW", "receptive"]
    assert ["layer1.0.add", "256x56x56", "19", "802,816", "3.1", "MiB", "0", "0"] in [line.split() for line in lines]
    assert "parameters: 25,557,032" in lines
    assert "MACs per image: 4.09 G" in lines
    main(["googlenet"])
    lines = capsys.readouterr().out.splitlines()
    assert "parameters: 6,624,904" in lines
    assert "MACs per image: 1.50 G" in lines
    assert "not in the table: 6,379,984 parameters of training-only layers" in lines
    main(["lenet5", "--resolution", "32", "--num-classes", "10"])
    lines = capsys.readouterr().out.splitlines()
    assert ["fc3", "120x1x1", "32", "120", "480.0", "B", "48,120", "48,000"] in [line.split() for line in lines]
    assert "parameters: 62,006" in lines


def test_layer_table_command_shows_alexnets_normalisation_and_what_params_count(
        capsys: pytest.CaptureFixture[str]) -> None:
    main(["alexnet2012", "--resolution", "227"])
    lines = capsys.readouterr().out.splitlines()
    assert "params count weights and biases" in lines[0]
    rows = [line.split()[:2] for line in lines]
    # Caffe's order in the paper's network: conv, ReLU (no row), norm, pool.
    assert rows.index(["norm1", "96x55x55"]) == rows.index(["conv1", "96x55x55"]) + 1
    assert rows.index(["pool2", "256x13x13"]) == rows.index(["norm2", "256x27x27"]) + 1
    # conv1: 96 x 3 x 11 x 11 weights + 96 biases.
    assert "34,944" in lines[rows.index(["conv1", "96x55x55"])].split()


def test_layer_table_command_prints_the_receptive_field_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--receptive-field-comparison"])
    assert capsys.readouterr().out == receptive_field_comparison() + "\n"
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
