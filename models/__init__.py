"""The model registry every stage builds from: build(name, num_classes), names(), min_resolution(name),
recipe_keys(name) and training_loss(outputs, labels, criterion)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import TYPE_CHECKING

import torch

from models.alexnet import alexnet, alexnet2012
from models.convnet import ConvNet
from models.input_size import InputSizeChecked
from models.lenet import lenet5
from models.vgg import VARIANTS as VGG_VARIANTS
from models.vgg import vgg

if TYPE_CHECKING:
    from torchvision.models import GoogLeNetOutputs

__all__ = [
    "RECIPE_OPTIONS",
    "HYBRID_MODELS",
    "ConvNet",
    "InputSizeChecked",
    "build",
    "min_resolution",
    "names",
    "recipe_keys",
    "training_loss",
]

# models/resnet.py's BLOCKS, by name.
RESNET_NAMES = ("resnet18", "resnet34", "resnet50")
# Section 5 of the GoogLeNet paper: "During training, their loss gets added to the total loss of the
# network with a discount weight (the losses of the auxiliary classifiers were weighted by 0.3)."
AUX_LOSS_WEIGHT = 0.3


def _googlenet(num_classes: int, **options) -> InputSizeChecked:
    # GoogLeNet and the ResNets subclass torchvision's, whose import costs ~1.4 s of CPU (it brings in
    # torch._dynamo): they are imported when built, so the processes of an AlexNet or VGG run (every Ray
    # worker and driver imports this registry) do not pay it. See docs/benchmarks.md.
    from models.googlenet import GoogLeNet

    return GoogLeNet(num_classes, **options)


def _resnet(name: str, num_classes: int) -> InputSizeChecked:
    from models.resnet import ResNet

    return ResNet(name, num_classes)


# Each model's builder, called as builder(num_classes, **options) with the options of its recipe keys.
_BUILDERS: dict[str, Callable[..., InputSizeChecked]] = {
    "alexnet2012": alexnet2012,
    "alexnet": alexnet,
    **{name: partial(vgg, name) for name in VGG_VARIANTS},
    **{name: partial(_resnet, name) for name in RESNET_NAMES},
    "googlenet": _googlenet,
    "lenet5": lenet5,
}

# The keys of the training recipe that can change how a model is built, and build's keyword for each.
RECIPE_OPTIONS: dict[str, str] = {"dropout": "dropout", "alexnet_groups": "groups", "alexnet_init": "init"}

_RECIPE_KEYS: dict[str, tuple[str, ...]] = {
    "alexnet2012": ("dropout", "alexnet_groups", "alexnet_init"),
    "alexnet": ("dropout",),
    **{name: ("dropout",) for name in VGG_VARIANTS},
    # The main classifier's dropout; the auxiliary heads keep the paper's 0.7.
    "googlenet": ("dropout",),
    # No dropout in the ResNets (He et al. 2016, section 3.4: batch norm instead), nor in LeNet-5.
    **{name: () for name in RESNET_NAMES},
    "lenet5": (),
}


# The models whose classifier is a stack of large fully connected layers (AlexNet's fc6-fc8 hold 58.6 M of
# its 61 M parameters, VGG-16's 123.6 M of 138.4 M): the ones train.parallelism hybrid splits across workers;
# it leaves the others data-parallel.
HYBRID_MODELS = frozenset({"alexnet2012", "alexnet", *VGG_VARIANTS})


def names() -> list[str]:
    """The known model names, sorted."""
    return sorted(_BUILDERS)


def recipe_keys(name: str) -> tuple[str, ...]:
    """The keys of the training recipe, out of RECIPE_OPTIONS, that change how model `name` is built.

    A training run passes build exactly these (as RECIPE_OPTIONS' keywords) and is named by them only,
    so runs of a model that differ only in a setting it ignores are one run.
    """
    _check_known(name)
    return _RECIPE_KEYS[name]


def build(
    name: str,
    num_classes: int,
    *,
    dropout: float | None = None,
    groups: int | None = None,
    init: str | None = None,
) -> InputSizeChecked:
    """A freshly initialised model `name` with `num_classes` outputs.

    dropout is the classifier's dropout probability. groups and init apply to alexnet2012 only:
    groups=2 is the paper's two-GPU split of conv2, conv4 and conv5; init is "paper" or "kaiming".
    An option left at None takes the architecture's own default (dropout 0.5 for AlexNet and VGG,
    0.2 for GoogLeNet; groups 1; init "paper"). Giving an option the model is not built from raises
    ValueError naming it, so no run records a setting that had no effect.
    """
    _check_known(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    given = {
        option: value
        for option, value in {"dropout": dropout, "groups": groups, "init": init}.items()
        if value is not None
    }
    for option, value in given.items():
        users = [model for model in names() if option in _build_options(model)]
        if name not in users:
            raise ValueError(
                f"{option}={value!r} applies only to {', '.join(users)}; {name} has no such option"
            )
    return _BUILDERS[name](num_classes, **given)


@cache
def min_resolution(name: str) -> int:
    """The smallest square input side in pixels that model `name` accepts."""
    # Built on the meta device: only the layer hyperparameters matter, so nothing is allocated or drawn.
    with torch.device("meta"):
        return build(name, num_classes=1).min_resolution


def training_loss(
    outputs: torch.Tensor | GoogLeNetOutputs,
    labels: torch.Tensor,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to minimise and the main logits, from what a model returns in training mode.

    Most models return their logits: the loss is criterion(logits, labels). GoogLeNet returns its main
    and auxiliary logits; as in the paper (section 5) the auxiliary losses are added with weight 0.3:
    criterion(main) + 0.3 * (criterion(aux1) + criterion(aux2)).
    """
    # A tensor, or GoogLeNet's GoogLeNetOutputs: a named tuple.
    if isinstance(outputs, tuple):
        auxiliary = criterion(outputs.aux_logits1, labels) + criterion(outputs.aux_logits2, labels)
        return criterion(outputs.logits, labels) + AUX_LOSS_WEIGHT * auxiliary, outputs.logits
    return criterion(outputs, labels), outputs


def _build_options(name: str) -> set[str]:
    return {RECIPE_OPTIONS[key] for key in _RECIPE_KEYS[name]}


def _check_known(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
