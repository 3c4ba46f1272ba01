"""The throughput recipe's parts, on CPUs: linear lr scaling and warm-up arithmetic, the CPUs a
training worker reserves, autocast and loss scaling in the training step, DDP's half-precision
gradient all-reduce between two real processes (gloo on loopback), and torch.compile.

    .venv/bin/python -m pytest -q tests/test_recipe.py
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os

import pytest
import torch

import model
from pipelines import recipe, train
from pipelines.config import TrainConfig

from .services import free_port


# --- arithmetic ---------------------------------------------------------------------------------
def test_linear_scaling_multiplies_the_lr_by_the_batch_over_the_reference_batch():
    assert recipe.peak_lr(0.01, 8192, "linear", 128) == pytest.approx(0.64)
    assert recipe.peak_lr(0.01, 64, "linear", 128) == pytest.approx(0.005)
    assert recipe.peak_lr(0.01, 8192, "none", 128) == 0.01
    # Goyal et al. warm up from the reference batch's rate; with nothing to scale, from a tenth
    assert recipe.warmup_from(0.01, 0.64, None) == pytest.approx(1 / 64)
    assert recipe.warmup_from(0.01, 0.01, None) == pytest.approx(0.1)
    assert recipe.warmup_from(0.01, 0.64, 0.5) == 0.5


def test_warmup_rises_linearly_step_by_step_and_ends_at_the_peak():
    steps, start = 10, 0.25
    rates = [recipe.warmup_factor(e, s, steps, 2, start) for e in (1, 2, 3) for s in range(steps)]
    # 20 warm-up steps: the k-th (1-based) is at start + (1 - start) * k / 20, the 20th at 1
    for k, rate in enumerate(rates[:20], 1):
        assert rate == pytest.approx(start + (1 - start) * k / 20)
    assert rates[19] == 1.0 and rates[20:] == [1.0] * 10
    assert all(a < b for a, b in zip(rates[:19], rates[1:20]))
    assert [recipe.warmup_factor(1, s, steps, 0, start) for s in range(steps)] == [1.0] * steps


def test_a_gpu_worker_reserves_its_nodes_cpus_per_gpu_and_at_most_the_cap():
    def node(cpus, gpus=0, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    cfg = TrainConfig(data="x", workers=8)
    # 4 vCPUs per GPU (e.g. 8-GPU nodes with 32 vCPUs): 4, which the old fixed 8 could never place
    assert train.cpus_per_worker(cfg, [node(8), node(32, 8), node(32, 8)], gpu=True) == 4.0
    assert train.cpus_per_worker(cfg, [node(192, 8), node(96, 8)], gpu=True) == 8.0  # 24 and 12 a GPU: the cap
    assert train.cpus_per_worker(cfg, [node(96, 8), node(40, 8, alive=False)], gpu=True) == 8.0
    assert train.cpus_per_worker(cfg, [node(16)], gpu=True) == 8.0  # no GPU node yet (autoscaling): the cap
    assert train.cpus_per_worker(TrainConfig(data="x", workers=2), [node(2)], gpu=False) == 1.0
    assert train.cpus_per_worker(TrainConfig(data="x", workers=3), [node(16), node(16)], gpu=False) == 8.0
    assert train.cpus_per_worker(TrainConfig(data="x", cpus_per_worker=3.0), [node(2)], gpu=True) == 3.0


# --- the training step -------------------------------------------------------------------------
def test_the_fused_sgd_moves_the_weights_as_the_plain_loop_and_survives_a_resume():
    """recipe.sgd takes the fused kernel where torch has it (here, CPU): the same weights and
    momentum after several steps as torch's plain SGD, to float rounding (a rate and decay large
    enough that each term shows); a checkpoint saved by either loads into the other, and the
    loaded optimiser keeps its own kernel."""
    torch.manual_seed(0)
    plain_net = model.build("alexnet2012", 10, "kaiming")
    fused_net = copy.deepcopy(plain_net)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.05)
    plain = torch.optim.SGD(plain_net.parameters(), **hyper)
    fused = recipe.sgd(fused_net.parameters(), **hyper)
    assert fused.param_groups[0]["fused"] is True and plain.param_groups[0]["fused"] is not True
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(plain_net.parameters(), fused_net.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        plain.step()
        fused.step()
    for a, b in zip(plain_net.parameters(), fused_net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            fused.state[b]["momentum_buffer"], plain.state[a]["momentum_buffer"], rtol=1e-5, atol=1e-6
        )
    recipe.load_optimizer(fused, plain.state_dict())  # a checkpoint of the plain loop
    assert fused.param_groups[0]["fused"] is True
    recipe.load_optimizer(plain, fused.state_dict())
    assert plain.param_groups[0]["fused"] is not True


def _one_step(net, amp=None, scaler=None):
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) % 10
    torch.manual_seed(1)  # the same dropout masks for every contender
    out, loss = recipe.train_step(net, opt, x, y, amp, loss_scale=0.25, scaler=scaler)
    return net, out, float(loss.detach())


def _update(after, before) -> torch.Tensor:
    return torch.cat([(a.detach() - b.detach()).flatten() for a, b in zip(after.parameters(), before.parameters())])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_an_autocast_step_moves_the_weights_as_the_float32_step_does(amp):
    """The step of --amp bf16 and of --amp fp16 (with its loss scaling) against float32's: the
    logits in the half type, the loss close, the update pointing the same way."""
    torch.manual_seed(0)
    net = model.build("alexnet2012", 10, "kaiming")
    ref, _, ref_loss = _one_step(net)
    dtype = recipe.amp_dtype(amp, gpu=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if amp == "fp16" else None
    got, out, loss = _one_step(net, dtype, scaler)
    assert out.dtype == dtype
    assert loss == pytest.approx(ref_loss, rel=0.02)
    want, have = _update(ref, net), _update(got, net)
    assert have.abs().sum() > 0, "no step was taken"
    assert torch.nn.functional.cosine_similarity(have, want, dim=0) > 0.99
    assert recipe.amp_dtype("auto", gpu=True) == torch.bfloat16 and recipe.amp_dtype("auto", gpu=False) is None


# --- two processes, gloo ------------------------------------------------------------------------
def _ddp_rank(rank: int, world: int, port: int, compressions: list[str], compile: bool, out: str) -> None:
    """One rank, for each compression in turn: the network of train_loop (prepare_network on
    DDP), two steps of train_step on this rank's own batch with lr 0 (the weights stay, the
    gradients are DDP's result), and the float32 average of every rank's gradients computed by
    hand, to compare with."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = model.build("alexnet2012", 10, "kaiming")
    for m in net.modules():  # no dropout: compiled code draws its masks differently from eager
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(100 + rank))
    y = (torch.arange(4) + rank) % 10
    batch = 4 * world

    ref = copy.deepcopy(net)
    ref.zero_grad()
    loss = torch.nn.functional.cross_entropy(ref(x), y, reduction="sum") * world / batch
    loss.backward()
    want = []
    for q in ref.parameters():
        g = q.grad.clone()
        dist.all_reduce(g)
        want.append(g / world)

    results = {}
    all_reduce = dist.all_reduce
    for compression in compressions:
        sent = []

        def counted(tensor, *args, **kw):  # what crosses the wire (torch's hooks call dist.all_reduce)
            sent.append((str(tensor.dtype), tensor.numel()))
            return all_reduce(tensor, *args, **kw)

        here = copy.deepcopy(net)
        ddp = torch.nn.parallel.DistributedDataParallel(here)
        wrapped = recipe.prepare_network(ddp, grad_compression=compression, compile=compile)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)
        dist.all_reduce = counted
        try:
            for _step in (1, 2):  # the second step's traffic: DDP rebuilds its buckets after the first
                sent.clear()
                recipe.train_step(wrapped, opt, x, y, None, loss_scale=world / batch)
        finally:
            dist.all_reduce = all_reduce
        worst = max(
            float((p.grad - w).abs().max() / w.abs().max().clamp_min(1e-12)) for p, w in zip(here.parameters(), want)
        )
        results[compression] = {
            "sent": sent,
            "params": sum(p.numel() for p in here.parameters()),
            "worst": worst,
            "compiled": type(wrapped).__name__,
        }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "compressions, compile",
    [
        (["bf16", "fp16", "none"], False),
        pytest.param(["bf16"], True, marks=pytest.mark.slow),  # compiling AlexNet takes ~30 s on 2 cores
    ],
    ids=["eager", "compiled"],
)
def test_gradient_compression_halves_the_all_reduce_and_keeps_the_gradients(compressions, compile, tmp_path):
    """Two real processes (gloo on loopback). With compression, every all-reduce of the step
    carries half-precision gradients, one element per parameter: half the bytes of float32. The
    gradients each rank ends with are the float32 average of both ranks' within half precision
    (uncompressed: within float32 rounding). Compiled, the same holds: the hook is what DDP calls."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 2, port, compressions, compile, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    for r in range(2):
        results = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert sorted(results) == sorted(compressions)
        for compression, got in results.items():
            if compression != "none":  # (uncompressed, DDP's reducer all-reduces in C++, unseen here)
                wire = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[compression]
                assert {d for d, _ in got["sent"]} == {wire}, (compression, got["sent"][:3])
                assert sum(n for _, n in got["sent"]) == got["params"]  # each gradient once, 2 bytes, not 4
            # bf16 keeps 8 bits of mantissa (relative 2^-8 per rounding), fp16 11, float32 24
            assert got["worst"] < {"bf16": 2**-6, "fp16": 2**-9, "none": 1e-5}[compression], (compression, got)
            assert got["compiled"] == ("OptimizedModule" if compile else "DistributedDataParallel")


def test_more_cpus_per_worker_than_the_local_ray_has_is_refused(monkeypatch):
    """On a Ray started for the run nothing can add CPUs: 2 workers x 4 CPUs on 2 is refused,
    naming the flag and what fits; 2 x 1 passes."""
    from pipelines.errors import StageError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = TrainConfig(data="x", workers=2, cpus_per_worker=4.0)
    with pytest.raises(
        StageError,
        match=r"--workers 2 with --cpus-per-worker 4 needs 8 CPUs .* has 2: "
        r"use --cpus-per-worker 1 or fewer",
    ):
        train._check_capacity(cfg, {"CPU": 2.0}, gpu=False, cpus=4.0)
    train._check_capacity(cfg, {"CPU": 2.0}, gpu=False, cpus=1.0)
