"""ResNet-18, -34 and -50 (He, Zhang, Ren & Sun, "Deep residual learning for image recognition", CVPR 2016),
as torchvision builds them."""

from __future__ import annotations

import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from models.input_size import InputSizeChecked

# The paper's Table 1: the residual block and how many of them each of the four stages (conv2_x to
# conv5_x) stacks.
BLOCKS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(InputSizeChecked, torchvision.models.ResNet):
    """torchvision's ResNet `name` (a key of BLOCKS): its layers, parameter names and initialisation (He
    normal convolutions, batch norm at weight 1 and bias 0), so torchvision's state dicts load, plus the
    registry's input-size check.

    torchvision's ResNet-50 is "ResNet v1.5": a downsampling bottleneck strides in its 3x3 convolution,
    where the paper strides in the first 1x1. Every convolution and pool is padded, so inputs of any
    side from 1 pixel up pass (min_resolution 1).
    """

    def __init__(self, name: str, num_classes: int) -> None:
        block, blocks_per_stage = BLOCKS[name]
        super().__init__(block, list(blocks_per_stage), num_classes=num_classes)
        self.check_input_size_from_now_on(name)
