"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document recognition",
Proc. IEEE 1998, section II.B): the registry's cheapest model, for fast pipeline tests."""

from __future__ import annotations

from torch import nn

from models.convnet import ConvNet

KERNEL_SIDE = 5
C1_MAPS = 6
C3_MAPS = 16
# S4's output side at the paper's 32x32 input, which C5's 5x5 kernels cover exactly.
POOLED_SIDE = 5
C5_UNITS = 120
F6_UNITS = 84


def lenet5(num_classes: int) -> ConvNet:
    """The paper's C1-S2-C3-S4-C5-F6-output layout for RGB inputs of the paper's 32x32 pixels or larger
    (the paper's digits were grey; the layers themselves accept 16 pixels up, min_resolution).

    As in the paper: 5x5 convolutions C1 (6 maps) and C3 (16 maps), 2x2 average subsampling S2 and S4,
    C5 with 120 units, F6 with 84, tanh squashing. Departures: plain tanh rather than the paper's
    1.7159 tanh(2a/3); S2 and S4 average without the paper's trainable coefficient and bias per map;
    C3 sees all six S2 maps instead of the paper's partial connection table (Table I); the output
    layer is linear (class scores for a cross-entropy loss) instead of Euclidean RBF units; an
    adaptive average pool brings S4's output to 5x5 for larger inputs, so C5 is a fully connected
    layer on 16x5x5 values, which is what the paper's C5 convolution computes at 32x32.

    Weights keep PyTorch's default initialisation, U(-1/sqrt(F), 1/sqrt(F)) for fan-in F, because it
    learns in the few epochs of a pipeline test: on scikit-learn's 1,797 digits (upscaled to 32, 72 or
    80 pixels, RGB, ImageNet-normalised; 80% for training, SGD lr 0.01, momentum 0.9, batch 32),
    2 epochs gave 10-14% validation top-1 error over three seeds at each side. The paper's
    U(-2.4/F, 2.4/F) (appendix A), made for its scaled tanh and second-order training (appendix C),
    draws weights 3.6 to 8 times smaller per layer; it stayed at chance (90% error) in the same runs,
    and still after 10 epochs at 32 pixels.

    The layer table names the layers by the registry's AlexNet convention: conv1 = C1, pool1 = S2,
    conv2 = C3, pool2 = S4, fc3 = C5, fc4 = F6, fc5 = output.

    Parameters with 3 input channels, weights + biases:
        C1      6 x (3 x 5 x 5) + 6     =    456
        C3     16 x (6 x 5 x 5) + 16    =  2,416
        C5    120 x (16 x 5 x 5) + 120  = 48,120
        F6     84 x 120 + 84            = 10,164
        output num_classes x 84 + num_classes
    in all 61,156 + 85 x num_classes: 62,006 for 10 classes, 146,156 for 1,000.
    """
    features = nn.Sequential(
        nn.Conv2d(3, C1_MAPS, kernel_size=KERNEL_SIDE),
        nn.Tanh(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(C1_MAPS, C3_MAPS, kernel_size=KERNEL_SIDE),
        nn.Tanh(),
        nn.AvgPool2d(kernel_size=2, stride=2),
    )
    classifier = nn.Sequential(
        nn.Linear(C3_MAPS * POOLED_SIDE * POOLED_SIDE, C5_UNITS),
        nn.Tanh(),
        nn.Linear(C5_UNITS, F6_UNITS),
        nn.Tanh(),
        nn.Linear(F6_UNITS, num_classes),
    )
    return ConvNet("lenet5", features, POOLED_SIDE, classifier)
