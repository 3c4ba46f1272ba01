"""One Ray Train worker: the training loop that every rank runs (``train_loop``).

    Worker(config).run():  build the network and optimiser, or resume them from the checkpoint;
                           then per epoch: train, validate, step the schedule, checkpoint, log.

The loop is written out (zero_grad / forward / backward / step in recipe.train_step); Ray Train's
prepare_model makes it data-parallel. pipelines/plan.py decides which samples each rank reads at
each step; checkpoints (pipelines/checkpoint.py) hold the plan's position, so a rerun of the same
--name, a worker restarted by Ray Train, or a worker group resized by elastic training continues
at the step after the last checkpoint. Its small parts: Cadence (when to checkpoint inside an
epoch), EpochProgress (the progress lines), Ledger (--ledger, which keys each step trained on)
and MlflowLog (rank 0's metrics, on a thread of its own).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import math
import os
import tempfile
import time

from . import arrowfs, checkpoint, contract, meter, recipe, stall, storage, tracking
from .common import fmt_seconds, now_iso
from .errors import StageError

# Workers log through logging, not print: Ray Train tees print() when MLflow has wrapped
# stderr, and every line would reach the driver twice.
log = logging.getLogger("pipelines.train")
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
RESUMED_PAST_DAMAGED = "pipelines.resumed_past_damaged"  # a run tag: the damaged checkpoint it skipped
DIVERGED = "diverged.json"  # in the run's folder: a worker's note that the loss was not finite
STATE_CONFIG = ("arch", "num_classes", "crop", "init", "seed", "classes_digest", "resize", "keep_aspect")


def train_loop(c: dict) -> None:
    """Runs on every Ray Train worker."""
    Worker(c).run()


class Worker:
    """One rank's network, optimiser, schedule and position in the data plan."""

    def __init__(self, c: dict):
        import ray.train

        self.c = c
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        run_dir, node = storage.join(c["storage"], c["name"]), ray.get_runtime_context().get_node_id()
        self.heartbeat = stall.Heartbeat(run_dir, self.rank, self.world, c["stall_after_s"], node, gpus=int(c["gpu"]))
        _quiet_ray_train_loggers()
        self._build()
        self.history, self.position = [], {"epoch": 1, "segments": [], "sums": None}
        self.fell_back = None  # set by _resume when the latest checkpoint was damaged
        self._resume(ray.train.get_checkpoint())
        self.mlflow = MlflowLog(c, self.history, self.fell_back) if self.rank == 0 else None
        self.placement = _placement(self.rank, self.world)
        self._data()
        self.ledger = Ledger(c.get("ledger"), self.rank, self.world, int(_agree(time.time() * 1000, self.device)))
        self.cadence = Cadence(c["checkpoint_every"], c["checkpoint_interval_s"], self.device, self.rank)
        self.upcoming = None  # the next epoch's loader, started while this one validates and checkpoints

    def run(self) -> None:
        self._report_again()
        for epoch in range(self.position["epoch"], self.c["epochs"] + 1):
            if not self.epoch(epoch):
                break  # the loss diverged: every rank stops here, this epoch unsaved
        self.heartbeat.clock.tick(force=True)  # the cost this process adds, to its last second
        if self.mlflow is not None:
            self.mlflow.finish()

    def _report_again(self) -> None:
        """A resumed run reports the epochs it finished before once more, marked ``again``: a
        sweep restarted after a kill starts its ASHA scheduler afresh, and ranks a resumed trial
        on these (a trial past a rung that is not heard there again is never ranked at it)."""
        import ray.train

        for metrics in self.history:
            ray.train.report({k: v for k, v in metrics.items() if k != "checkpoint"} | {"again": True})

    def epoch(self, epoch: int) -> bool:
        """Train, validate, step the schedule, checkpoint, log. False when the loss diverged."""
        t0 = time.perf_counter()
        sums, waited, seg, last_lr = self._train(epoch, t0)
        timing = self._timing(t0, waited)
        total = sums.all_reduce().values()
        if not math.isfinite(total["loss"]):
            _note_divergence(self.c, epoch, total["loss"] / max(total["images"], 1), self.rank)
            return False
        val = self._validate(epoch)
        self._step_schedule(val)
        metrics = _epoch_metrics(epoch, total, val, last_lr, timing, seg)
        self.history.append(metrics)
        self.position = {"epoch": epoch + 1, "segments": [], "sums": None}
        if self.rank == 0:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
            log.info("epoch %d/%d: %s", epoch, self.c["epochs"], shown)
        where = self.save(epoch, None, sums, {**metrics, "checkpoint_score": metrics["val_top1"]})
        if where:  # rank 0's: the epoch's checkpoint, for the LoggedModel that stands for it
            metrics["checkpoint"] = where
        if self.mlflow is not None:
            self.mlflow.log(self.history)
        return True

    def _train(self, epoch: int, t0: float) -> tuple:
        """The epoch's steps left to train: (their metric sums, seconds waiting for data, the
        segment, the last step's lr). Starts the next epoch's loader before returning."""
        c = self.c
        earlier = self.position["segments"] if epoch == self.position["epoch"] else []
        seg, batches, steps = self._batches(epoch, earlier)
        resumed = self.position["sums"] if (earlier and self.rank == 0) else None
        sums = Sums(("loss", "top1", "images"), self.device, resumed)
        epoch_steps = seg.epoch_steps if seg is not None else len(steps)
        scheduled = list(self.sched.get_last_lr())  # the epoch's rate, which the warm-up scales step by step
        warming = epoch <= c["warmup_epochs"]
        self.trained = 0  # steps of this epoch trained in this attempt
        self.cadence.start_epoch()
        progress = EpochProgress(c, self.batch, epoch, seg, t0) if self.rank == 0 and seg is not None else None

        def after_step(step: int, keys) -> None:
            self._after_step(epoch, seg, earlier, sums, progress, step, keys)

        waited = train_one_epoch(
            self.net,
            self.opt,
            batches,
            steps,
            self.train_tf,
            sums,
            gpu=self.gpu,
            channels_last=self.nhwc,
            loss_scale=self.world / self.batch,
            seed=c["seed"],
            epoch=epoch,
            rank=self.rank,
            after_step=after_step,
            before_step=self._warmup(epoch, epoch_steps, scheduled) if warming else None,
            amp=self.amp,
            scaler=self.scaler,
        )
        del batches
        if seg is not None and epoch < c["epochs"]:
            # Starting workers and reading their first batches takes ~1 s an epoch (more with
            # many workers and large shuffle buffers); done now, it overlaps validation and the
            # checkpoint. The next epoch starts at its beginning, whatever this one was.
            self.upcoming = self._loader(epoch + 1, [])
        if warming:  # the schedulers step from the epoch's scheduled rate, not the warmed one
            for group, rate in zip(self.opt.param_groups, scheduled):
                group["lr"] = rate
        factor = recipe.warmup_factor(epoch, epoch_steps - 1, epoch_steps, c["warmup_epochs"], self.warm_start)
        return sums, waited, seg, scheduled[0] * factor

    # --- building and resuming ----------------------------------------------------------------
    def _build(self) -> None:
        """The network on this rank's device, data-parallel, with its optimiser and schedule."""
        import torch
        from ray.train.torch import get_device, prepare_model

        import model

        c = self.c
        self.device = get_device()
        self.gpu = self.device.type == "cuda"
        self.nhwc = self.gpu if c["channels_last"] is None else c["channels_last"]
        torch.manual_seed(c["seed"])
        net = model.build(c["arch"], c["num_classes"], c["init"])
        if self.nhwc:
            net = net.to(memory_format=torch.channels_last)
        net = prepare_model(net)
        self.raw = net.module if hasattr(net, "module") else net  # the weights, whatever wraps them
        self.net = recipe.prepare_network(net, grad_compression=c["grad_compression"], compile=c["compile"])
        self.amp = recipe.amp_dtype(c["amp"], self.gpu)
        # fp16's narrow range needs loss scaling; bf16 has float32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == torch.float16 else None
        self.batch = c["batch_size"]
        peak = recipe.peak_lr(c["lr"], self.batch, c["lr_scaling"], c["lr_reference_batch"])
        self.warm_start = recipe.warmup_from(c["lr"], peak, c["warmup_start"])
        self.opt = recipe.sgd(self.net.parameters(), lr=peak, momentum=c["momentum"], weight_decay=c["weight_decay"])
        self.sched = recipe.scheduler(self.opt, c)

    def _resume(self, ckpt) -> None:
        """The weights, optimiser, schedule, history and position of Ray Train's latest checkpoint."""
        if not ckpt:
            return
        state = self._newest_intact(ckpt)
        self.raw.load_state_dict(state["model"])
        recipe.load_optimizer(self.opt, state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.history, self.position = state["history"], state["position"]
        done = sum(s[2] for s in self.position["segments"])
        at = f", at step {done} of epoch {self.position['epoch']}" if done else ""
        log.info("rank %d resumed after epoch %d%s, on %d workers", self.rank, state["epoch"], at, self.world)

    def _newest_intact(self, ckpt) -> dict:
        """The state of Ray Train's latest checkpoint or, when that one is damaged (a disk or copy
        fault), of the newest intact one before it in the run's folder, saying so."""
        try:
            with ckpt.as_directory() as d:
                return checkpoint.load(d)
        except checkpoint.Damaged as e:
            damaged = e
        folder = storage.join(self.c["storage"], self.c["name"])
        latest = os.path.basename(ckpt.path.rstrip("/"))
        older = sorted(
            (n for n in storage.list_dir(folder) if n.startswith("checkpoint_") and n < latest), reverse=True
        )
        for name in older:
            try:
                state = checkpoint.load(storage.join(folder, name))
            except checkpoint.Damaged:
                continue
            self.fell_back = f"{damaged}; resumed from the newest intact one, {name} (epoch {state['epoch']})"
            if self.rank == 0:
                log.warning("%s", self.fell_back)
            return state
        raise StageError(
            f"{damaged}; no intact checkpoint of run '{self.c['name']}' is older. Train under another --name "
            "to start afresh."
        )

    def _data(self) -> None:
        """Transforms, this rank's share of a batch, its loader processes and decode path."""
        import torch

        import model

        from . import data, plan

        c = self.c
        self.train_tf = model.TrainTransform.from_stats(c["stats"], crop=c["crop"], alphastd=c["lighting"])
        self.eval_tf = model.EvalTransform.from_stats(c["stats"], crop=c["crop"])
        self.per_rank = plan.rank_batches(self.batch, self.world)[self.rank]
        self.loader_workers = c["loader_workers"]
        if self.loader_workers is None:  # a GPU worker's CPUs decode and crop for it; on CPUs they train
            self.loader_workers = max(1, int(c["cpus_per_worker"] or 1)) if self.gpu else 1
        self.decode = data.choose_decode(c["decode"], self.device)  # nvjpeg on a GPU
        if self.rank == 0:  # CPU speed depends on it; Ray sets OMP_NUM_THREADS to the worker's CPUs
            compressed = self.world > 1 and c["grad_compression"] != "none"
            log.info(
                "rank 0 on %s, %d torch threads, %d loader workers, autocast %s%s%s%s",
                self.device,
                torch.get_num_threads(),
                self.loader_workers,
                self.amp or "off",
                ", channels_last" if self.nhwc else "",
                ", compiled" if c["compile"] else "",
                f", gradients all-reduced in {c['grad_compression']}" if compressed else "",
            )

    # --- one epoch's parts --------------------------------------------------------------------
    def _loader(self, epoch: int, earlier) -> tuple:
        """(segment, loader, its started iterator) of this rank's batches in ``epoch``. iter()
        starts the loader workers, which begin filling their prefetch queues at once."""
        from . import data, plan

        c = self.c
        counts = [n for _, n in c["train_shards"]]
        seg = plan.epoch_plan(
            counts,
            seed=c["seed"],
            epoch=epoch,
            batch_size=self.batch,
            world=self.world,
            loader_workers=self.loader_workers,
            buffer=c["shuffle_buffer"],
            segments=earlier,
        )
        loader = data.train_loader(
            c["train_shards"], self.train_tf, segment=seg, rank=self.rank, pin_memory=self.gpu, decode=self.decode
        )
        return seg, loader, iter(loader)

    def _batches(self, epoch: int, earlier) -> tuple:
        """(segment, batches on the device, the epoch's step numbers left to train)."""
        from . import data

        c = self.c
        if c.get("synthetic_steps"):
            # benchmarks/train_step.py: this loop on one fixed random batch, no data pipeline
            fixed = data.synthetic_batches(
                self.per_rank, c["crop"], c["num_classes"], c["synthetic_steps"], self.device
            )
            return None, ((x, y, ()) for x, y in fixed), range(c["synthetic_steps"])
        seg, loader, started = self.upcoming if self.upcoming is not None else self._loader(epoch, earlier)
        self.upcoming = None
        if seg.start == 0 and seg.index > 0 and self.rank == 0:
            log.info(
                "epoch %d: %d steps done on another world size; the %d samples not yet read are dealt "
                "over %d workers (%d steps left)",
                epoch,
                seg.first_step,
                len(seg.order),
                self.world,
                seg.steps,
            )
        return seg, data.on_device(loader, self.device, started), range(seg.first_step + seg.start, seg.epoch_steps)

    def _warmup(self, epoch: int, epoch_steps: int, scheduled: list[float]):
        """before_step for a warm-up epoch: each step's lr, the scheduled rate times its factor."""

        def before_step(step: int) -> None:
            f = recipe.warmup_factor(epoch, step, epoch_steps, self.c["warmup_epochs"], self.warm_start)
            for group, rate in zip(self.opt.param_groups, scheduled):
                group["lr"] = rate * f

        return before_step

    def _after_step(self, epoch: int, seg, earlier, sums, progress, step: int, keys) -> None:
        """The ledger, the progress line, and a mid-epoch checkpoint when the cadence says so."""
        self.ledger.write(epoch, step, keys)
        self.heartbeat.progress("train", epoch, step, keys)
        self.trained += 1
        if progress is not None:
            progress.step(step, self.trained)
        if seg is None:
            return
        self.cadence.step(self.trained)
        if self.cadence.due(step, seg.epoch_steps):
            done = [
                *[list(s) for s in earlier[: seg.index]],
                [self.world, self.loader_workers, step + 1 - seg.first_step],
            ]
            so_far = sums.all_reduce()
            if math.isfinite(so_far.values()["loss"]):  # a diverged epoch is not saved (its end stops the run)
                self.save(epoch, done, so_far, {"epoch": epoch, "step": step + 1, "checkpoint_score": -1.0})

    def _timing(self, t0: float, waited: float) -> dict:
        """The epoch's seconds, seconds waiting for data, and images trained, agreed by all ranks."""
        return {
            "seconds": _agree(time.perf_counter() - t0, self.device),
            "waited": _agree(waited, self.device),
            "images": _agree(self.trained * self.per_rank, self.device, op="sum"),  # this attempt's part
        }

    def _validate(self, epoch: int) -> dict:
        sums = validate(
            self.raw,
            self.c["val_shards"],
            self.eval_tf,
            device=self.device,
            rank=self.rank,
            world=self.world,
            batch_size=self.per_rank,
            loader_workers=self.loader_workers,
            gpu=self.gpu,
            channels_last=self.nhwc,
            decode=self.decode,
            amp=self.amp,
            after_batch=lambda: self.heartbeat.progress("validate", epoch),
        )
        return sums.all_reduce().values()

    def _step_schedule(self, val: dict) -> None:
        n = val["images"]
        if self.c["schedule"] == "plateau":
            self.sched.step(1 - val["top1"] / n if n else 1.0)  # the validation error
        else:
            self.sched.step()

    # --- the checkpoint -------------------------------------------------------------------------
    def save(self, epoch: int, segments, sums: Sums, metrics: dict) -> str | None:
        """Every rank calls it; rank 0 writes the checkpoint (mid-epoch: segments and sums set)
        and returns where it is (None in Ray Train's default storage, which names it itself)."""
        import ray.train

        self.heartbeat.progress("checkpoint", epoch)
        if self.rank != 0:
            ray.train.report(metrics)
            return None
        where = None
        t = time.perf_counter()
        state = self._state(epoch, segments, sums)
        # Every rank waits until the checkpoint is registered, so a checkpoint is never behind
        # the training it describes. (Ray's ASYNC upload lets training run on while a 0.5 GB
        # upload goes to S3: a node lost then resumes from further back.)
        c = self.c
        if not c.get("storage"):  # Ray Train's default storage: written here, then copied by Ray
            with tempfile.TemporaryDirectory() as d:
                checkpoint.save(state, d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        elif storage.is_s3(c["storage"]):
            # Serialized in memory and uploaded from there; Ray Train's report still names a local
            # folder, which stays empty.
            uploaded = []
            with tempfile.TemporaryDirectory() as d:
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(d),
                    checkpoint_upload_fn=_upload_to(c["storage"], c["name"], *checkpoint.serialize(state), uploaded),
                )
            where = uploaded[-1] if uploaded else None
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
            where = d
        at = f" step {sum(s[2] for s in segments)}" if segments else " end"
        log.info("checkpoint at epoch %d%s saved in %.1f s", epoch, at, time.perf_counter() - t)
        return where

    def _state(self, epoch: int, segments, sums: Sums) -> dict:
        """What the checkpoint holds (pipelines/checkpoint.py describes each field)."""
        if segments is None:  # the epoch is finished: the next starts from its beginning
            finished, position = epoch, {"epoch": epoch + 1, "segments": [], "sums": None}
        else:
            finished, position = epoch - 1, {"epoch": epoch, "segments": segments, "sums": sums.values()}
        c = self.c
        return {
            "model": self.raw.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "epoch": finished,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": self.history,
            "position": position,
            "config": {k: c[k] for k in STATE_CONFIG},
            "wnids": c["wnids"],
            "stats": c["stats"],
            "workers": self.placement,
            "saved_at": now_iso(),
        }


def _epoch_metrics(epoch: int, total: dict, val: dict, lr: float, timing: dict, seg) -> dict:
    """An epoch's metrics from the all-reduced sums: those in METRICS, and its sample counts."""
    n = val["images"]
    return {
        "epoch": epoch,
        "train_loss": total["loss"] / total["images"],
        "train_top1": total["top1"] / total["images"],
        "val_loss": val["loss"] / n if n else float("nan"),
        "val_top1": val["top1"] / n if n else 0.0,
        "val_top5": val["top5"] / n if n else 0.0,
        "lr": lr,
        "images_per_second": timing["images"] / max(timing["seconds"], 1e-9),
        "data_wait_fraction": timing["waited"] / max(timing["seconds"], 1e-9),
        "samples": int(total["images"]),
        "left_out": seg.remainder if seg is not None else 0,
    }


def _quiet_ray_train_loggers() -> None:
    """Ray Train names one of its loggers by file path, outside the `ray.train` level its
    LoggingConfig sets (train.run): it would print a 500-character line per report and rank."""
    for logger_name in list(logging.root.manager.loggerDict):
        if logger_name.endswith(".py") and f"{os.sep}ray{os.sep}train{os.sep}" in logger_name:
            logging.getLogger(logger_name).setLevel(logging.WARNING)


def _upload_to(runs: str, name: str, data, checksum: str, uploaded: list):
    """Ray Train's upload of a checkpoint (serialized: ``data``, ``checksum``) to the S3 run
    folder ``runs/name``, by the project's S3 layer. Ray's own copy (``pyarrow.fs.copy_files``)
    drops an error raised when a Python filesystem's file is closed, so a refused last upload
    would register a checkpoint that is not there; this one raises it. Its URL is appended to
    ``uploaded``."""
    import ray.train

    def upload(local: ray.train.Checkpoint, folder: str) -> ray.train.Checkpoint:
        url = storage.join(runs, name, folder)
        checkpoint.upload(data, checksum, url)
        uploaded.append(url)
        fs, path = arrowfs.filesystem(url)
        return ray.train.Checkpoint(path, filesystem=fs)

    return upload


def _placement(rank: int, world: int) -> list[dict]:
    """Which node each rank of this worker group runs on: the checkpoint keeps it, the driver's
    summary names the nodes that did the work."""
    import ray

    here = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
    if world == 1:
        return [here]
    import torch.distributed as dist

    placement = [None] * world
    dist.all_gather_object(placement, here)
    return placement


class Cadence:
    """When to checkpoint inside an epoch: every --checkpoint-every steps or, unset, measured once:
    the step time over 20 steps (after the loader's 3 of warm-up) sets the interval to about
    checkpoint_interval_s. A measurement spans no epoch end (validation is not a step)."""

    def __init__(self, every: int | None, interval_s: float, device, rank: int):
        self.every, self.interval_s, self.device, self.rank = every, interval_s, device, rank
        self.steps, self.probe = 0, None  # steps this process trained; (steps, time) at the probe's start

    def start_epoch(self) -> None:
        self.probe = None

    def step(self, trained_this_epoch: int) -> None:
        self.steps += 1
        if self.every is not None:
            return
        if self.probe is None and trained_this_epoch == 3:
            self.probe = (self.steps, time.perf_counter())
        elif self.probe is not None and self.steps == self.probe[0] + 20:
            step_s = _agree((time.perf_counter() - self.probe[1]) / 20, self.device)  # every rank: the slowest
            self.every = max(1, math.ceil(self.interval_s / step_s))
            if self.rank == 0:
                log.info("%.3f s a step: a checkpoint every %d steps (--checkpoint-every)", step_s, self.every)

    def due(self, step: int, epoch_steps: int) -> bool:
        """After ``step`` (0-based), a checkpoint is due (never at the epoch's end, which has its own)."""
        return bool(self.every) and (step + 1) % self.every == 0 and step + 1 < epoch_steps


class EpochProgress:
    """Rank 0's progress lines inside an epoch (ImageNet's are ~10,000 steps): every
    --progress-every steps, by default a tenth of an epoch apart."""

    def __init__(self, c: dict, batch: int, epoch: int, seg, t0: float):
        self.epochs, self.batch, self.epoch, self.seg, self.t0 = c["epochs"], batch, epoch, seg, t0
        self.every = c.get("progress_every") or max(1, seg.epoch_steps // 10)

    def step(self, step: int, trained: int) -> None:
        steps = self.seg.epoch_steps
        if (step + 1) % self.every or step + 1 >= steps:
            return
        took = time.perf_counter() - self.t0
        step_s = took / trained
        epoch_left = (steps - step - 1) * step_s
        run_left = epoch_left + (self.epochs - self.epoch) * steps * step_s
        log.info(
            "epoch %d/%d step %d/%d: %.0f images/s, epoch ETA %s, run ETA %s",
            self.epoch,
            self.epochs,
            step + 1,
            steps,
            trained * self.batch / took,
            fmt_seconds(epoch_left),
            fmt_seconds(run_left),
        )


class MlflowLog:
    """Rank 0's side of tracking: the epochs' metrics after each checkpoint, on a thread of its
    own (one, so epochs arrive in order) so that no rank waits for MLflow, and MLflow's system
    metrics. An outage only delays the logging (_log_history)."""

    def __init__(self, c: dict, history: list[dict], fell_back: str | None = None):
        os.environ["MLFLOW_TRACKING_URI"] = c["tracking_uri"]
        # Fail fast while the server is away (MLflow would otherwise retry for minutes inside
        # one call and stall training); _log_history catches up at the next epoch.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id, self.run_dir, self.price = c["run_id"], storage.join(c["storage"], c["name"]), c["price_per_hour"]
        self.val_digest = c.get("val_digest")
        _log_history(self.run_id, history, self.val_digest)  # epochs a crash left unlogged
        if fell_back:  # the run says it skipped a damaged checkpoint, for whoever reads it later
            _when_reachable(tracking.set_tags, self.run_id, {RESUMED_PAST_DAMAGED: fell_back[:4000]})
        self.monitor = _system_metrics(self.run_id, c["tracking_uri"])
        self.thread, self.pending = concurrent.futures.ThreadPoolExecutor(1, "mlflow-log"), None

    def log(self, history: list[dict]) -> None:
        """After the checkpoint: a crash in between leaves the step unlogged, and the resumed
        worker logs it from the checkpoint's history; never twice."""
        if self.pending is not None:
            self.pending.result()  # an error that is not an outage stops the run here
        self.pending = self.thread.submit(self._log, list(history))

    def _log(self, history: list[dict]) -> None:
        """The epochs, then the cost so far (pipelines/meter.py) at the last epoch's step."""
        if _log_history(self.run_id, history, self.val_digest):
            spent = meter.metrics(meter.hours(self.run_dir), self.price)
            _when_reachable(tracking.log_metrics_once, self.run_id, spent, history[-1]["epoch"])

    def finish(self) -> None:
        if self.pending is not None:
            self.pending.result()
        self.thread.shutdown()
        if self.monitor is not None:
            self.monitor.finish()


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


# --- the loop's steps, validation, and what ranks agree on --------------------------------------
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
    after_batch=None,
) -> Sums:
    """This rank's share of the val samples (every sample once across ranks), centre crop:
    loss sum, top-1 and top-5 hits, images. The caller all-reduces. ``after_batch()`` runs after
    each batch (the stall heartbeat)."""
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
            if after_batch is not None:
                after_batch()
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
        out, loss = recipe.train_step(net, opt, x, y, amp, loss_scale, scaler)
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


def _log_history(run_id: str, history: list[dict], val_digest: str | None = None) -> bool:
    """Log every epoch of ``history`` not logged yet; False (and a warning) if MLflow is down.

    Training never waits on the tracking server: the checkpoint keeps the history, the next
    epoch (or the driver at the end) logs what an outage held back, each step once."""
    try:
        log_epochs(run_id, history, val_digest)
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


def _when_reachable(fn, *args) -> None:
    """``fn(*args)``, MLflow work that can wait: an outage is said, not raised."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - an outage: training goes on; anything else: raised
        if not tracking.is_outage(e):
            raise
        log.warning("MLflow not reachable (%s): %s skipped", str(e).splitlines()[0][:200], fn.__name__)


def log_epochs(run_id: str, history: list[dict], val_digest: str | None = None) -> None:
    """Log the epochs this process has not logged yet (each step at most once); raises on failure.
    An epoch whose checkpoint is known becomes a LoggedModel, its metrics that model's (the val
    ones measured on the val shards of digest ``val_digest``)."""
    for m in history:
        if m["epoch"] not in _logged:
            model_id = tracking.checkpoint_model(run_id, m["epoch"], m["checkpoint"]) if m.get("checkpoint") else None
            val = {k: m[k] for k in METRICS if k.startswith("val_")}
            dataset = (contract.dataset_name("val"), val_digest) if val_digest and model_id else None
            tracking.log_metrics_once(run_id, val, step=m["epoch"], model_id=model_id, dataset=dataset)
            rest = {k: m[k] for k in METRICS if k not in val}
            tracking.log_metrics_once(run_id, rest, step=m["epoch"], model_id=model_id)
            _logged.add(m["epoch"])
