"""model.build: parameter counts, shapes, LRN, initialisation, grouping, errors.

.venv/bin/python -m pytest -q tests/test_model.py
"""

import pytest
import torch
from torch import nn

from model import ARCHS, INITS, build


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def conv(c_in, c_out, k, groups=1):
    return c_out * (c_in // groups) * k * k + c_out  # weights + biases


def test_alexnet2012_parameter_count_matches_the_layer_shapes():
    expected = (
        conv(3, 96, 11)
        + conv(96, 256, 5, groups=2)
        + conv(256, 384, 3)
        + conv(384, 384, 3, groups=2)
        + conv(384, 256, 3, groups=2)
        + (256 * 6 * 6 * 4096 + 4096)
        + (4096 * 4096 + 4096)
        + (4096 * 1000 + 1000)
    )
    assert expected == 60_965_224
    got = n_params(build("alexnet2012", num_classes=1000))
    assert got == expected
    assert 58_000_000 <= got <= 62_000_000  # the paper: "60 million parameters"


def test_alexnet_torchvision_parameter_count():
    assert n_params(build("alexnet-torchvision", num_classes=1000)) == 61_100_840


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [224, 64])
def test_output_shape(arch, size):
    net = build(arch, num_classes=10).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_lrn_is_the_papers_formula():
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    lrn = build("alexnet2012", num_classes=10).features.norm1.double()
    # Large activations so the alpha term matters: passing the paper's alpha straight to
    # nn.LocalResponseNorm (which divides it by n) would be off by ~20% here.
    a = 50 * torch.randn(2, 11, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    N = a.shape[1]
    expected = torch.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        expected[:, i] = a[:, i] / (k + alpha * s) ** beta
    torch.testing.assert_close(lrn(a), expected, rtol=1e-10, atol=1e-12)


def learned_layers(net):
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_init(arch):
    torch.manual_seed(0)
    layers = learned_layers(build(arch, num_classes=1000, init="paper"))
    assert len(layers) == 8  # conv1..conv5, fc6..fc8
    bias_one = {1, 3, 4, 5, 6}  # conv2, conv4, conv5, fc6, fc7
    for i, layer in enumerate(layers):
        w = layer.weight.detach()
        assert abs(w.std().item() - 0.01) < 0.0005, (i, w.std().item())
        assert abs(w.mean().item()) < 5 * 0.01 / w.numel() ** 0.5, (i, w.mean().item())
        assert torch.equal(layer.bias, torch.full_like(layer.bias, 1.0 if i in bias_one else 0.0)), i


@pytest.mark.parametrize("arch", ARCHS)
def test_kaiming_init_is_he_normal_not_the_papers(arch):
    torch.manual_seed(0)
    layers = learned_layers(build(arch, num_classes=10, init="kaiming"))
    for i, layer in enumerate(layers[:-1]):
        fan_in = layer.weight[0].numel()
        want = (2 / fan_in) ** 0.5  # He et al.: keeps the variance through each ReLU
        assert abs(layer.weight.std().item() - want) < 0.05 * want, (i, layer.weight.std().item(), want)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias)), i
    assert abs(layers[-1].weight.std().item() - 0.01) < 0.001
    assert not torch.equal(layers[1].bias, torch.ones_like(layers[1].bias))


def test_two_tower_grouping():
    f = build("alexnet2012", num_classes=10).features
    assert (f.conv1.groups, f.conv2.groups, f.conv3.groups, f.conv4.groups, f.conv5.groups) == (1, 2, 1, 2, 2)
    assert [
        f.conv1.out_channels,
        f.conv2.out_channels,
        f.conv3.out_channels,
        f.conv4.out_channels,
        f.conv5.out_channels,
    ] == [96, 256, 384, 384, 256]


@pytest.mark.parametrize("kwargs, bad", [({"arch": "resnet50"}, "'resnet50'"), ({"init": "xavier"}, "'xavier'")])
def test_unknown_names_raise(kwargs, bad):
    with pytest.raises(ValueError) as err:
        build(**kwargs)
    msg = str(err.value)
    assert bad in msg
    allowed = ARCHS if "arch" in kwargs else INITS
    assert all(name in msg for name in allowed)
