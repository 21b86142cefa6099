"""AlexNet: the 2012 paper's network (Krizhevsky et al.) and torchvision's 64-192-384-256-256 variant."""

from __future__ import annotations

from torch import nn

from models.convnet import ConvNet

# Both variants pool their last feature map (6x6 at their native input sizes) to 6x6 for the classifier.
POOLED_SIDE = 6
FEATURE_CHANNELS = 256
HIDDEN_UNITS = 4096
INITS = ("paper", "kaiming")
PAPER_LRN_SIZE = 5


def alexnet2012(num_classes: int, *, dropout: float = 0.5, groups: int = 1, init: str = "paper") -> ConvNet:
    """The 2012 paper's network for 227x227 inputs.

    groups=2 is the paper's split across two GPUs: conv2, conv4 and conv5 see only the kernel maps on
    their own GPU. groups=1 connects every layer to all maps of the layer before (one device).
    init="paper" is the paper's N(0, 0.01) with bias 1 in places; it shrinks the signal ~10x per layer,
    so the net sits at chance for many epochs before it learns (the paper trained ~90 epochs).
    init="kaiming" (He et al. 2015, fan_out, as torchvision's VGG) learns within a few epochs, which
    is what a short run on small data needs.
    """
    if init not in INITS:
        raise ValueError(f"alexnet2012 init must be one of {', '.join(INITS)}, got {init!r}")
    if groups not in (1, 2):
        raise ValueError(
            f"alexnet2012 groups must be 1 (one device) or 2 (the paper's two-GPU split), got {groups}"
        )
    conv1 = nn.Conv2d(3, 96, kernel_size=11, stride=4)
    conv2 = nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=groups)
    conv3 = nn.Conv2d(256, 384, kernel_size=3, padding=1)
    conv4 = nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=groups)
    conv5 = nn.Conv2d(384, FEATURE_CHANNELS, kernel_size=3, padding=1, groups=groups)
    features = nn.Sequential(
        conv1,
        nn.ReLU(inplace=True),
        _local_response_norm(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        conv2,
        nn.ReLU(inplace=True),
        _local_response_norm(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        conv3,
        nn.ReLU(inplace=True),
        conv4,
        nn.ReLU(inplace=True),
        conv5,
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    # The paper (section 4.2) drops out the outputs of fc6 and fc7, "the first two fully-connected layers".
    fc6, fc7, fc8 = _fully_connected(num_classes)
    classifier = nn.Sequential(fc6, nn.ReLU(inplace=True), nn.Dropout(p=dropout),
                               fc7, nn.ReLU(inplace=True), nn.Dropout(p=dropout), fc8)

    if init == "paper":
        # Paper section 5: every weight from N(0, 0.01). Biases of conv2, conv4, conv5 and the hidden FC
        # layers start at 1, which "accelerates the early stages of learning by providing the ReLUs with
        # positive inputs"; the rest start at 0.
        for layer in (conv1, conv2, conv3, conv4, conv5, fc6, fc7, fc8):
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.constant_(layer.bias, 1.0 if layer in (conv2, conv4, conv5, fc6, fc7) else 0.0)
    else:
        for conv in (conv1, conv2, conv3, conv4, conv5):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for fc in (fc6, fc7, fc8):
            nn.init.normal_(fc.weight, mean=0.0, std=0.01)
            nn.init.zeros_(fc.bias)
    return ConvNet("alexnet2012", features, POOLED_SIDE, classifier)


def alexnet(num_classes: int, *, dropout: float = 0.5) -> ConvNet:
    """torchvision's variant (from Krizhevsky's 2014 "One weird trick" paper): 64-192-384-256-256
    kernels, conv1 padded by 2, no LRN and no groups. It keeps torchvision's layout, so torchvision's
    weights load, and torchvision's initialisation, which is PyTorch's default for each layer."""
    features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, FEATURE_CHANNELS, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    # torchvision's order: dropout on the inputs of fc6 and fc7 (pool5's output and fc6's).
    fc6, fc7, fc8 = _fully_connected(num_classes)
    classifier = nn.Sequential(nn.Dropout(p=dropout), fc6, nn.ReLU(inplace=True),
                               nn.Dropout(p=dropout), fc7, nn.ReLU(inplace=True), fc8)
    return ConvNet("alexnet", features, POOLED_SIDE, classifier)


def _local_response_norm() -> nn.LocalResponseNorm:
    # The paper's k=2, n=5, alpha=1e-4, beta=0.75. PyTorch (like Caffe) divides alpha by n inside the
    # sum, the paper's formula does not: alpha=n*1e-4 here gives the paper's normalisation exactly.
    return nn.LocalResponseNorm(size=PAPER_LRN_SIZE, alpha=PAPER_LRN_SIZE * 1e-4, beta=0.75, k=2.0)


def _fully_connected(num_classes: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    return (nn.Linear(FEATURE_CHANNELS * POOLED_SIDE * POOLED_SIDE, HIDDEN_UNITS),
            nn.Linear(HIDDEN_UNITS, HIDDEN_UNITS), nn.Linear(HIDDEN_UNITS, num_classes))
