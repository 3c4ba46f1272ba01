"""Training: the 2012 AlexNet on Ray Train data-parallel workers, tracked in MLflow.

    python -m pipelines train --data /data/alexnet --workers 8 --gpu --name alexnet-paper
    python -m pipelines train --data s3://bucket/imagenet --workers 4-8 --gpu --name spot   # elastic

The driver: it checks the inputs and flags before any MLflow run, opens (or resumes) the run
named --name, starts the Ray Train workers (pipelines/worker.py) with the recipe of
pipelines/recipe.py, and at the end logs the best epoch's model and the run's summary.
Checkpoints are written every ``--checkpoint-every`` steps and at each epoch's end, holding the
data plan's position, so a rerun of the same --name, a worker restarted by FailureConfig, or a
worker group resized by elastic training (``--workers MIN-MAX``) continues at the step after the
last checkpoint, inside the same MLflow run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

from . import arrowfs, checkpoint, contract, lease, lineage, meter, registry, stall, storage, tracking
from .cluster import ensure_ray, on_cluster
from .common import off_the_main_thread
from .config import TrainConfig
from .errors import StageError
from .recipe import AMPS, GRAD_COMPRESSIONS, LR_SCALINGS, SCHEDULES, resolve_amp
from .worker import DIVERGED, log_epochs, train_loop


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


# --- the driver -------------------------------------------------------------------------------
def _inputs(cfg: TrainConfig) -> dict:
    """Everything the workers need from ROOT, checked before any worker starts."""
    inputs = contract.read_training_inputs(cfg.data, cfg.allow_stale)
    inputs["allowed_stale"] += _check_geometry(cfg, inputs["train_manifest"], inputs["val_manifest"])
    return inputs


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
    """Every flag's value, before anything runs: a typo costs no cluster start and no MLflow run."""
    _validate_choices(cfg)
    _validate_numbers(cfg)
    _check_amp(cfg, cfg.gpu)


def _validate_choices(cfg: TrainConfig) -> None:
    import model

    from . import data

    if cfg.decode not in data.DECODES:
        raise StageError(
            f"Unknown decode '{cfg.decode}'. Expected one of: {', '.join(data.DECODES)} "
            "(auto: on the GPU when training on one, else in the loader workers)."
        )
    for flag, value, allowed in (
        ("--amp", cfg.amp, AMPS),
        ("--lr-scaling", cfg.lr_scaling, LR_SCALINGS),
        ("--grad-compression", cfg.grad_compression, GRAD_COMPRESSIONS),
        ("--stall-action", cfg.stall_action, stall.ACTIONS),
    ):
        if value not in allowed:
            raise StageError(f"Unknown {flag} '{value}'. Expected one of: {', '.join(allowed)}.")
    if cfg.ledger and storage.is_s3(cfg.ledger):
        raise StageError(f"--ledger {cfg.ledger}: the sample ledger is a local folder (a debugging aid).")
    if cfg.schedule not in SCHEDULES:
        raise StageError(f"Unknown schedule '{cfg.schedule}'. Expected one of: {', '.join(SCHEDULES)}.")
    if cfg.arch not in model.ARCHS:
        raise StageError(f"Unknown arch '{cfg.arch}'. Expected one of: {', '.join(model.ARCHS)}.")
    if cfg.init not in model.INITS:
        raise StageError(f"Unknown init '{cfg.init}'. Expected one of: {', '.join(model.INITS)}.")


def _validate_numbers(cfg: TrainConfig) -> None:
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
    if cfg.crop < 64:
        raise StageError(f"--crop {cfg.crop}: AlexNet needs at least 64 px.")
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
    if not cfg.stall_after_s > 0:
        raise StageError(f"--stall-after {cfg.stall_after_s}: must be above 0 seconds (the default is 120).")
    if cfg.batch_per_worker is not None and cfg.batch_per_worker < 1:
        raise StageError(f"--batch-per-worker {cfg.batch_per_worker}: must be at least 1.")
    if cfg.price_per_hour is not None and not cfg.price_per_hour >= 0:
        raise StageError(f"--price-per-hour {cfg.price_per_hour}: a worker's price for an hour, at least 0.")


