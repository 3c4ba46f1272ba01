"""The 2012 AlexNet (Krizhevsky, Sutskever, Hinton, NIPS 2012) and its initialisation.

    from model import build
    net = build("alexnet2012", num_classes=1000, init="paper")

Section numbers below refer to the paper. The two-GPU split of section 3.2 is expressed with
grouped convolutions: a layer whose kernels see only the maps on their own GPU is `groups=2`,
a layer that talks across GPUs is a plain convolution.
"""

from collections import OrderedDict

import torch
from torch import nn

# LRN constants of section 3.3. torch.nn.LocalResponseNorm computes
# b = a / (k + alpha / n * sum a^2)^beta, i.e. it divides alpha by n; the paper's formula has no
# 1/n, so we hand it alpha * n to get the paper's normalisation exactly.
LRN_K, LRN_N, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(size=LRN_N, alpha=LRN_ALPHA * LRN_N, beta=LRN_BETA, k=LRN_K)


class AlexNet2012(nn.Module):
    """The paper's network (section 3.5, figure 2), two towers folded into grouped convs.

    Input 3 x 224 x 224 (or any crop down to 64 px, thanks to the adaptive pool); output logits.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    # Figure 2 says 224 px in, 55 x 55 out, which does not add up for 11x11 stride 4
                    # without padding ((224 - 11) / 4 + 1 = 54.25). Padding 2 gives exactly 55 x 55 (as
                    # torchvision does); 227 px without padding would too. conv1 is split over the two
                    # GPUs but each half sees all three input channels, so it is an ordinary conv.
                    ("conv1", nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("norm1", _lrn()),  # section 3.3
                    ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),  # overlapping pooling, 3.4
                    # conv2 kernels see only the 48 conv1 maps on their own GPU (section 3.5).
                    ("conv2", nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("norm2", _lrn()),
                    ("pool2", nn.MaxPool2d(kernel_size=3, stride=2)),
                    # conv3 is where the GPUs communicate: full connectivity to all 256 conv2 maps.
                    ("conv3", nn.Conv2d(256, 384, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2)),
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2)),
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", nn.MaxPool2d(kernel_size=3, stride=2)),
                ]
            )
        )
        # 224 px input gives 6 x 6 here already (a no-op); smaller crops (down to 64 px -> 1 x 1)
        # are stretched to 6 x 6 so the same fc6 works in the small CI mode.
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        # Dropout before fc6 and fc7 (section 4.2), placed as torchvision's alexnet does.
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("drop6", nn.Dropout(dropout)),
                    ("fc6", nn.Linear(256 * 6 * 6, 4096)),
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(dropout)),
                    ("fc7", nn.Linear(4096, 4096)),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("fc8", nn.Linear(4096, num_classes)),  # softmax lives in the loss
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# Position (among the eight learned layers conv1..conv5, fc6..fc8) of the layers whose biases
# start at 1: conv2, conv4, conv5, fc6, fc7 (section 5). Positive biases give the ReLUs
# positive inputs early on, which the paper says accelerates the early stages of learning.
_BIAS_ONE = {1, 3, 4, 5, 6}


@torch.no_grad()
def paper_init_(model: nn.Module) -> nn.Module:
    """Section 5: weights ~ N(0, 0.01), biases 1 in conv2/4/5 and fc6/7, 0 elsewhere.

    Works for both archs: each has exactly eight Conv2d/Linear layers, in the same order.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(layers) != 8:
        raise ValueError(f"paper init expects 8 conv/linear layers (conv1..fc8), found {len(layers)}")
    for i, layer in enumerate(layers):
        nn.init.normal_(layer.weight, mean=0.0, std=0.01)
        nn.init.constant_(layer.bias, 1.0 if i in _BIAS_ONE else 0.0)
    return model


def kaiming_init_(model: nn.Module) -> nn.Module:
    """He et al. 2015: weights ~ N(0, 2 / fan_in) for every ReLU layer, fc8 ~ N(0, 0.01), biases 0.

    Keeps the activations' scale through the ReLUs, so small runs start learning at once.
    Measured on the demo data (10 classes, 600 images, 64 px, lr 0.01, batch 64, one process):
    this init reached 80% val top-1 after 3 epochs, where PyTorch's default init
    (kaiming_uniform with a=sqrt(5), variance 1/(3 fan_in)) still sat at chance (loss 2.303)
    and the paper's N(0, 0.01) does too on small data.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers[:-1]:
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    nn.init.normal_(layers[-1].weight, mean=0.0, std=0.01)  # small logits: loss starts at ln(classes)
    nn.init.zeros_(layers[-1].bias)
    return model
