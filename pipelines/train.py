"""Training: the 2012 AlexNet on Ray Train data-parallel workers, tracked in MLflow.

    python -m pipelines train --data /data/alexnet --workers 8 --gpu --name alexnet-paper

The only module that joins the model, the data, Ray Train and tracking. The loop is written
out (zero_grad / forward / backward / step); Ray Train's prepare_model makes it data-parallel.
Each epoch ends with a validation pass, a checkpoint (model, optimiser, scheduler, the epoch
and every epoch's metrics) and one MLflow step per metric. Rerunning the same --name resumes
from the last checkpoint, inside the same MLflow run; FailureConfig restarts failed workers
from it too.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import time

from . import shard, stats, storage, tracking
from .common import StageError, ensure_ray, now_iso
from .config import TrainConfig

# Workers log through logging, not print: Ray Train tees print() when MLflow has wrapped
# stderr, and every line would reach the driver twice.
log = logging.getLogger("pipelines.train")
SCHEDULES = ("plateau", "step", "cosine")
STATE_FILE = "state.pt"
METRICS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
           "images_per_second", "data_wait_fraction")


# --- checkpoints ------------------------------------------------------------------------------
def load_state(checkpoint_dir: str) -> dict:
    """A checkpoint's state, from a local folder or an s3:// one."""
    import io

    import torch

    url = storage.join(checkpoint_dir, STATE_FILE)
    if not storage.exists(url):
        raise StageError(f"'{checkpoint_dir}' holds no {STATE_FILE}: not a checkpoint of this project.")
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=False)


def model_from_state(state: dict):
    import model

    c = state["config"]
    net = model.build(c["arch"], c["num_classes"], init="kaiming")  # weights come from the state
    net.load_state_dict(state["model"])
    return net


