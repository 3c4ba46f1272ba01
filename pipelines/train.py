"""Training: the 2012 AlexNet on Ray Train data-parallel workers, tracked in MLflow.

    python -m pipelines train --data /data/alexnet --workers 8 --gpu --name alexnet-paper
    python -m pipelines train --data s3://bucket/imagenet --workers 4-8 --gpu --name spot   # elastic

The only module that joins the model, the data, Ray Train and tracking. The loop is written
out (zero_grad / forward / backward / step) in train_one_epoch(), validation in validate();
Ray Train's prepare_model makes it data-parallel. pipelines/plan.py decides which samples each
rank reads at every step; checkpoints (pipelines/checkpoint.py) are written every
``--checkpoint-every`` steps and at each epoch's end, holding the plan's position, so a rerun of
the same --name, a worker restarted by FailureConfig, or a worker group resized by elastic
training (``--workers MIN-MAX``) continues at the step after the last checkpoint, inside the same
MLflow run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import tempfile
import time

from . import checkpoint, contract, storage, tracking
from .cluster import ensure_ray, on_cluster
from .common import fmt_seconds, now_iso
from .config import TrainConfig
from .errors import StageError

# Workers log through logging, not print: Ray Train tees print() when MLflow has wrapped
# stderr, and every line would reach the driver twice.
log = logging.getLogger("pipelines.train")
SCHEDULES = ("plateau", "step", "cosine")
AMPS = ("auto", "bf16", "fp16", "off")
LR_SCALINGS = ("none", "linear")
GRAD_COMPRESSIONS = ("none", "bf16", "fp16")
METRICS = (
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "images_per_second",
    "data_wait_fraction",
)


def _scheduler(opt, c: dict):
    import torch

    if c["schedule"] == "plateau":
        # Section 5: divide by 10 when the validation error stops improving.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=0.1, patience=c["patience"], min_lr=c["min_lr"]
        )
    if c["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=c["step_size"], gamma=0.1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c["epochs"], eta_min=c["min_lr"])


# --- the recipe's arithmetic: pure functions, the same on the driver and on every worker ----------
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
    """What train_loop does to the network after Ray Train's prepare_model: DDP's gradient
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


class Sums:
    """Metric sums by name, kept on the device (reading a value back each step would stall a
    GPU) and all-reduced across ranks as one tensor."""

    def __init__(self, names, device, start: dict | None = None):
        import torch

        self.names = tuple(names)
        self.t = torch.tensor(
            [float((start or {}).get(n, 0.0)) for n in self.names], dtype=torch.float64, device=device
        )

    def add(self, **values) -> None:
        for k, v in values.items():
            self.t[self.names.index(k)] += v

    def all_reduce(self) -> Sums:
        """A copy summed over every rank (each rank must call it)."""
        import torch.distributed as dist

        out = Sums(self.names, self.t.device)
        out.t = self.t.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(out.t)
        return out

    def values(self) -> dict:
        return dict(zip(self.names, self.t.tolist()))


# --- one worker -------------------------------------------------------------------------------
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


def validate(
    net,
    shards,
    transform,
    *,
    device,
    rank: int,
    world: int,
    batch_size: int,
    loader_workers: int,
    gpu: bool,
    channels_last: bool,
    decode: str,
    amp=None,
) -> Sums:
    """This rank's share of the val samples (every sample once across ranks), centre crop:
    loss sum, top-1 and top-5 hits, images. The caller all-reduces."""
    import torch
    import torch.nn.functional as F

    import model

    from . import data

    sums = Sums(("loss", "top1", "top5", "images"), device)
    net.eval()
    with torch.inference_mode():
        loader = data.eval_loader(
            shards,
            transform,
            batch_size=batch_size,
            rank=rank,
            world=world,
            num_workers=loader_workers,
            pin_memory=gpu,
            decode=decode,
        )
        for x, y, _keys in data.on_device(loader, device):
            x = transform.photometric(x)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = net(x).float()
            top1, top5 = model.topk_hits(out, y)
            sums.add(loss=F.cross_entropy(out, y, reduction="sum").double(), top1=top1, top5=top5, images=len(y))
    return sums


def train_one_epoch(
    net,
    opt,
    batches,
    steps: range,
    transform,
    sums: Sums,
    *,
    gpu: bool,
    channels_last: bool,
    loss_scale: float,
    seed: int,
    epoch: int,
    rank: int,
    after_step,
    before_step=None,
    amp=None,
    scaler=None,
) -> float:
    """The steps ``steps`` (epoch step numbers) of one epoch; returns the seconds spent waiting
    for data. ``before_step(step)`` runs before each step (the warm-up's lr),
    ``after_step(step, keys)`` after it (sample ledger, checkpoints)."""
    import torch

    import model

    from . import plan

    net.train()
    waited, x_float = 0.0, None  # on a CPU, each step's float batch is written into the last one's memory
    for step in steps:
        tw = time.perf_counter()
        x, y, keys = next(batches)  # uint8 on the device; with decode="device" the decode happens here
        waited += time.perf_counter() - tw
        # Every random draw of a step (dropout, PCA lighting) comes from (seed, epoch, step, rank),
        # as each sample's crop comes from (seed, epoch, sample): a run resumed at any step
        # replays the rest of the epoch exactly as an uninterrupted run does.
        torch.manual_seed(plan.seed_for(seed, epoch, step, rank, "torch"))
        if channels_last:  # before the float conversion, which keeps the layout: a quarter of the bytes
            x = x.contiguous(memory_format=torch.channels_last)
        x = transform.photometric(x, out=x_float)  # float, PCA lighting, normalise: batched, on the device
        if not gpu:  # (CUDA's caching allocator reuses memory by itself)
            x_float = x
        if before_step is not None:
            before_step(step)
        out, loss = train_step(net, opt, x, y, amp, loss_scale, scaler)
        top1, _ = model.topk_hits(out.detach(), y, k=1)
        sums.add(loss=loss.detach().double() / loss_scale, top1=top1, images=len(y))
        after_step(step, keys)
    return waited


