"""The CUDA paths against their CPU counterparts; run on a GPU machine by benchmarks/gpu_check
(`pytest -m cuda`), skipped elsewhere. Their CPU halves run in CI: tests/test_recipe.py (autocast,
compile), tests/test_data.py (decode="device" with torchvision's CPU decoder)."""

from __future__ import annotations

import pytest
import torch

import model
from pipelines import recipe

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _batch(n=16, crop=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, crop, crop, generator=g), torch.randint(10, (n,), generator=g)


def _net(seed=0):
    torch.manual_seed(seed)
    return model.build("alexnet2012", 10, "kaiming").eval()  # eval: no dropout masks to differ


def _update(after, before) -> torch.Tensor:
    return torch.cat(
        [(a.detach().cpu() - b.detach().cpu()).flatten() for a, b in zip(after.parameters(), before.parameters())]
    )


def test_the_gpu_step_bf16_channels_last_fused_sgd_moves_the_weights_as_the_cpu_float32_step():
    x, y = _batch()
    ref, got, start = _net(), _net(), _net()
    recipe.train_step(ref, recipe.sgd(ref.parameters(), 0.01, 0.9, 5e-4), x, y)
    got = got.cuda().to(memory_format=torch.channels_last)
    opt = recipe.sgd(got.parameters(), 0.01, 0.9, 5e-4)
    assert opt.param_groups[0].get("fused"), "CUDA has a fused SGD: training should use it"
    out, loss = recipe.train_step(
        got, opt, x.cuda().contiguous(memory_format=torch.channels_last), y.cuda(), recipe.amp_dtype("auto", gpu=True)
    )
    assert out.dtype == torch.bfloat16
    want, have = _update(ref, start), _update(got, start)
    assert have.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(have, want, dim=0) > 0.99


def test_the_compiled_network_on_cuda_gives_the_eager_logits():
    x, _ = _batch(8)
    net = _net().cuda().to(memory_format=torch.channels_last)
    x = x.cuda().contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = net(x).float()
        compiled = torch.compile(net)(x).float()
    assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max() + 1e-3


def test_ten_crop_evaluation_on_cuda_scores_as_on_the_cpu():
    """The evaluation transform and forward pass on the GPU (bf16) pick the CPU's classes."""
    x, _ = _batch(4, crop=256)
    tf = model.EvalTransform(224, mean=[0.5] * 3, std=[0.25] * 3, ten_crop=True)
    img = ((x.clamp(-2, 2) + 2) * 63).to(torch.uint8)
    net = _net()
    with torch.no_grad():
        cpu = net(torch.cat([tf(i) for i in img])).view(4, 10, -1).mean(1)
        net = net.cuda().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu = net(torch.cat([tf(i.cuda()) for i in img]).contiguous(memory_format=torch.channels_last))
        gpu = gpu.float().view(4, 10, -1).mean(1).cpu()
    assert torch.equal(cpu.argmax(1), gpu.argmax(1)), (cpu, gpu)
