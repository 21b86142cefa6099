"""VGG (Simonyan & Zisserman 2014): configurations A, B, D and E, with or without batch norm."""

from __future__ import annotations

from torch import nn

from models.convnet import ConvNet

# The paper's Table 1: five blocks of 3x3 convolutions, each block ending in a 2x2 max pool.
BLOCK_WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_BLOCK = {"A": (1, 1, 2, 2, 2), "B": (2, 2, 2, 2, 2), "D": (2, 2, 3, 3, 3), "E": (2, 2, 4, 4, 4)}
FC_LAYERS = 3
# 224 pixels halved by five pools.
POOLED_SIDE = 7
HIDDEN_UNITS = 4096

# torchvision's names count weight layers (VGG-16 is configuration D: 13 convolutions + 3 FC layers).
VARIANTS: dict[str, tuple[str, bool]] = {
    f"vgg{sum(convs) + FC_LAYERS}{'_bn' if batch_norm else ''}": (config, batch_norm)
    for config, convs in CONVS_PER_BLOCK.items()
    for batch_norm in (False, True)
}


def vgg(name: str, num_classes: int, *, dropout: float = 0.5) -> ConvNet:
    """The VGG variant `name` (a key of VARIANTS) with torchvision's layout and initialisation."""
    config, batch_norm = VARIANTS[name]
    classifier = nn.Sequential(
        nn.Linear(BLOCK_WIDTHS[-1] * POOLED_SIDE * POOLED_SIDE, HIDDEN_UNITS),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(HIDDEN_UNITS, HIDDEN_UNITS),
        nn.ReLU(inplace=True),
        nn.Dropout(p=dropout),
        nn.Linear(HIDDEN_UNITS, num_classes),
    )
    model = ConvNet(name, _features(CONVS_PER_BLOCK[config], batch_norm), POOLED_SIDE, classifier)
    _init_like_torchvision(model)
    return model


def _features(convs_per_block: tuple[int, ...], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for width, convs in zip(BLOCK_WIDTHS, convs_per_block, strict=True):
        for _ in range(convs):
            layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            in_channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _init_like_torchvision(model: nn.Module) -> None:
    # The paper pre-trained A to initialise the deeper nets; torchvision (and we) use He init instead,
    # which trains every configuration from scratch.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
            nn.init.zeros_(module.bias)