def _agree(value: float, device, op: str = "max") -> float:
    """The same number on every rank (its max over ranks)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t[0])


class Ledger:
    """The sample ledger (--ledger DIR, a debugging aid): every rank appends, per step, the keys it
    trained on to DIR/rank<R>-attempt<A>.jsonl. An attempt is one start of the worker group; a
    restart redoes the steps after its checkpoint, so for each (epoch, step) the entries of the
    latest attempt that reached it are the ones in the model (tests/test_train.py reads it so)."""

    def __init__(self, folder: str | None, rank: int, world: int, attempt: int):
        self.f = None
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.f = open(os.path.join(folder, f"rank{rank:03d}-attempt{attempt}.jsonl"), "a")
        self.rank, self.world, self.attempt = rank, world, attempt

    def write(self, epoch: int, step: int, keys) -> None:
        if self.f:
            self.f.write(
                json.dumps(
                    {
                        "epoch": epoch,
                        "step": step,
                        "rank": self.rank,
                        "world": self.world,
                        "attempt": self.attempt,
                        "pid": os.getpid(),
                        "keys": list(keys),
                    }
                )
                + "\n"
            )
            self.f.flush()


def train_loop(c: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model

    import model

    from . import data, plan

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray Train names one of its loggers by file path, outside the `ray.train` level its
    # LoggingConfig sets (run()): it would print a 500-character line per report and rank.
    for logger_name in list(logging.root.manager.loggerDict):
        if logger_name.endswith(".py") and f"{os.sep}ray{os.sep}train{os.sep}" in logger_name:
            logging.getLogger(logger_name).setLevel(logging.WARNING)
    device = get_device()
    gpu = device.type == "cuda"
    nhwc = gpu if c["channels_last"] is None else c["channels_last"]
    torch.manual_seed(c["seed"])
    net = model.build(c["arch"], c["num_classes"], c["init"])
    if nhwc:
        net = net.to(memory_format=torch.channels_last)
    net = prepare_model(net)
    raw = net.module if hasattr(net, "module") else net  # the weights, whatever wraps them
    net = prepare_network(net, grad_compression=c["grad_compression"], compile=c["compile"])
    amp = amp_dtype(c["amp"], gpu)
    # fp16's narrow range needs loss scaling; bf16 has float32's range and needs none
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    batch = c["batch_size"]
    peak = peak_lr(c["lr"], batch, c["lr_scaling"], c["lr_reference_batch"])
    warm_start = warmup_from(c["lr"], peak, c["warmup_start"])
    opt = sgd(net.parameters(), lr=peak, momentum=c["momentum"], weight_decay=c["weight_decay"])
    sched = _scheduler(opt, c)
    history, position = [], {"epoch": 1, "segments": [], "sums": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = checkpoint.load(d)
        raw.load_state_dict(state["model"])
        load_optimizer(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, position = state["history"], state["position"]
        done = sum(s[2] for s in position["segments"])
        log.info(
            "rank %d resumed after epoch %d%s, on %d workers",
            rank,
            state["epoch"],
            f", at step {done} of epoch {position['epoch']}" if done else "",
            world,
        )
    if rank == 0:
        os.environ["MLFLOW_TRACKING_URI"] = c["tracking_uri"]
        # Fail fast while the server is away (MLflow would otherwise retry for minutes inside
        # one call and stall training); _log_history catches up at the next epoch.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        _log_history(c["run_id"], history)  # epochs a crash left unlogged
        monitor = _system_metrics(c["run_id"], c["tracking_uri"])
        mlflow_thread, logging_now = concurrent.futures.ThreadPoolExecutor(1, "mlflow-log"), None

    # Which node each rank of this worker group runs on: the checkpoint keeps it, the driver's
    # summary names the nodes that did the work.
    here = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
    placement = [here]
    if world > 1:
        import torch.distributed as dist

        placement = [None] * world
        dist.all_gather_object(placement, here)

    train_tf = model.TrainTransform.from_stats(c["stats"], crop=c["crop"], alphastd=c["lighting"])
    eval_tf = model.EvalTransform.from_stats(c["stats"], crop=c["crop"])
    per_rank = plan.rank_batches(batch, world)[rank]
    loss_scale = world / batch  # every sample the same weight, even with uneven per-rank batches
    loader_workers = c["loader_workers"]
    if loader_workers is None:  # a GPU worker's CPUs decode and crop for it; on CPUs they train
        loader_workers = max(1, int(c["cpus_per_worker"] or 1)) if gpu else 1
    if rank == 0:  # CPU speed depends on it; Ray sets OMP_NUM_THREADS to the worker's CPUs
        log.info(
            "rank 0 on %s, %d torch threads, %d loader workers, autocast %s%s%s%s",
            device,
            torch.get_num_threads(),
            loader_workers,
            amp or "off",
            ", channels_last" if nhwc else "",
            ", compiled" if c["compile"] else "",
            f", gradients all-reduced in {c['grad_compression']}"
            if world > 1 and c["grad_compression"] != "none"
            else "",
        )
    decode = data.choose_decode(c["decode"], device)  # nvjpeg on a GPU
    counts = [n for _, n in c["train_shards"]]
    every = c["checkpoint_every"]  # None: measured below, about every checkpoint_interval_s
    ledger = Ledger(c.get("ledger"), rank, world, int(_agree(time.time() * 1000, device)))
    steps_here = 0  # steps this process trained, for the step-time measurement

    def save(epoch: int, segments, sums: Sums, metrics: dict) -> None:
        """Every rank calls it; rank 0 writes the checkpoint (mid-epoch: segments and sums set)."""
        if segments is None:  # the epoch is finished: the next starts from its beginning
            finished, position = epoch, {"epoch": epoch + 1, "segments": [], "sums": None}
        else:
            finished, position = epoch - 1, {"epoch": epoch, "segments": segments, "sums": sums.values()}
        if rank != 0:
            ray.train.report(metrics)
            return
        t = time.perf_counter()
        state = {
            "model": raw.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": finished,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": history,
            "position": position,
            "config": {
                k: c[k]
                for k in ("arch", "num_classes", "crop", "init", "seed", "classes_digest", "resize", "keep_aspect")
            },
            "wnids": c["wnids"],
            "stats": c["stats"],
            "workers": placement,
            "saved_at": now_iso(),
        }
        # Every rank waits until the checkpoint is registered, so a checkpoint is never behind
        # the training it describes. (Ray's ASYNC upload lets training run on while a 0.5 GB
        # upload goes to S3: a node lost then resumes from further back.)
        if not c.get("storage") or storage.is_s3(c["storage"]):  # written here, uploaded by Ray Train
            with tempfile.TemporaryDirectory() as d:
                checkpoint.save(state, d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            # Straight into the run's folder, where Ray Train would otherwise copy it from a
            # temporary one: the ~0.5 GB written once rather than written, read and written again.
            # Named as Ray names its own; registered only by the report, after it is complete.
            name = "checkpoint_" + datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
            d = os.path.join(c["storage"], c["name"], name)
            os.makedirs(d)
            checkpoint.save(state, d)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(d),
                checkpoint_dir_name=name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
            )
        log.info(
            "checkpoint at epoch %d%s saved in %.1f s",
            epoch,
            f" step {sum(s[2] for s in segments)}" if segments else " end",
            time.perf_counter() - t,
        )

    def epoch_loader(epoch: int, earlier) -> tuple:
        """(segment, loader, its started iterator) of this rank's batches in ``epoch``. iter()
        starts the loader workers, which begin filling their prefetch queues at once."""
        seg = plan.epoch_plan(
            counts,
            seed=c["seed"],
            epoch=epoch,
            batch_size=batch,
            world=world,
            loader_workers=loader_workers,
            buffer=c["shuffle_buffer"],
            segments=earlier,
        )
        loader = data.train_loader(c["train_shards"], train_tf, segment=seg, rank=rank, pin_memory=gpu, decode=decode)
        return seg, loader, iter(loader)

    upcoming = None  # the next epoch's loader, started while this one validates and checkpoints
    for epoch in range(position["epoch"], c["epochs"] + 1):
        earlier = position["segments"] if epoch == position["epoch"] else []
        t0 = time.perf_counter()
        if c.get("synthetic_steps"):
            # benchmarks/train_step.py: this loop on one fixed random batch, no data pipeline
            fixed = data.synthetic_batches(per_rank, c["crop"], c["num_classes"], c["synthetic_steps"], device)
            batches = ((x, y, ()) for x, y in fixed)
            seg, steps = None, range(c["synthetic_steps"])
        else:
            seg, loader, started = upcoming if upcoming is not None else epoch_loader(epoch, earlier)
            upcoming = None
            if seg.start == 0 and seg.index > 0 and rank == 0:
                log.info(
                    "epoch %d: %d steps done on another world size; the %d samples not yet read are dealt "
                    "over %d workers (%d steps left)",
                    epoch,
                    seg.first_step,
                    len(seg.order),
                    world,
                    seg.steps,
                )
            batches = data.on_device(loader, device, started)
            steps = range(seg.first_step + seg.start, seg.epoch_steps)
        resumed = position["sums"] if (earlier and rank == 0) else None
        sums = Sums(("loss", "top1", "images"), device, resumed)
        scheduled = list(sched.get_last_lr())  # the epoch's rate, which the warm-up scales step by step
        epoch_steps = seg.epoch_steps if seg is not None else len(steps)

        def before_step(step: int) -> None:
            f = warmup_factor(epoch, step, epoch_steps, c["warmup_epochs"], warm_start)
            for group, rate in zip(opt.param_groups, scheduled):
                group["lr"] = rate * f

        trained, probe = [0], None  # a measurement spans no epoch end (validation is not a step)

        # Progress inside an epoch (ImageNet's are ~10,000 steps): rank 0, a tenth of an epoch apart.
        report = c.get("progress_every") or max(1, (seg.epoch_steps if seg is not None else 1) // 10)

        def after_step(step: int, keys) -> None:
            nonlocal every, probe, steps_here
            ledger.write(epoch, step, keys)
            trained[0] += 1
            steps_here += 1
            if rank == 0 and seg is not None and (step + 1) % report == 0 and step + 1 < seg.epoch_steps:
                took = time.perf_counter() - t0
                step_s = took / trained[0]
                epoch_left = (seg.epoch_steps - step - 1) * step_s
                log.info(
                    "epoch %d/%d step %d/%d: %.0f images/s, epoch ETA %s, run ETA %s",
                    epoch,
                    c["epochs"],
                    step + 1,
                    seg.epoch_steps,
                    trained[0] * batch / took,
                    fmt_seconds(epoch_left),
                    fmt_seconds(epoch_left + (c["epochs"] - epoch) * seg.epoch_steps * step_s),
                )
            if every is None and seg is not None:  # measure the step time once, then fix the interval
                if probe is None and trained[0] == 3:  # after the loader's warm-up
                    probe = (steps_here, time.perf_counter())
                elif probe is not None and steps_here == probe[0] + 20:
                    step_s = _agree((time.perf_counter() - probe[1]) / 20, device)
                    every = max(1, math.ceil(c["checkpoint_interval_s"] / step_s))
                    if rank == 0:
                        log.info("%.3f s a step: a checkpoint every %d steps (--checkpoint-every)", step_s, every)
            if seg is not None and every and (step + 1) % every == 0 and step + 1 < seg.epoch_steps:
                done = [*[list(s) for s in earlier[: seg.index]], [world, loader_workers, step + 1 - seg.first_step]]
                so_far = sums.all_reduce()
                if math.isfinite(so_far.values()["loss"]):  # a diverged epoch is not saved (its end stops the run)
                    save(epoch, done, so_far, {"epoch": epoch, "step": step + 1, "checkpoint_score": -1.0})

        warming = epoch <= c["warmup_epochs"]
        waited = train_one_epoch(
            net,
            opt,
            batches,
            steps,
            train_tf,
            sums,
            gpu=gpu,
            channels_last=nhwc,
            loss_scale=loss_scale,
            seed=c["seed"],
            epoch=epoch,
            rank=rank,
            after_step=after_step,
            before_step=before_step if warming else None,
            amp=amp,
            scaler=scaler,
        )
        del batches
        if seg is not None and epoch < c["epochs"]:
            # Starting workers and reading their first batches takes ~1 s an epoch (more with
            # many workers and large shuffle buffers); done now, it overlaps validation and the
            # checkpoint. The next epoch starts at its beginning, whatever this one was.
            upcoming = epoch_loader(epoch + 1, [])
        if warming:  # the schedulers step from the epoch's scheduled rate, not the warmed one
            for group, rate in zip(opt.param_groups, scheduled):
                group["lr"] = rate
        seconds = _agree(time.perf_counter() - t0, device)
        wait_s = _agree(waited, device)
        fresh = _agree(trained[0] * per_rank, device, op="sum")  # images trained in this attempt's part
        total = sums.all_reduce().values()
        if not math.isfinite(total["loss"]):
            _note_divergence(c, epoch, total["loss"] / max(total["images"], 1), rank)
            break
        val = (
            validate(
                raw,
                c["val_shards"],
                eval_tf,
                device=device,
                rank=rank,
                world=world,
                batch_size=per_rank,
                loader_workers=loader_workers,
                gpu=gpu,
                channels_last=nhwc,
                decode=decode,
                amp=amp,
            )
            .all_reduce()
            .values()
        )
        n = val["images"]
        val_error = 1 - val["top1"] / n if n else 1.0
        if c["schedule"] == "plateau":
            sched.step(val_error)
        else:
            sched.step()
        last_lr = scheduled[0] * warmup_factor(epoch, epoch_steps - 1, epoch_steps, c["warmup_epochs"], warm_start)
        metrics = {
            "epoch": epoch,
            "train_loss": total["loss"] / total["images"],
            "train_top1": total["top1"] / total["images"],
            "val_loss": val["loss"] / n if n else float("nan"),
            "val_top1": val["top1"] / n if n else 0.0,
            "val_top5": val["top5"] / n if n else 0.0,
            "lr": last_lr,
            "images_per_second": fresh / max(seconds, 1e-9),
            "data_wait_fraction": wait_s / max(seconds, 1e-9),
            "samples": int(total["images"]),
            "left_out": seg.remainder if seg is not None else 0,
        }
        history.append(metrics)
        position = {"epoch": epoch + 1, "segments": [], "sums": None}
        if rank == 0:
            log.info(
                "epoch %d/%d: %s",
                epoch,
                c["epochs"],
                ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"),
            )
        save(epoch, None, sums, {**metrics, "checkpoint_score": metrics["val_top1"]})
        if rank == 0:
            # After the checkpoint: a crash in between leaves the step unlogged, and the resumed
            # worker logs it from the checkpoint's history; never twice. On a thread of its
            # own (one, so epochs arrive in order): the other ranks do not wait for MLflow.
            if logging_now is not None:
                logging_now.result()  # an error that is not an outage stops the run here
            logging_now = mlflow_thread.submit(_log_history, c["run_id"], list(history))
    if rank == 0:
        if logging_now is not None:
            logging_now.result()
        mlflow_thread.shutdown()
        if monitor is not None:
            monitor.finish()


DIVERGED = "diverged.json"  # in the run's folder: a worker's note that the loss was not finite


def _note_divergence(c: dict, epoch: int, loss: float, rank: int) -> None:
    """A NaN or infinite training loss: every rank holds the same all-reduced sum, so all stop
    at this epoch together, without saving it (the checkpoints kept are finite). Rank 0 leaves
    a note in the run's folder, which the driver turns into the run's error."""
    if rank == 0:
        log.error("epoch %d: the training loss is %s; stopping without saving this epoch", epoch, loss)
        storage.write_json(
            storage.join(c["storage"], c["name"], DIVERGED),
            {"epoch": epoch, "train_loss": str(loss), "lr": c["lr"], "amp": c["amp"]},
        )


def _check_divergence(runs: str, name: str, run_id: str) -> None:
    """The workers' divergence note (_note_divergence) as the run's error; the run is FAILED."""
    note_url = storage.join(runs, name, DIVERGED)
    if not storage.exists(note_url):
        return
    note = storage.read_json(note_url)
    tracking.end_run(run_id, "FAILED")
    raise StageError(
        f"Training '{name}' diverged: its training loss was {note['train_loss']} in epoch "
        f"{note['epoch']} (lr {note['lr']}, autocast {note['amp']}), so no model was logged. "
        f"Train again under a new --name with a lower --lr, or with --init kaiming or --amp off."
    )


def _system_metrics(run_id: str, uri: str):
    """MLflow's system metrics (CPU, memory, disk, network; GPU where pynvml sees one) of rank
    0's node, every 10 s, into the run as system/*; a restarted worker continues the steps.
    Best effort: it stops by itself when the run ends or the server cannot be reached."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines
        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=True, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - system metrics never stop training
        log.warning("system metrics not recorded: %s", e)
        return None


