"""AlexNet and its transforms. Imports torch/torchvision only: no Ray, MLflow or storage here.

from model import build
net = build("alexnet2012", num_classes=1000, init="paper")
"""

import contextlib

import torch
from torch import nn

from .alexnet import AlexNet2012, kaiming_init_, paper_init_
from .transforms import EvalTransform, Lighting, TrainTransform, ten_crop_predict

# alexnet2012: the paper's two-tower net with LRN (grouped convs, ~61.0M params at 1000 classes).
# alexnet-torchvision: the later single-tower "one weird trick" widths, no LRN (61.1M params).
ARCHS = ("alexnet2012", "alexnet-torchvision")
# paper: N(0, 0.01) weights, bias 1 in conv2/4/5 and fc6/7 (section 5).
# kaiming: He et al.'s N(0, 2/fan_in) for the ReLU layers, which learns on small data at once.
# The team saw the paper init sit at chance on a 1,200-image / 20-class set; on the demo data
# PyTorch's default init (kaiming_uniform, a=sqrt(5)) sat at chance too, He init did not
# (see kaiming_init_).
INITS = ("paper", "kaiming")


def build(
    arch: str = "alexnet2012", num_classes: int = 1000, init: str | None = "paper", device: str | None = None
) -> nn.Module:
    """Return an untrained network that maps N x 3 x H x W (H, W >= 64) to N x num_classes logits.
    ``device``: where its parameters are made; "meta" gives shapes without memory or values, for
    weights loaded next with ``load_state_dict(..., assign=True)``. ``init=None`` leaves
    PyTorch's default initialisation (on the meta device ours cost ~1 s the first time)."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch {arch!r}. Expected one of: {', '.join(ARCHS)}.")
    if init is not None and init not in INITS:
        raise ValueError(f"Unknown init {init!r}. Expected one of: {', '.join(INITS)}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    if arch == "alexnet-torchvision":
        import torchvision  # here only: importing it costs ~1 s, which the paper's net does not need
    # (imported before the device context: tensors made at import time belong on the CPU)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if arch == "alexnet2012":
            net = AlexNet2012(num_classes=num_classes)
        else:
            net = torchvision.models.alexnet(weights=None, num_classes=num_classes)
        if init is not None:
            (paper_init_ if init == "paper" else kaiming_init_)(net)
    return net


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-k hits) of N x classes scores (logits or probabilities) against N labels,
    as tensors on the scores' device (no sync). Training and evaluation both count with this."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum()


__all__ = [
    "topk_hits",
    "ARCHS",
    "INITS",
    "AlexNet2012",
    "EvalTransform",
    "Lighting",
    "TrainTransform",
    "build",
    "kaiming_init_",
    "paper_init_",
    "ten_crop_predict",
]
