"""This project's error rates beside the published ones, for the same model, protocol and number of nets.

The published figures are top-1 / top-5 error on ILSVRC-2012's 50,000 validation images:
  AlexNet       Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep Convolutional
                Neural Networks", Table 2; ten patches (section 4.1); the 7-CNN entry has two nets
                pre-trained on the ImageNet Fall 2011 release.
  VGG           Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for Large-Scale Image
                Recognition", Table 4: nets trained with scale jitter [256, 512], dense evaluation at
                Q = {256, 384, 512}.
  torchvision   the reference weights' accuracy on one centre crop (resize 256, crop 224), from the
                torchvision model documentation (acc@1 / acc@5 of each weights' metadata).
"""

from __future__ import annotations

from dataclasses import dataclass

KRIZHEVSKY = "Krizhevsky et al. 2012, Table 2"
SIMONYAN = "Simonyan & Zisserman 2015, Table 4"
TORCHVISION = "torchvision weights (acc@1, acc@5)"


@dataclass(frozen=True)
class Published:
    model: str  # the registry name of the architecture
    protocol: str
    nets: int
    top1_error: float
    top5_error: float
    source: str


def _torchvision(model: str, acc1: float, acc5: float) -> Published:
    return Published(model, "center", 1, round(1 - acc1 / 100, 5), round(1 - acc5 / 100, 5), TORCHVISION)


PUBLISHED = [
    Published("alexnet2012", "ten_crop", 1, 0.407, 0.182, KRIZHEVSKY),
    Published("alexnet2012", "ten_crop", 5, 0.381, 0.164, KRIZHEVSKY),
    Published("alexnet2012", "ten_crop", 7, 0.367, 0.154, KRIZHEVSKY),
    Published("vgg16", "multi_scale", 1, 0.248, 0.075, SIMONYAN),
    Published("vgg19", "multi_scale", 1, 0.248, 0.075, SIMONYAN),
    _torchvision("alexnet", 56.522, 79.066),
    _torchvision("vgg11", 69.020, 88.628), _torchvision("vgg11_bn", 70.370, 89.810),
    _torchvision("vgg13", 69.928, 89.246), _torchvision("vgg13_bn", 71.586, 90.374),
    _torchvision("vgg16", 71.592, 90.382), _torchvision("vgg16_bn", 73.360, 91.516),
    _torchvision("vgg19", 72.376, 90.876), _torchvision("vgg19_bn", 74.218, 91.842),
    _torchvision("resnet18", 69.758, 89.078), _torchvision("resnet34", 73.314, 91.420),
    _torchvision("resnet50", 76.130, 92.862), _torchvision("googlenet", 69.778, 89.530),
]


@dataclass(frozen=True)
class Measured:
    """One figure of this run: `nets` nets of `model` under `protocol`."""

    model: str
    protocol: str
    nets: int
    top1_error: float
    top5_error: float
    what: str  # e.g. "evaluate@vgg16", "ensemble (first 5 members)"


def published_for(measured: Measured) -> Published | None:
    return next((entry for entry in PUBLISHED if (entry.model, entry.protocol, entry.nets) ==
                 (measured.model, measured.protocol, measured.nets)), None)


def papers_table(measured: list[Measured], data: str) -> str:
    """Markdown: each measured figure with the published one for the same model, protocol and nets."""
    lines = [
        f"| model | protocol | nets | this run ({data}): top-1 / top-5 error | published (ILSVRC-2012 val) | source |",
        "|---|---|---:|---|---|---|",
    ]
    for row in measured:
        published = published_for(row)
        paper = f"{published.top1_error:.3f} / {published.top5_error:.3f}" if published else "-"
        lines.append(f"| {row.model} ({row.what}) | {row.protocol} | {row.nets} | "
                     f"{row.top1_error:.3f} / {row.top5_error:.3f} | {paper} | {published.source if published else '-'} |")
    return "\n".join(lines) + "\n"