@dataclasses.dataclass(frozen=True)
class Within:
    """A training run that another's driver started: nested under ``parent_run_id`` (the demo's
    pipeline run, a sweep), with ``tags`` of its own, and Ray Train ``callbacks`` beside the
    workers' reports (a sweep's report of each epoch to Ray Tune)."""

    parent_run_id: str | None = None
    tags: dict = dataclasses.field(default_factory=dict)
    callbacks: tuple = ()


def checked(cfg: TrainConfig, inputs: dict | None = None) -> tuple[TrainConfig, dict]:
    """Every flag, ROOT's inputs (read here unless given) and the epoch plan, before any Ray or
    MLflow run: the config with --batch-per-worker made a global batch, and the inputs."""
    if cfg.batch_per_worker is not None:  # the global batch of the largest world; smaller ones share it
        cfg = dataclasses.replace(cfg, batch_size=cfg.batch_per_worker * cfg.workers)
    _validate(cfg)
    if inputs is None:
        inputs = _inputs(cfg)
    else:
        _check_geometry(cfg, inputs["train_manifest"], inputs["val_manifest"])
    _check_plan(cfg, inputs)
    return cfg, inputs


def run(cfg: TrainConfig, within: Within = Within()) -> dict:
    """Train; ``within`` says what another driver (the demo, a sweep) starts this run under."""
    t0 = time.monotonic()
    cfg, inputs = checked(cfg)
    tracking.check_reachable()
    name = cfg.name or "alexnet-" + time.strftime("%Y%m%d-%H%M%S")
    runs = cfg.storage or storage.join(cfg.data, "runs")
    runs = runs if storage.is_s3(runs) else os.path.abspath(runs)

    ray = ensure_ray(dashboard=True)
    gpu = cfg.gpu if cfg.gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    _check_amp(cfg, gpu)
    cpus = cpus_per_worker(cfg, ray.nodes(), gpu)
    _check_capacity(cfg, ray.cluster_resources(), gpu, cpus)  # before the MLflow run: a typo leaves no run
    # One training run per name at a time: a second would share the first's checkpoints and MLflow run.
    with lease.hold(storage.join(runs, name), "train"):
        return _train(cfg, within, name, runs, gpu, cpus, inputs, t0)


def _train(cfg: TrainConfig, within: Within, name: str, runs: str, gpu: bool, cpus: float, inputs: dict, t0) -> dict:
    """The MLflow run (new, or the name's to resume), the fit, the model, the summary."""
    run_id = tracking.start_or_resume_run(cfg.experiment, name, tags={"pipelines.stage": "train", **within.tags})
    if within.parent_run_id and "mlflow.parentRunId" not in tracking.get_tags(run_id):
        tracking.set_tags(run_id, {"mlflow.parentRunId": within.parent_run_id})  # a resumed run keeps its place
    done = _finished(run_id, cfg.epochs)
    if done:  # rerunning a finished run: nothing to train, the model is already logged
        tracking.end_run(run_id, "FINISHED")
        cost = meter.metrics(meter.hours(storage.join(runs, name)), cfg.price_per_hour)
        return _summary(cfg, name, run_id, *done[:3], time.monotonic() - t0, cost, skipped=True, best=done[3])
    resolved = _record_start(cfg, run_id, name, runs, gpu, cpus, inputs)
    result = _fit(resolved, inputs, run_id, within.callbacks)
    state, ckpt_dir, best_state, best_dir = _checkpoints(result, runs)
    cost = meter.metrics(meter.hours(storage.join(runs, name)), cfg.price_per_hour)
    model_uri = _record_end(cfg, run_id, state, (ckpt_dir, best_state, best_dir), inputs, cost)
    seconds = time.monotonic() - t0
    return _summary(cfg, name, run_id, state, ckpt_dir, model_uri, seconds, cost, gpu=gpu, best=(best_state, best_dir))


