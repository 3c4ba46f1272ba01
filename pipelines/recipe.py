"""The training recipe's pieces: the optimiser, the learning-rate schedule and warm-up, autocast,
gradient compression, and one SGD step. Pure functions of their arguments, the same on the
driver (which checks and records them) and on every worker (which trains with them).

The defaults are the paper's (section 5): SGD with momentum 0.9 and weight decay 5e-4, lr 0.01
divided by 10 when the validation error stops improving. The rest serves many GPUs: a larger
batch with the linear scaling rule and a warm-up (Goyal et al. 2017), bf16 autocast, and the
gradients all-reduced in half precision.
"""

from __future__ import annotations

SCHEDULES = ("plateau", "step", "cosine")
AMPS = ("auto", "bf16", "fp16", "off")
LR_SCALINGS = ("none", "linear")
GRAD_COMPRESSIONS = ("none", "bf16", "fp16")


def scheduler(opt, c: dict):
    import torch

    if c["schedule"] == "plateau":
        # Section 5: divide by 10 when the validation error stops improving.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=0.1, patience=c["patience"], min_lr=c["min_lr"]
        )
    if c["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=c["step_size"], gamma=0.1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c["epochs"], eta_min=c["min_lr"])


def peak_lr(lr: float, batch_size: int, scaling: str, reference_batch: int) -> float:
    """The learning rate after warm-up. linear: ``lr`` was set for ``reference_batch`` samples a
    step and the rate grows with the batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD"):
    k times the batch, k times fewer steps of k times the size."""
    return lr * batch_size / reference_batch if scaling == "linear" else lr


def warmup_from(lr: float, peak: float, start: float | None) -> float:
    """The fraction of the peak rate that warm-up starts at: ``start`` when given; else the rate
    the reference batch would use (Goyal et al. start at it), or a tenth when the peak is no higher."""
    if start is not None:
        return start
    return lr / peak if peak > lr else 0.1


def warmup_factor(epoch: int, step: int, epoch_steps: int, warmup_epochs: int, start: float) -> float:
    """The multiplier of the scheduled lr at ``step`` (0-based) of ``epoch`` (1-based): rising
    linearly, step by step, from ``start`` to 1 over the first ``warmup_epochs`` epochs, then 1.
    A function of the position only, so a run resumed mid-warm-up steps at the same rates."""
    total = warmup_epochs * epoch_steps
    done = (epoch - 1) * epoch_steps + step + 1
    if warmup_epochs <= 0 or done >= total:
        return 1.0
    return start + (1.0 - start) * done / total


def resolve_amp(amp: str, gpu: bool) -> str:
    """--amp with auto made concrete: bf16 on a GPU, off on CPUs."""
    return ("bf16" if gpu else "off") if amp == "auto" else amp


def amp_dtype(amp: str, gpu: bool):
    """The autocast dtype of --amp (None: float32 throughout)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[resolve_amp(amp, gpu)]


def prepare_network(net, *, grad_compression: str = "none", compile: bool = False):
    """What the worker does to the network after Ray Train's prepare_model: DDP's gradient
    all-reduce in half precision (``grad_compression``), then torch.compile. Compiling the DDP
    wrapper (not its module) lets Dynamo split the graph at DDP's buckets, so the all-reduce of
    one bucket overlaps the backward of the next. Returns the network to train; its weights are
    the module's own, so checkpoints keep reading ``net.module``."""
    import torch

    if grad_compression != "none" and isinstance(net, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # Each bucket is cast to the half type, divided by the world size, all-reduced and cast
        # back: half the bytes on the wire; the optimizer still sees float32 gradients.
        hook = default_hooks.bf16_compress_hook if grad_compression == "bf16" else default_hooks.fp16_compress_hook
        net.register_comm_hook(None, hook)
    if compile:
        net = torch.compile(net)
    return net


def sgd(params, lr: float, momentum: float, weight_decay: float):
    """The paper's SGD (momentum, weight decay), as one fused kernel per step where this torch has
    one for the parameters' device: the same arithmetic to float rounding (tests/test_recipe.py), and
    on a CPU a sixth of the time (AlexNet's ~60M parameters: 0.03 s against 0.18 s a step on one
    core, run apart from the benchmarks with torch 2.14). A trial step on one element decides, so
    an older torch or another device gets the plain loop rather than an error mid-run."""
    import torch

    params = list(params)
    try:
        probe = torch.zeros(1, device=params[0].device, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        torch.optim.SGD([probe], lr=0.1, momentum=0.9, weight_decay=0.1, fused=True).step()
        fused = True
    except (RuntimeError, TypeError, ValueError):
        fused = False
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, **({"fused": True} if fused else {})
    )


def load_optimizer(opt, state: dict) -> None:
    """``opt.load_state_dict(state)``, keeping this machine's kernel choice: the state's param
    groups carry the fused/foreach flags of the machine that saved it."""
    kernel = [{k: g.get(k) for k in ("fused", "foreach")} for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, k in zip(opt.param_groups, kernel):
        g.update(k)


def train_step(net, opt, x, y, amp=None, loss_scale: float | None = None, scaler=None):
    """One SGD step on a normalised float batch, under autocast to ``amp`` (a torch dtype, or
    None for float32); returns (logits, loss). benchmarks/gpu.py times this same function.

    ``loss_scale``: the gradient is of sum(losses) * loss_scale instead of their mean. With
    loss_scale = world / global batch, DDP's average over ranks makes it the mean over the
    global batch, so every sample weighs the same when ranks hold different batch sizes (a
    global batch that does not divide by the world size).
    ``scaler``: a torch.amp.GradScaler, which fp16 needs (its gradients underflow without one)."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = net(x)
        if loss_scale is None:
            loss = F.cross_entropy(out, y)
        else:
            loss = F.cross_entropy(out.float(), y, reduction="sum") * loss_scale
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:  # skips the step (and lowers the scale) when a gradient overflowed
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return out, loss