def _scheduler(opt, c: dict):
    import torch

    if c["schedule"] == "plateau":
        # Section 5: divide by 10 when the validation error stops improving.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1,
                                                          patience=c["patience"], min_lr=c["min_lr"])
    if c["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=c["step_size"], gamma=0.1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c["epochs"], eta_min=c["min_lr"])


# --- one worker -------------------------------------------------------------------------------
def train_step(net, opt, x, y, gpu: bool):
    """One SGD step on a normalised float batch (bf16 autocast on a GPU); returns (logits, loss).
    benchmarks/gpu.py times this same function."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=gpu):
        out = net(x)
        loss = F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return out, loss


def _evaluate(net, urls, transform, device, batch_size, loader_workers, gpu, decode):
    """(loss sum, top-1 hits, top-5 hits, count) over ``urls``, centre crop."""
    import torch
    import torch.nn.functional as F

    from . import data

    sums = torch.zeros(4, dtype=torch.float64, device=device)
    if not urls:
        return sums
    net.eval()
    with torch.inference_mode():
        loader = data.eval_loader(urls, transform, batch_size=batch_size, num_workers=loader_workers,
                                  pin_memory=gpu, decode=decode)
        for x, y in data.on_device(loader, device):
            x = transform.photometric(x)
            if gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                out = net(x).float()
            top5 = out.topk(min(5, out.shape[1]), dim=1).indices
            sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                                 (top5[:, 0] == y).sum().double(), (top5 == y[:, None]).any(1).sum().double(),
                                 torch.tensor(len(y), dtype=torch.float64, device=device)])
    return sums


def train_loop(c: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    import model
    from . import data

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    gpu = device.type == "cuda"
    torch.manual_seed(c["seed"])
    net = model.build(c["arch"], c["num_classes"], c["init"])
    if gpu:
        net = net.to(memory_format=torch.channels_last)
    net = prepare_model(net)
    opt = torch.optim.SGD(net.parameters(), lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"])
    sched = _scheduler(opt, c)
    history, start = [], 1
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_state(d)
        net.module.load_state_dict(state["model"]) if hasattr(net, "module") else net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"] + 1
        log.info("rank %d resumed after epoch %d", rank, state["epoch"])
    if rank == 0:
        os.environ["MLFLOW_TRACKING_URI"] = c["tracking_uri"]
        # Fail fast while the server is away (MLflow would otherwise retry for minutes inside
        # one call and stall training); _log_history catches up at the next epoch.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        _log_history(c["run_id"], history)  # epochs a crash left unlogged

    raw = net.module if hasattr(net, "module") else net
    train_tf = model.TrainTransform.from_stats(c["stats"], crop=c["crop"], alphastd=c["lighting"])
    eval_tf = model.EvalTransform.from_stats(c["stats"], crop=c["crop"])
    per_rank = c["batch_size"] // world
    loader_workers = c["loader_workers"] if c["loader_workers"] is not None else (8 if gpu else 1)
    if rank == 0:  # CPU speed depends on it; Ray sets OMP_NUM_THREADS to the worker's CPUs
        log.info("rank 0 on %s, %d torch threads, %d loader workers", device, torch.get_num_threads(), loader_workers)
    decode = data.choose_decode(c["decode"], device)  # nvjpeg on a GPU (issue "Performance")

    for epoch in range(start, c["epochs"] + 1):
        if c.get("synthetic_steps"):
            # benchmarks/train_step.py: this loop on one fixed random batch, no data pipeline
            batches, steps = data.synthetic_batches(per_rank, c["crop"], c["num_classes"],
                                                    c["synthetic_steps"], device), c["synthetic_steps"]
        else:
            loader, plan = data.train_loader(
                [tuple(s) for s in c["train_shards"]], train_tf, batch_size=per_rank, rank=rank,
                world_size=world, epoch=epoch, seed=c["seed"], num_workers=loader_workers,
                shuffle_buffer=c["shuffle_buffer"], pin_memory=gpu, decode=decode)
            batches, steps = data.on_device(loader, device), plan.steps
        # Every random draw of an epoch (dropout, PCA lighting) comes from a generator seeded by
        # (seed, epoch, rank), as the loader's crops and shuffles are: a run resumed from the
        # checkpoint of epoch e replays epoch e+1 exactly as an uninterrupted run would.
        torch.manual_seed(data.seed_for(c["seed"], epoch, rank, "torch"))
        lr = opt.param_groups[0]["lr"]
        net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        waited, t0 = 0.0, time.perf_counter()
        x_float = None  # on a CPU, each step's float batch is written into the last one's memory
        for _ in range(steps):
            tw = time.perf_counter()
            x, y = next(batches)  # uint8 on the device; with decode="device" the decode happens here
            waited += time.perf_counter() - tw
            if gpu:  # before the float conversion, which keeps the layout: a quarter of the bytes
                x = x.contiguous(memory_format=torch.channels_last)
            x = train_tf.photometric(x, out=x_float)  # float, PCA lighting, normalise: batched, on the device
            if not gpu:  # (CUDA's caching allocator reuses memory by itself)
                x_float = x
            out, loss = train_step(net, opt, x, y, gpu)
            # Accumulated on the device: reading a value back each step would stall the GPU.
            sums[0] += loss.detach() * len(y)
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
        del batches
        seconds = torch.tensor([time.perf_counter() - t0, waited], dtype=torch.float64, device=device)
        val = _evaluate(raw, c["val_shards"][rank::world], eval_tf, device, per_rank, loader_workers, gpu,
                        decode)
        if dist.is_available() and dist.is_initialized():
            for t in (sums, val):
                dist.all_reduce(t)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        val_error = 1 - float(val[1] / val[3]) if val[3] else 1.0
        if c["schedule"] == "plateau":
            sched.step(val_error)
        else:
            sched.step()
        metrics = {
            "epoch": epoch, "train_loss": float(sums[0] / sums[2]), "train_top1": float(sums[1] / sums[2]),
            "val_loss": float(val[0] / val[3]) if val[3] else float("nan"),
            "val_top1": float(val[1] / val[3]) if val[3] else 0.0,
            "val_top5": float(val[2] / val[3]) if val[3] else 0.0,
            "lr": lr, "images_per_second": float(sums[2] / seconds[0]),
            "data_wait_fraction": float(seconds[1] / seconds[0]), "samples": int(sums[2]),
        }
        history.append(metrics)
        if rank == 0:
            log.info("epoch %d/%d: %s", epoch, c["epochs"],
                     ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": raw.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                            # Where the data stream stands: the next epoch's shard order, shuffle
                            # and crops all derive from (seed, epoch), so this is all a resume needs.
                            "data_position": {"seed": c["seed"], "epochs_done": epoch, "next_epoch": epoch + 1,
                                              "samples_seen": int(sum(h["samples"] for h in history))},
                            "config": {k: c[k] for k in ("arch", "num_classes", "crop", "init", "seed")},
                            "stats": c["stats"], "saved_at": now_iso()}, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            # After the checkpoint: a crash in between leaves the step unlogged, and the resumed
            # worker logs it from the checkpoint's history; never twice.
            _log_history(c["run_id"], history)
        else:
            ray.train.report(metrics)


_logged: set[int] = set()  # epochs this process has logged (a restarted worker re-checks MLflow)


def _log_history(run_id: str, history: list[dict]) -> bool:
    """Log every epoch of ``history`` not logged yet; False (and a warning) if MLflow is down.

    Training never waits on the tracking server: the checkpoint keeps the history, the next
    epoch (or the driver at the end) logs what an outage held back, each step once."""
    try:
        _log_epochs(run_id, history)
        return True
    except Exception as e:  # noqa: BLE001 - any tracking failure; training goes on
        log.warning("MLflow not reachable (%s); %d epoch(s) kept in the checkpoint, logged on recovery",
                    str(e).splitlines()[0][:200], sum(m["epoch"] not in _logged for m in history))
        return False


def _when_tracking_is_back(what: str, fn, patience_s: float):
    """Run a tracking call, retrying with backoff while the server is away (driver side)."""
    delay, deadline = 2.0, time.monotonic() + patience_s
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if time.monotonic() > deadline:
                raise StageError(f"MLflow at {tracking.tracking_uri()} stayed unreachable for {patience_s:.0f} s "
                                 f"while {what}; the checkpoints are intact: rerun the same --name to finish.") from e
            print(f"train: MLflow not reachable while {what} ({str(e).splitlines()[0][:120]}); retrying in "
                  f"{delay:.0f} s", file=sys.stderr, flush=True)
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
    for split in ("train", "val"):
        m = shard.read_manifest(cfg.data, split)
        if m is None or not m["complete"]:
            raise StageError(f"The {split} shards in '{cfg.data}' are missing or incomplete: run "
                             f"python -m pipelines shard --data {cfg.data}")
    st_url = stats.stats_url(cfg.data)
    if not storage.exists(st_url):
        raise StageError(f"'{st_url}' is missing: run python -m pipelines stats --data {cfg.data}")
    train_m, val_m = shard.read_manifest(cfg.data, "train"), shard.read_manifest(cfg.data, "val")
    classes = storage.read_json(storage.join(cfg.data, "classes.json"))
    resize = train_m["params"]["resize"]
    if not train_m["params"]["keep_aspect"] and cfg.crop > resize:
        raise StageError(f"--crop {cfg.crop} is larger than the {resize} px shards: use --crop <= {resize}.")
    absolute = os.path.abspath if not storage.is_s3(cfg.data) else (lambda p: p)
    tdir, vdir = shard.shard_dir(cfg.data, "train"), shard.shard_dir(cfg.data, "val")
    return {
        "train_shards": [(absolute(storage.join(tdir, s["name"])), s["samples"]) for s in train_m["shards"]],
        "val_shards": [absolute(storage.join(vdir, s["name"])) for s in val_m["shards"]],
        "stats": {k: v for k, v in storage.read_json(st_url).items() if k in ("mean", "std", "eigval", "eigvec")},
        "num_classes": len(classes), "train_manifest": train_m, "classes_url": storage.join(cfg.data, "classes.json"),
        "stats_url": st_url,
    }


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
    if cfg.batch_size % cfg.workers:
        raise StageError(f"--batch-size {cfg.batch_size} does not split evenly over {cfg.workers} workers: "
                         f"use a multiple of {cfg.workers}.")
    if cfg.crop < 64:
        raise StageError(f"--crop {cfg.crop}: AlexNet needs at least 64 px.")
    if cfg.decode not in data.DECODES:
        raise StageError(f"Unknown decode '{cfg.decode}'. Expected one of: {', '.join(data.DECODES)} "
                         "(auto: on the GPU when training on one, else in the loader workers).")


def run(cfg: TrainConfig) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from . import data

    t0 = time.monotonic()
    _validate(cfg)
    tracking.check_reachable()
    inputs = _inputs(cfg)
    name = cfg.name or "alexnet-" + time.strftime("%Y%m%d-%H%M%S")
    runs = cfg.storage or storage.join(cfg.data, "runs")
    runs = runs if storage.is_s3(runs) else os.path.abspath(runs)
    runs_fs, runs_path = storage.pyarrow_filesystem(runs)  # s3:// checkpoints use the AWS_* settings

    run_id = tracking.start_or_resume_run(cfg.experiment, name, tags={"pipelines.stage": "train"})
    done = _finished(run_id, cfg.epochs)
    if done:  # rerunning a finished run: nothing to train, the model is already logged
        tracking.end_run(run_id, "FINISHED")
        return _summary(cfg, name, run_id, *done, seconds=time.monotonic() - t0, skipped=True)
    ray = ensure_ray(dashboard=True)
    gpu = cfg.gpu if cfg.gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    # Workers train on CUDA exactly when gpu is set, so "auto" resolves here and the run
    # records the decode path it used.
    decode = data.choose_decode(cfg.decode, "cuda" if gpu else "cpu")
    resolved = dataclasses.replace(cfg, name=name, storage=runs, gpu=gpu, decode=decode)
    conflicts = tracking.log_params(run_id, {**dataclasses.asdict(resolved), **tracking.environment(),
                                             "num_classes": inputs["num_classes"],
                                             "train_samples": inputs["train_manifest"]["samples"]})
    if conflicts:
        print(f"train: warning: resuming '{name}' with changed settings, kept the first values of: "
              f"{', '.join(conflicts)}", file=sys.stderr)
    manifest = inputs["train_manifest"]
    tracking.log_dataset(run_id, name="imagenet-train-shards", digest=manifest["digest"],
                         source=shard.manifest_url(cfg.data, "train"),
                         profile={"samples": manifest["samples"], "shards": len(manifest["shards"])})
    tracking.log_yaml(run_id, dataclasses.asdict(resolved), "config.yaml")
    tracking.log_json(run_id, storage.read_json(inputs["classes_url"]), "classes.json")
    tracking.log_json(run_id, storage.read_json(inputs["stats_url"]), "stats.json")
    makers = tracking.find_stage_runs(manifest["digest"])
    if makers:
        tracking.set_tags(run_id, {"pipelines.shard_runs": ",".join(r["run_id"] for r in makers)})

    loop_config = {**dataclasses.asdict(resolved), **{k: inputs[k] for k in
                   ("train_shards", "val_shards", "stats", "num_classes")},
                   "run_id": run_id, "tracking_uri": tracking.tracking_uri()}
    cpus = max(1.0, float(ray.cluster_resources().get("CPU", 1)) // cfg.workers) if not gpu else 8.0
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": min(cpus, 8.0)}),
        run_config=RunConfig(
            name=name, storage_path=runs_path, storage_filesystem=runs_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute="val_top1",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures)))
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    if result.checkpoint is None:
        tracking.end_run(run_id, "FAILED")
        raise StageError(f"Training '{name}' ended without a checkpoint; see the worker logs above.")
    checkpoint = f"s3://{result.checkpoint.path}" if runs_fs is not None else result.checkpoint.path
    state = load_state(checkpoint)
    net = model_from_state(state).eval()
    import numpy as np

    # An outage during training held some epochs back: log them now, waiting for the server.
    patience = float(os.environ.get("PIPELINES_TRACKING_PATIENCE_S", 900))
    _when_tracking_is_back("logging the epochs' metrics", lambda: _log_epochs(run_id, state["history"]), patience)
    example = np.zeros((2, 3, cfg.crop, cfg.crop), dtype=np.float32)
    model_uri = _when_tracking_is_back("logging the model", lambda: tracking.log_model(
        run_id, net, example, register=cfg.register), patience)
    _when_tracking_is_back("finishing the run", lambda: (
        tracking.set_tags(run_id, {"pipelines.checkpoint": checkpoint, "pipelines.data": cfg.data,
                                   "pipelines.model_uri": model_uri}),
        tracking.end_run(run_id, "FINISHED")), patience)
    return _summary(cfg, name, run_id, state, checkpoint, model_uri, seconds=time.monotonic() - t0, gpu=gpu)


def _finished(run_id: str, epochs: int):
    """(state, checkpoint, model uri) when this run already trained ``epochs`` and logged its model."""
    tags = tracking.get_tags(run_id)
    if "pipelines.checkpoint" not in tags or "pipelines.model_uri" not in tags:
        return None
    if not storage.exists(storage.join(tags["pipelines.checkpoint"], STATE_FILE)):
        return None
    state = load_state(tags["pipelines.checkpoint"])
    if state["epoch"] < epochs:
        return None
    return state, tags["pipelines.checkpoint"], tags["pipelines.model_uri"]


def _summary(cfg, name, run_id, state, checkpoint, model_uri, seconds, skipped=False, gpu=None) -> dict:
    last = state["history"][-1]
    return {"stage": "train", "data": cfg.data, "name": name, "run_id": run_id, "epochs": last["epoch"],
            **{k: last[k] for k in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5")},
            "checkpoint": checkpoint, "model_uri": model_uri, "gpu": gpu, "workers": cfg.workers,
            "skipped": skipped, "seconds": round(seconds, 2),
            "input_digest": shard.read_manifest(cfg.data, "train")["digest"]}