def _record_start(cfg: TrainConfig, run_id: str, name: str, runs: str, gpu: bool, cpus: float, inputs: dict):
    """The run's parameters, datasets, config, classes, stats and lineage; returns the config
    with every default made concrete (name, checkpoint folder, GPU, decode path, CPUs, autocast)."""
    from . import data

    # Workers train on CUDA exactly when gpu is set, so "auto" resolves here and the run
    # records the decode path it used.
    decode = data.choose_decode(cfg.decode, "cuda" if gpu else "cpu")
    resolved = dataclasses.replace(
        cfg, name=name, storage=runs, gpu=gpu, decode=decode, cpus_per_worker=cpus, amp=resolve_amp(cfg.amp, gpu)
    )
    train_m, val_m = inputs["train_manifest"], inputs["val_manifest"]
    params = {"num_classes": inputs["num_classes"], "train_samples": train_m["samples"]}
    conflicts = tracking.log_params(run_id, {**dataclasses.asdict(resolved), **tracking.environment(), **params})
    if conflicts:
        print(
            f"train: warning: resuming '{name}' with changed settings, kept the first values of: "
            f"{', '.join(conflicts)}",
            file=sys.stderr,
        )
    # val_m is what val_top1 (and the best checkpoint's choice) was measured on
    for split, m, context in (("train", train_m, "training"), ("val", val_m, "validation")):
        lineage.log_dataset(
            run_id,
            name=contract.dataset_name(split),
            digest=m["digest"],
            source=contract.manifest_url(cfg.data, split),
            profile={"samples": m["samples"], "shards": len(m["shards"])},
            context=context,
        )
    tracking.log_yaml(run_id, dataclasses.asdict(resolved), "config.yaml")
    tracking.log_json(run_id, storage.read_json(inputs["classes_url"]), "classes.json")
    tracking.log_json(run_id, storage.read_json(inputs["stats_url"]), "stats.json")
    makers = lineage.find_stage_runs(train_m["digest"], experiment=None)
    if makers:
        tracking.set_tags(run_id, {"pipelines.shard_runs": ",".join(r["run_id"] for r in makers)})
    lineage.link_lineage(run_id, lineage.lineage(train_m["digest"]), f"`{cfg.data}`")
    tracking.set_tags(run_id, tracking.allowed_stale_tag(inputs["allowed_stale"]))
    return resolved


LOOP_INPUTS = ("train_shards", "val_shards", "stats", "num_classes", "classes_digest", "wnids", "resize", "keep_aspect")


