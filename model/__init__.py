"""AlexNet and its transforms. Imports torch/torchvision only: no Ray, MLflow or storage here.

    from model import build
    net = build("alexnet2012", num_classes=1000, init="paper")
"""
import torchvision
from torch import nn

from .alexnet import AlexNet2012, paper_init_
from .transforms import EvalTransform, Lighting, TrainTransform, ten_crop_predict

# alexnet2012: the paper's two-tower net with LRN (grouped convs, ~61.0M params at 1000 classes).
# alexnet-torchvision: the later single-tower "one weird trick" widths, no LRN (61.1M params).
ARCHS = ("alexnet2012", "alexnet-torchvision")
# paper: N(0, 0.01) weights, bias 1 in conv2/4/5 and fc6/7 (section 5).
# kaiming: PyTorch's own nn.Conv2d/nn.Linear reset_parameters (kaiming_uniform, a=sqrt(5)),
# which torchvision's alexnet keeps. The team measured that it learns on small data where the
# paper init does not (1,200 images / 20 classes: paper init at chance after 6 epochs,
# default init 73% top-1 after 12).
INITS = ("paper", "kaiming")


def build(arch: str = "alexnet2012", num_classes: int = 1000, init: str = "paper") -> nn.Module:
    """Return an untrained network that maps N x 3 x H x W (H, W >= 64) to N x num_classes logits."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}. Expected one of: {', '.join(ARCHS)}.")
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}. Expected one of: {', '.join(INITS)}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    if arch == "alexnet2012":
        net = AlexNet2012(num_classes=num_classes)
    else:
        net = torchvision.models.alexnet(weights=None, num_classes=num_classes)
    if init == "paper":
        paper_init_(net)
    return net


__all__ = ["ARCHS", "INITS", "AlexNet2012", "EvalTransform", "Lighting", "TrainTransform",
           "build", "paper_init_", "ten_crop_predict"]
