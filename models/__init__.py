"""The model registry every stage builds from: build(name, num_classes), names(), min_resolution(name)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial

import torch

from models.alexnet import alexnet, alexnet2012
from models.convnet import ConvNet
from models.vgg import VARIANTS as VGG_VARIANTS
from models.vgg import vgg

__all__ = ["ConvNet", "build", "min_resolution", "names", "recipe_keys"]

# Builders of the ungrouped models, called as builder(num_classes, dropout=...).
_UNGROUPED_BUILDERS: dict[str, Callable[..., ConvNet]] = {
    "alexnet": alexnet,
    **{name: partial(vgg, name) for name in VGG_VARIANTS},
}


def names() -> list[str]:
    """The known model names, sorted."""
    return sorted(["alexnet2012", *_UNGROUPED_BUILDERS])


def build(name: str, num_classes: int, *, dropout: float = 0.5, groups: int = 1, init: str = "paper") -> ConvNet:
    """A freshly initialised model `name` with `num_classes` outputs.

    dropout is the classifier's dropout probability. groups and init apply to alexnet2012 only:
    groups=2 is the paper's two-GPU split of conv2, conv4 and conv5; init is "paper" or "kaiming".
    """
    if name not in names():
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if name == "alexnet2012":
        return alexnet2012(num_classes, dropout=dropout, groups=groups, init=init)
    if groups != 1:
        raise ValueError(f"groups={groups} applies only to alexnet2012; {name} has no grouped convolutions")
    if init != "paper":
        raise ValueError(f"init={init!r} applies only to alexnet2012; {name} keeps torchvision's initialisation")
    return _UNGROUPED_BUILDERS[name](num_classes, dropout=dropout)


@cache
def min_resolution(name: str) -> int:
    """The smallest square input side in pixels that model `name` accepts."""
    # Built on the meta device: only the layer hyperparameters matter, so nothing is allocated or drawn.
    with torch.device("meta"):
        return build(name, num_classes=1).min_resolution


def recipe_keys(name: str) -> tuple[str, ...]:
    """The training recipe's keys that change how model `name` is built."""
    return ("dropout", "alexnet_groups", "alexnet_init") if name == "alexnet2012" else ("dropout",)