def _fit(cfg: TrainConfig, inputs: dict, run_id: str, callbacks: tuple = ()):
    """Ray Train's fit of the workers (``cfg`` resolved); the run is FAILED if it raises."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # s3:// checkpoints go through the project's S3 layer: its AWS_* settings, and a refused key read afresh
    runs_fs, runs_path = arrowfs.filesystem(cfg.storage)
    loop_config = {
        **dataclasses.asdict(cfg),
        **{k: inputs[k] for k in LOOP_INPUTS},
        "run_id": run_id,
        "tracking_uri": tracking.tracking_uri(),
        "val_digest": inputs["val_manifest"]["digest"],  # what each epoch's model's val metrics were measured on
    }
    # --workers MIN-MAX: Ray Train starts with as many as it can get (at least MIN) and, when a
    # node is lost, restarts the group on the workers left; the plan re-deals the epoch's rest.
    workers = (cfg.min_workers, cfg.workers) if cfg.min_workers is not None else cfg.workers
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=cfg.name,
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
            callbacks=list(callbacks),
        ),
    )
    # A Ray of this machine alone, started for this process: no cloud drains its node, and Ray
    # Train's preemption watcher would be one more actor process, whose start Ray reports with an
    # error-level line. A cluster's runs keep it. (Read from the environment as fit() starts.)
    watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
    off = {} if on_cluster() or watcher in os.environ else {watcher: "0"}
    os.environ.update(off)
    if cfg.min_workers is not None:
        _take_over_reservation(storage.join(cfg.storage, cfg.name), trainer.train_run_context.run_id)
    try:
        result = _watched(trainer.fit, cfg, run_id)
    finally:
        for k in off:
            os.environ.pop(k, None)
    _check_divergence(cfg.storage, cfg.name, run_id)
    if result.checkpoint is None:
        tracking.end_run(run_id, "FAILED")
        raise StageError(f"Training '{cfg.name}' ended without a checkpoint; see the worker logs above.")
    return result


RESERVATION = ".ray-train-run"  # in the run's folder: the Ray Train run id of its latest elastic fit


def _take_over_reservation(run_dir: str, ray_run_id: str) -> None:
    """An elastic fit reserves the cluster's workers with Ray's autoscaling coordinator, and a
    fit whose driver died (SIGKILL, a lost head node) keeps that reservation until it expires,
    3 minutes later: the run's rerun would wait that long for its first worker. The rerun holds
    the run's lease, so no earlier fit of this name is alive: its reservation is cancelled, and
    this fit's id noted for the next. Ray's coordinator is internal API: if it moved, the rerun
    only waits, saying so."""
    url = storage.join(run_dir, RESERVATION)
    found = storage.read_versioned(url)  # one request: (bytes, version), or None
    earlier = found[0].decode() if found else None
    if earlier:
        import ray

        try:
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                get_or_create_autoscaling_coordinator,
            )

            coordinator = get_or_create_autoscaling_coordinator()
            ray.get(coordinator.cancel_request.remote(requester_id=f"train-{earlier}"), timeout=30)
        except Exception as e:  # noqa: BLE001 - an optimisation: without it the rerun waits, no more
            print(
                f"train: could not release the workers an earlier fit of this run reserved ({e}); "
                "Ray frees them within 3 minutes",
                file=sys.stderr,
            )
    storage.write_bytes(url, ray_run_id.encode())


def _watched(fit, cfg: TrainConfig, run_id: str):
    """``fit()`` with the stall watch (pipelines/stall.py) beside it; the run is FAILED, or
    KILLED on Ctrl-C, if it raises (it must not stay RUNNING; a rerun of the name resumes it)."""
    run_dir = storage.join(cfg.storage, cfg.name)
    storage.remove(storage.join(run_dir, DIVERGED))  # an earlier attempt's note: this one decides anew
    stall.clear(run_dir)
    watch = stall.Watch(run_dir, run_id, cfg.stall_after_s, cfg.stall_action).start()
    try:
        # Off the main thread: Ray Train's fit registers its own SIGINT handler when it runs on
        # the main thread, which aborts the workers (a traceback each) and exits 1. Here Ctrl-C
        # ends the run KILLED with one line, as in every stage; the workers end with the driver.
        return off_the_main_thread(fit, "ray-train-fit")
    except BaseException as e:
        tracking.end_run(run_id, "FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    finally:
        watch.stop()


def _checkpoints(result, runs: str) -> tuple:
    """(state, folder) of the latest checkpoint (what a rerun resumes from), and of the best
    epoch by val_top1 (mid-epoch checkpoints score -1), the one the model is made from."""

    def where(ckpt) -> str:
        return f"s3://{ckpt.path}" if storage.is_s3(runs) else ckpt.path

    ckpt_dir = where(result.checkpoint)
    state = checkpoint.load(ckpt_dir)
    ranked = sorted(result.best_checkpoints or [], key=lambda cm: cm[1].get("checkpoint_score", -1), reverse=True)
    for best, _ in ranked:  # a damaged one (a disk fault since it was written) is passed over, saying so
        best_dir = where(best)
        if best_dir == ckpt_dir:
            return state, ckpt_dir, state, ckpt_dir
        try:
            return state, ckpt_dir, checkpoint.load(best_dir), best_dir
        except checkpoint.Damaged as e:
            print(f"warning: {e}; the model is made from the next best checkpoint", file=sys.stderr, flush=True)
    return state, ckpt_dir, state, ckpt_dir


def _record_end(cfg, run_id: str, state: dict, checkpoints: tuple, inputs: dict, cost: dict) -> str:
    """The epochs an outage held back, the run's cost, the model (of the best of ``checkpoints``:
    the latest's folder, the best's state and folder), the run's tags and its end, each waiting
    for the server as long as PIPELINES_TRACKING_PATIENCE_S; returns the model's URI."""
    ckpt_dir, best_state, best_dir = checkpoints
    patience = float(os.environ.get("PIPELINES_TRACKING_PATIENCE_S", 900))
    _when_tracking_is_back(
        "logging the epochs' metrics",
        lambda: log_epochs(run_id, state["history"], inputs["val_manifest"]["digest"]),
        patience,
    )
    # every worker has stopped: the whole run's cost, over what the workers logged as it went
    _when_tracking_is_back("logging the cost", lambda: tracking.log_metrics(run_id, cost, state["epoch"]), patience)
    # Where the model came from, on its LoggedModel and on the registered version's page
    origin = {
        "pipelines.run_id": run_id,
        tracking.CHECKPOINT_TAG: best_dir,
        tracking.EPOCH_TAG: str(best_state["epoch"]),
        "pipelines.train_shards_digest": inputs["train_manifest"]["digest"],
        "pipelines.val_shards_digest": inputs["val_manifest"]["digest"],
        "pipelines.git_commit": tracking.environment()["git_sha"],
    }
    model_uri = _when_tracking_is_back(
        "logging the model", lambda: _log_classifier(cfg, run_id, best_state, inputs, origin), patience
    )
    tags = {
        "pipelines.checkpoint": ckpt_dir,
        "pipelines.best_checkpoint": best_dir,
        "pipelines.data": cfg.data,
        "pipelines.model_uri": model_uri,
    }
    _when_tracking_is_back(
        "finishing the run", lambda: (tracking.set_tags(run_id, tags), tracking.end_run(run_id, "FINISHED")), patience
    )
    return model_uri


