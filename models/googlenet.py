"""GoogLeNet (Szegedy et al., "Going deeper with convolutions", CVPR 2015), as torchvision builds it, with
the paper's two auxiliary classifiers for training."""

from __future__ import annotations

import torchvision
from torchvision.models import GoogLeNetOutputs

from models.input_size import InputSizeChecked

__all__ = ["GoogLeNet", "GoogLeNetOutputs"]


class GoogLeNet(InputSizeChecked, torchvision.models.GoogLeNet):
    """torchvision's GoogLeNet with its auxiliary classifiers (aux1 on inception4a, aux2 on inception4d)
    and its initialisation (truncated N(0, 0.01) weights), plus the registry's input-size check.

    In training mode it returns GoogLeNetOutputs(logits, aux_logits2, aux_logits1), which
    models.training_loss combines as the paper does; in evaluation mode only the main logits, and the
    auxiliary classifiers do not run. Without aux1.* and aux2.* its state dict is that of torchvision's
    googlenet(weights=None, aux_logits=False, init_weights=True).

    torchvision departs from the paper in ways kept here so its weights load: batch norm after every
    convolution, 3x3 instead of 5x5 kernels in the third inception branch (torchvision issue #906), an
    adaptive 4x4 average pool in the auxiliary heads, and main-classifier dropout 0.2 (the paper: 0.4;
    the auxiliary heads keep the paper's 0.7).
    """

    def __init__(self, num_classes: int, *, dropout: float = 0.2) -> None:
        # transform_input=False: torchvision's option turns ImageNet-normalised inputs into the [-1, 1]
        # scaling its pretrained weights expect. Ours train from scratch on the loaders' inputs, already
        # normalised with the ImageNet mean and std.
        super().__init__(
            num_classes=num_classes, aux_logits=True, transform_input=False, init_weights=True, dropout=dropout
        )
        self.check_input_size_from_now_on("googlenet")