_logged: set[int] = set()  # epochs this process has logged (a restarted worker re-checks MLflow)


def _log_history(run_id: str, history: list[dict]) -> bool:
    """Log every epoch of ``history`` not logged yet; False (and a warning) if MLflow is down.

    Training never waits on the tracking server: the checkpoint keeps the history, the next
    epoch (or the driver at the end) logs what an outage held back, each step once."""
    try:
        _log_epochs(run_id, history)
        return True
    except Exception as e:  # noqa: BLE001 - an outage: training goes on; anything else: raised below
        if not tracking.is_outage(e):
            raise
        log.warning(
            "MLflow not reachable (%s); %d epoch(s) kept in the checkpoint, logged on recovery",
            str(e).splitlines()[0][:200],
            sum(m["epoch"] not in _logged for m in history),
        )
        return False


def _when_tracking_is_back(what: str, fn, patience_s: float):
    """Run a tracking call, retrying with backoff while the server is away (driver side);
    any error that is not an outage (tracking.is_outage) is raised at once."""
    delay, deadline = 2.0, time.monotonic() + patience_s
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - an outage is waited out; anything else fails at once
            if not tracking.is_outage(e):
                raise
            if time.monotonic() > deadline:
                raise StageError(
                    f"MLflow at {tracking.tracking_uri()} stayed unreachable for {patience_s:.0f} s "
                    f"while {what}; the checkpoints are intact: rerun the same --name to finish."
                ) from e
            print(
                f"train: MLflow not reachable while {what} ({str(e).splitlines()[0][:120]}); retrying in {delay:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(delay)
            delay = min(delay * 2, 30)


def _log_epochs(run_id: str, history: list[dict]) -> None:
    """Log the epochs this process has not logged yet (each step at most once); raises on failure."""
    for m in history:
        if m["epoch"] not in _logged:
            tracking.log_metrics_once(run_id, {k: m[k] for k in METRICS}, step=m["epoch"])
            _logged.add(m["epoch"])


# --- the driver -------------------------------------------------------------------------------
def _inputs(cfg: TrainConfig) -> dict:
    """Everything the workers need from ROOT, checked before any worker starts."""
    train_m, val_m = contract.read_manifest(cfg.data, "train"), contract.read_manifest(cfg.data, "val")
    for split, m in (("train", train_m), ("val", val_m)):
        if m is None or not m["complete"]:
            raise StageError(
                f"The {split} shards in '{cfg.data}' are missing or incomplete: run "
                f"python -m pipelines shard --data {cfg.data}"
            )
    st = contract.read_stats(cfg.data)
    if st is None:
        raise StageError(
            f"'{contract.stats_url(cfg.data)}' is missing: run python -m pipelines stats --data {cfg.data}"
        )
    stale = contract.require_current(cfg.data, ["shard train", "shard val", "stats"], "train", cfg.allow_stale)
    stale += _check_geometry(cfg, train_m, val_m)
    for split, m in (("train", train_m), ("val", val_m)):
        unindexed = [s["name"] for s in m["shards"] if "index" not in s]
        if unindexed:  # shards from before sample indexes: the loader reads samples through them
            raise StageError(
                f"{len(unindexed)} {split} shard(s) in '{cfg.data}' have no sample index (first: "
                f"{unindexed[0]}): run python -m pipelines shard --data {cfg.data}, which adds "
                "the indexes without re-encoding any image."
            )
    classes = contract.read_classes(cfg.data)

    def located(split: str, m: dict) -> list[tuple[str, int]]:
        folder = contract.shard_dir(cfg.data, split)
        absolute = os.path.abspath if not storage.is_s3(cfg.data) else (lambda p: p)
        return [(absolute(storage.join(folder, s["name"])), s["samples"]) for s in m["shards"]]

    return {
        "train_shards": located("train", train_m),
        "val_shards": located("val", val_m),
        "stats": {k: st[k] for k in ("mean", "std", "eigval", "eigvec")},
        "num_classes": len(classes),
        "classes_digest": contract.classes_digest(classes),
        "wnids": [c["wnid"] for c in classes],
        "resize": train_m["params"]["resize"],
        "keep_aspect": train_m["params"]["keep_aspect"],
        "train_manifest": train_m,
        "val_manifest": val_m,
        "allowed_stale": stale,
        "classes_url": contract.classes_url(cfg.data),
        "stats_url": contract.stats_url(cfg.data),
    }


def _check_geometry(cfg: TrainConfig, train_m: dict, val_m: dict) -> list[str]:
    """The crop fits the shards, and validation sees images made the way the training ones were
    (unless --allow-stale: then the difference comes back, for the run to record)."""
    t, v = train_m["params"], val_m["params"]
    if not t["keep_aspect"] and cfg.crop > t["resize"]:
        raise StageError(f"--crop {cfg.crop} is larger than the {t['resize']} px shards: use --crop <= {t['resize']}.")
    if (t["resize"], t["keep_aspect"]) == (v["resize"], v["keep_aspect"]):
        return []
    differ = (
        f"the train shards were made with resize {t['resize']} (keep_aspect {t['keep_aspect']}), the val "
        f"shards with resize {v['resize']} (keep_aspect {v['keep_aspect']})"
    )
    if cfg.allow_stale:
        return [differ]
    flags = f"--resize {t['resize']}" + (" --keep-aspect" if t["keep_aspect"] else "")
    raise StageError(
        f"In '{cfg.data}' {differ}: rerun python -m pipelines shard --data {cfg.data} --split val "
        f"{flags}, or pass --allow-stale to validate on them as they are."
    )


def _check_plan(cfg: TrainConfig, inputs: dict) -> None:
    """The epoch plan at the largest and smallest world size, before any worker starts."""
    from . import plan

    counts = [n for _, n in inputs["train_shards"]]
    for world in {cfg.workers, cfg.min_workers or cfg.workers}:
        try:
            plan.epoch_plan(
                counts,
                seed=cfg.seed,
                epoch=1,
                batch_size=cfg.batch_size,
                world=world,
                loader_workers=cfg.loader_workers or 1,
                buffer=cfg.shuffle_buffer,
            )
        except ValueError as e:
            raise StageError(str(e)) from e


def cpus_per_worker(cfg: TrainConfig, nodes: list[dict], gpu: bool) -> float:
    """The CPUs each training worker reserves (--cpus-per-worker, or the default that
    config.TrainConfig.cpus_per_worker describes), from ``nodes`` as ray.nodes() lists them."""
    if cfg.cpus_per_worker is not None:
        return cfg.cpus_per_worker
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if gpu:
        shares = [r.get("CPU", 0) // r["GPU"] for r in alive if r.get("GPU", 0) >= 1]
        # No GPU node yet (an autoscaling cluster): the cap, as before there was a choice.
        share = min(shares) if shares else cfg.max_cpus_per_worker
    else:
        share = sum(r.get("CPU", 0) for r in alive) // cfg.workers
    return float(min(max(share, 1.0), cfg.max_cpus_per_worker))


def _check_capacity(cfg: TrainConfig, resources: dict, gpu: bool, cpus: float) -> None:
    """On a Ray started for this run (no RAY_ADDRESS) nothing can add nodes: more workers than it
    has CPUs (or GPUs) would have Ray Train wait for them forever. A cluster may autoscale, so
    it is trusted to grow."""
    if on_cluster():
        return
    need = cfg.min_workers or cfg.workers  # an elastic run starts with what it can get, at least MIN
    flag = f"--workers {cfg.min_workers}-{cfg.workers}" if cfg.min_workers else f"--workers {cfg.workers}"
    kind = "GPU" if gpu else "CPU"
    have = int(resources.get(kind, 0))
    if need > have:
        raise StageError(
            f"{flag} needs {need} {kind}s (one a worker) and this machine's Ray has {have}: use "
            f"--workers {max(have, 1)} or fewer, or a cluster (RAY_ADDRESS)."
        )
    have_cpus = float(resources.get("CPU", 0))
    if need * cpus > have_cpus:
        raise StageError(
            f"{flag} with --cpus-per-worker {cpus:g} needs {need * cpus:g} CPUs and this machine's "
            f"Ray has {have_cpus:g}: use --cpus-per-worker {max(have_cpus // need, 1):g} or fewer."
        )


def _check_amp(cfg: TrainConfig, gpu: bool | None) -> None:
    """(gpu None: not known yet, so nothing to say.)"""
    if cfg.amp == "fp16" and gpu is False:
        raise StageError(
            "--amp fp16 needs a GPU: on CPUs use --amp bf16 (where the CPU has bfloat16 instructions) or --amp off."
        )


def _validate(cfg: TrainConfig) -> None:
    import model

    from . import data

    if cfg.schedule not in SCHEDULES:
        raise StageError(f"Unknown schedule '{cfg.schedule}'. Expected one of: {', '.join(SCHEDULES)}.")
    if cfg.arch not in model.ARCHS:
        raise StageError(f"Unknown arch '{cfg.arch}'. Expected one of: {', '.join(model.ARCHS)}.")
    if cfg.init not in model.INITS:
        raise StageError(f"Unknown init '{cfg.init}'. Expected one of: {', '.join(model.INITS)}.")
    if cfg.workers < 1 or cfg.epochs < 1:
        raise StageError(f"--workers {cfg.workers} / --epochs {cfg.epochs}: both must be at least 1.")
    for flag, value in (("--lr", cfg.lr), ("--momentum", cfg.momentum), ("--weight-decay", cfg.weight_decay)):
        if not value >= 0 or (flag == "--lr" and value == 0):
            raise StageError(
                f"{flag} {value}: must be {'above' if flag == '--lr' else 'at least'} 0 "
                f"(the paper uses --lr 0.01 --momentum 0.9 --weight-decay 0.0005)."
            )
    if cfg.min_workers is not None and not 1 <= cfg.min_workers <= cfg.workers:
        raise StageError(f"--workers {cfg.min_workers}-{cfg.workers}: need 1 <= MIN <= MAX.")
    if cfg.batch_size < cfg.workers:
        # A global batch that does not divide by the world size is fine (ranks differ by one
        # sample and the loss is weighted per sample); each rank needs at least one.
        raise StageError(
            f"--batch-size {cfg.batch_size} gives some of the {cfg.workers} workers no sample: "
            f"use --batch-size >= {cfg.workers}."
        )
    if cfg.checkpoint_every is not None and cfg.checkpoint_every < 1:
        raise StageError(
            f"--checkpoint-every {cfg.checkpoint_every}: must be at least 1 step (leave it out for "
            f"about one every {cfg.checkpoint_interval_s:.0f} s)."
        )
    if cfg.progress_every is not None and cfg.progress_every < 1:
        raise StageError(
            f"--progress-every {cfg.progress_every}: must be at least 1 step (leave it out for "
            "a line every tenth of an epoch)."
        )
    if cfg.ledger and storage.is_s3(cfg.ledger):
        raise StageError(f"--ledger {cfg.ledger}: the sample ledger is a local folder (a debugging aid).")
    if cfg.crop < 64:
        raise StageError(f"--crop {cfg.crop}: AlexNet needs at least 64 px.")
    for flag, value, allowed in (
        ("--amp", cfg.amp, AMPS),
        ("--lr-scaling", cfg.lr_scaling, LR_SCALINGS),
        ("--grad-compression", cfg.grad_compression, GRAD_COMPRESSIONS),
    ):
        if value not in allowed:
            raise StageError(f"Unknown {flag} '{value}'. Expected one of: {', '.join(allowed)}.")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs > cfg.epochs:
        raise StageError(f"--warmup-epochs {cfg.warmup_epochs}: must be from 0 to --epochs ({cfg.epochs}).")
    if cfg.warmup_start is not None and not 0 < cfg.warmup_start <= 1:
        raise StageError(
            f"--warmup-start {cfg.warmup_start}: the first step's fraction of the peak lr, above 0 and at most 1."
        )
    if cfg.lr_reference_batch < 1:
        raise StageError(
            f"--lr-reference-batch {cfg.lr_reference_batch}: must be at least 1 "
            "(the paper's lr 0.01 was for batches of 128)."
        )
    if cfg.cpus_per_worker is not None and not cfg.cpus_per_worker > 0:
        raise StageError(f"--cpus-per-worker {cfg.cpus_per_worker}: must be above 0.")
    if cfg.batch_per_worker is not None and cfg.batch_per_worker < 1:
        raise StageError(f"--batch-per-worker {cfg.batch_per_worker}: must be at least 1.")
    _check_amp(cfg, cfg.gpu)
    if cfg.decode not in data.DECODES:
        raise StageError(
            f"Unknown decode '{cfg.decode}'. Expected one of: {', '.join(data.DECODES)} "
            "(auto: on the GPU when training on one, else in the loader workers)."
        )


def run(cfg: TrainConfig, parent_run_id: str | None = None) -> dict:
    """Train; with ``parent_run_id`` a new run is nested under that run (the demo's pipeline run)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from . import data

    t0 = time.monotonic()
    if cfg.batch_per_worker is not None:  # the global batch of the largest world; smaller ones share it
        cfg = dataclasses.replace(cfg, batch_size=cfg.batch_per_worker * cfg.workers)
    _validate(cfg)
    tracking.check_reachable()
    inputs = _inputs(cfg)
    _check_plan(cfg, inputs)
    name = cfg.name or "alexnet-" + time.strftime("%Y%m%d-%H%M%S")
    runs = cfg.storage or storage.join(cfg.data, "runs")
    runs = runs if storage.is_s3(runs) else os.path.abspath(runs)
    runs_fs, runs_path = storage.pyarrow_filesystem(runs)  # s3:// checkpoints use the AWS_* settings

    ray = ensure_ray(dashboard=True)
    gpu = cfg.gpu if cfg.gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    _check_amp(cfg, gpu)
    cpus = cpus_per_worker(cfg, ray.nodes(), gpu)
    _check_capacity(cfg, ray.cluster_resources(), gpu, cpus)  # before the MLflow run: a typo leaves no run
    run_id = tracking.start_or_resume_run(cfg.experiment, name, tags={"pipelines.stage": "train"})
    if parent_run_id and "mlflow.parentRunId" not in tracking.get_tags(run_id):
        tracking.set_tags(run_id, {"mlflow.parentRunId": parent_run_id})  # a resumed run keeps its place
    done = _finished(run_id, cfg.epochs)
    if done:  # rerunning a finished run: nothing to train, the model is already logged
        tracking.end_run(run_id, "FINISHED")
        return _summary(cfg, name, run_id, *done[:3], seconds=time.monotonic() - t0, skipped=True, best=done[3])
    # Workers train on CUDA exactly when gpu is set, so "auto" resolves here and the run
    # records the decode path it used.
    decode = data.choose_decode(cfg.decode, "cuda" if gpu else "cpu")
    resolved = dataclasses.replace(
        cfg, name=name, storage=runs, gpu=gpu, decode=decode, cpus_per_worker=cpus, amp=resolve_amp(cfg.amp, gpu)
    )
    conflicts = tracking.log_params(
        run_id,
        {
            **dataclasses.asdict(resolved),
            **tracking.environment(),
            "num_classes": inputs["num_classes"],
            "train_samples": inputs["train_manifest"]["samples"],
        },
    )
    if conflicts:
        print(
            f"train: warning: resuming '{name}' with changed settings, kept the first values of: "
            f"{', '.join(conflicts)}",
            file=sys.stderr,
        )
    manifest = inputs["train_manifest"]
    tracking.log_dataset(
        run_id,
        name="imagenet-train-shards",
        digest=manifest["digest"],
        source=contract.manifest_url(cfg.data, "train"),
        profile={"samples": manifest["samples"], "shards": len(manifest["shards"])},
    )
    val_m = inputs["val_manifest"]  # what val_top1 (and the best checkpoint's choice) was measured on
    tracking.log_dataset(
        run_id,
        name="imagenet-val-shards",
        digest=val_m["digest"],
        source=contract.manifest_url(cfg.data, "val"),
        context="validation",
        profile={"samples": val_m["samples"], "shards": len(val_m["shards"])},
    )
    tracking.log_yaml(run_id, dataclasses.asdict(resolved), "config.yaml")
    tracking.log_json(run_id, storage.read_json(inputs["classes_url"]), "classes.json")
    tracking.log_json(run_id, storage.read_json(inputs["stats_url"]), "stats.json")
    makers = tracking.find_stage_runs(manifest["digest"], experiment=None)
    if makers:
        tracking.set_tags(run_id, {"pipelines.shard_runs": ",".join(r["run_id"] for r in makers)})
    tracking.link_lineage(run_id, tracking.lineage(manifest["digest"]), f"`{cfg.data}`")
    tracking.set_tags(run_id, tracking.allowed_stale_tag(inputs["allowed_stale"]))

    loop_config = {
        **dataclasses.asdict(resolved),
        **{
            k: inputs[k]
            for k in (
                "train_shards",
                "val_shards",
                "stats",
                "num_classes",
                "classes_digest",
                "wnids",
                "resize",
                "keep_aspect",
            )
        },
        "run_id": run_id,
        "tracking_uri": tracking.tracking_uri(),
    }
    # --workers MIN-MAX: Ray Train starts with as many as it can get (at least MIN) and, when a
    # node is lost, restarts the group on the workers left; the plan re-deals the epoch's rest.
    workers = (cfg.min_workers, cfg.workers) if cfg.min_workers is not None else cfg.workers
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=name,
            storage_path=runs_path,
            storage_filesystem=runs_fs,
            # Epoch-end checkpoints score their val_top1, mid-epoch ones -1: the best epochs are
            # kept, and Ray keeps the latest of any kind for resuming.
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="checkpoint_score",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Ray Train's own INFO lines (every report, every checkpoint, 500 characters each)
            # drown the run's; its warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    # A Ray of this machine alone, started for this process: no cloud drains its node, and Ray
    # Train's preemption watcher would be one more actor process, whose start Ray reports with an
    # error-level line. A cluster's runs keep it. (Read from the environment as fit() starts.)
    watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    off = {} if on_cluster() or watcher in os.environ else {watcher: "0"}
    os.environ.update(off)
    storage.remove(storage.join(runs, name, DIVERGED))  # an earlier attempt's note: this one decides anew
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    finally:
        for k in off:
            os.environ.pop(k, None)
    _check_divergence(runs, name, run_id)
    if result.checkpoint is None:
        tracking.end_run(run_id, "FAILED")
        raise StageError(f"Training '{name}' ended without a checkpoint; see the worker logs above.")

    def where(ckpt) -> str:
        return f"s3://{ckpt.path}" if runs_fs is not None else ckpt.path

    ckpt_dir = where(result.checkpoint)  # the latest: what a rerun resumes from
    state = checkpoint.load(ckpt_dir)
    # The model logged is the best epoch by val_top1 (mid-epoch checkpoints score -1).
    best = result.get_best_checkpoint("checkpoint_score", "max")
    best_dir = where(best) if best is not None else ckpt_dir
    best_state = checkpoint.load(best_dir) if best_dir != ckpt_dir else state

    # An outage during training held some epochs back: log them now, waiting for the server.
    patience = float(os.environ.get("PIPELINES_TRACKING_PATIENCE_S", 900))
    _when_tracking_is_back("logging the epochs' metrics", lambda: _log_epochs(run_id, state["history"]), patience)
    model_uri = _when_tracking_is_back(
        "logging the model", lambda: _log_classifier(cfg, run_id, best_state, inputs), patience
    )
    _when_tracking_is_back(
        "finishing the run",
        lambda: (
            tracking.set_tags(
                run_id,
                {
                    "pipelines.checkpoint": ckpt_dir,
                    "pipelines.best_checkpoint": best_dir,
                    "pipelines.data": cfg.data,
                    "pipelines.model_uri": model_uri,
                },
            ),
            tracking.end_run(run_id, "FINISHED"),
        ),
        patience,
    )
    return _summary(
        cfg,
        name,
        run_id,
        state,
        ckpt_dir,
        model_uri,
        seconds=time.monotonic() - t0,
        gpu=gpu,
        best=(best_state, best_dir),
    )


def _log_classifier(cfg: TrainConfig, run_id: str, state: dict, inputs: dict) -> str:
    """The image classifier of ``state`` (pipelines/classifier.py), with two val images as its
    input example; registered under --register with the alias --alias."""
    import tempfile

    import pandas as pd

    from . import classifier, tarindex

    params = inputs["train_manifest"]["params"]
    geometry = {"resize": params["resize"], "keep_aspect": params["keep_aspect"], "crop": cfg.crop}
    url = inputs["val_shards"][0][0]
    doc = tarindex.read(url)
    run = storage.read_range(
        url,
        doc["offsets"][0],
        doc["offsets"][min(2, doc["samples"]) - 1] - doc["offsets"][0] + doc["sizes"][min(2, doc["samples"]) - 1],
    )
    example = pd.DataFrame({"image": [jpg for _, jpg, _ in tarindex.parse_run(run, url)]})
    classes, stats_ = storage.read_bytes(inputs["classes_url"]), storage.read_bytes(inputs["stats_url"])
    output = pd.DataFrame(
        classifier.classify(
            checkpoint.model_from_state(state).eval(),
            list(example["image"]),
            geometry,
            json.loads(classes),
            json.loads(stats_),
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = classifier.artifacts(state, geometry, classes, stats_, tmp)
        return tracking.log_classifier(run_id, files, example, output, register=cfg.register, alias=cfg.alias)


def _finished(run_id: str, epochs: int):
    """(state, checkpoint, model uri) when this run already trained ``epochs`` and logged its model."""
    tags = tracking.get_tags(run_id)
    if "pipelines.checkpoint" not in tags or "pipelines.model_uri" not in tags:
        return None
    if not checkpoint.exists(tags["pipelines.checkpoint"]):
        return None
    state = checkpoint.load(tags["pipelines.checkpoint"])
    if state["epoch"] < epochs:
        return None
    best = tags.get("pipelines.best_checkpoint", tags["pipelines.checkpoint"])
    return state, tags["pipelines.checkpoint"], tags["pipelines.model_uri"], (checkpoint.load(best), best)


def _by_node(workers: list[dict]) -> list[dict]:
    nodes: dict[str, dict] = {}
    for w in workers:
        nodes.setdefault(w["node"], {"node": w["node"], "ip": w["ip"], "ranks": []})["ranks"].append(w["rank"])
    return sorted(nodes.values(), key=lambda n: n["ranks"][0])


def _summary(cfg, name, run_id, state, ckpt_dir, model_uri, seconds, skipped=False, gpu=None, best=None) -> dict:
    last = state["history"][-1]
    best_state, best_dir = best or (state, ckpt_dir)
    return {
        "stage": "train",
        "data": cfg.data,
        "name": name,
        "run_id": run_id,
        "epochs": last["epoch"],
        **{k: last[k] for k in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5")},
        # the last epoch's speed: what a GPU check or a sweep compares across machines
        **{k: last.get(k) for k in ("images_per_second", "data_wait_fraction")},
        "checkpoint": ckpt_dir,
        "best_checkpoint": best_dir,
        "best_epoch": best_state["history"][-1]["epoch"],
        "model_uri": model_uri,
        "gpu": gpu,
        "workers": cfg.workers,
        # the ranks of the last worker group, by node (a group restarted after a node loss differs)
        "nodes": _by_node(state.get("workers") or []),
        "left_out_per_epoch": last.get("left_out", 0),
        "skipped": skipped,
        "seconds": round(seconds, 2),
        "input_digest": contract.read_manifest(cfg.data, "train")["digest"],
    }