def _log_classifier(cfg: TrainConfig, run_id: str, state: dict, inputs: dict, tags: dict) -> str:
    """The image classifier of ``state`` (pipelines/classifier.py), with two val images as its
    input example, and ``tags``; registered under --register with the alias --alias."""

    import pandas as pd

    from . import answer, classifier, tarindex

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
        answer.classify(
            checkpoint.model_from_state(state).eval(),
            list(example["image"]),
            geometry,
            json.loads(classes),
            json.loads(stats_),
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = classifier.artifacts(state, geometry, classes, stats_, tmp)
        return registry.log_classifier(
            run_id, files, example, output, register=cfg.register, alias=cfg.alias, tags=tags
        )


def _finished(run_id: str, epochs: int):
    """(state, checkpoint, model uri) when this run already trained ``epochs`` and logged its model."""
    tags = tracking.get_tags(run_id)
    if "pipelines.checkpoint" not in tags or "pipelines.model_uri" not in tags:
        return None
    if not checkpoint.exists(tags["pipelines.checkpoint"]):
        return None
    best = tags.get("pipelines.best_checkpoint", tags["pipelines.checkpoint"])
    try:
        state = checkpoint.load(tags["pipelines.checkpoint"])
        if state["epoch"] < epochs:
            return None
        return state, tags["pipelines.checkpoint"], tags["pipelines.model_uri"], (checkpoint.load(best), best)
    except checkpoint.Damaged:  # training resumes from the newest intact checkpoint (the worker says which)
        return None


def _by_node(workers: list[dict]) -> list[dict]:
    nodes: dict[str, dict] = {}
    for w in workers:
        nodes.setdefault(w["node"], {"node": w["node"], "ip": w["ip"], "ranks": []})["ranks"].append(w["rank"])
    return sorted(nodes.values(), key=lambda n: n["ranks"][0])


def _summary(cfg, name, run_id, state, ckpt_dir, model_uri, seconds, cost, skipped=False, gpu=None, best=None) -> dict:
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
        "cost": cost,  # worker-hours and GPU-hours over every worker that ran, restarts included
        "input_digest": contract.read_manifest(cfg.data, "train")["digest"],
    }
