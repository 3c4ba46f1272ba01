"""Sweeps: Ray Tune over the training stage, each trial a training run nested under one MLflow run.

    python -m pipelines sweep --data /data/alexnet --name lr-wd --lr log:0.001:0.05 \\
        --weight-decay 0,0.0005 --trials 8 --epochs 30 --gpu --workers 4

Each trial is the project's own training (pipelines/train.py) with one point of the search
space, started by a Ray Tune trial as Ray Train V2 documents it (a Tune function that runs the
trainer, here ``train.run``): its MLflow run NAME-trial-NN is nested under the sweep's run NAME,
its checkpoints are in ROOT/runs/NAME-trial-NN, and each epoch's val_top1 goes to Tune, whose
ASHA scheduler stops the trials that trail. The sweep's run then holds the search space, a table
of the trials (the decision on each, its cost), a plot of val_top1 by epoch, and the best trial;
``--register`` registers that trial's model. Tune's experiment folder is ROOT/runs/NAME: a rerun
of the same --name restores it (finished trials are not rerun, interrupted ones resume from
their checkpoints) and keeps the one MLflow tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time

from ray.tune import Callback

from . import contract, lease, meter, storage, tracking, train
from .cluster import ensure_ray, on_cluster
from .common import off_the_main_thread
from .config import SEARCHED, SweepConfig, TrainConfig
from .errors import StageError

TRIALS = "trials"  # in the sweep's folder: one record per trial, written by the trial itself
SUMMARY, PROGRESS = contract.SWEEP_SUMMARY, contract.SWEEP_PROGRESS  # in the sweep's folder
DECISION = "pipelines.sweep.decision"  # a trial run's tag: finished, stopped by ASHA, failed
KINDS = {"lr": float, "weight_decay": float, "batch_size": int, "crop": int, "schedule": str}
TRIAL_MEMORY = 1 << 20  # a trial's driver only waits on its Ray Train run: a token, so no CPU is held


# --- the search space -----------------------------------------------------------------------------
def parse_space(flag: str, text: str, kind) -> tuple:
    """``a,b,c`` -> ("grid", [a, b, c]); ``log:LO:HI`` / ``uniform:LO:HI`` -> (that, LO, HI)."""
    head, _, rest = text.partition(":")
    if head in ("log", "uniform"):
        lo, _, hi = rest.partition(":")
        try:
            lo, hi = kind(lo), kind(hi)
        except ValueError:
            lo = hi = None
        if kind is str or lo is None or not 0 < lo < hi or (head == "uniform" and lo == hi):
            raise StageError(
                f"--{flag} {text}: a draw is log:LO:HI or uniform:LO:HI with 0 < LO < HI"
                + (" (a list of values, like plateau,cosine, for this flag)" if kind is str else "")
                + "."
            )
        return (head, lo, hi)
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise StageError(f"--{flag} {text}: expected values like 0.005,0.01,0.02 or a draw like log:0.001:0.05.")
    return ("grid", values)


def _domain(space: tuple):
    from ray import tune

    kind, *args = space
    if kind == "grid":
        return tune.grid_search(args[0])
    lo, hi = args
    if isinstance(lo, int):
        return tune.lograndint(lo, hi + 1) if kind == "log" else tune.randint(lo, hi + 1)
    return tune.loguniform(lo, hi) if kind == "log" else tune.uniform(lo, hi)


def _corners(space: tuple) -> list:
    """The values a space's extremes take: each is checked as a training config before any work."""
    return space[1] if space[0] == "grid" else [space[1], space[2]]


def _points(spaces: dict) -> int:
    """The grid's points: the product of its dimensions' lengths (1 without a grid)."""
    return math.prod(len(s[1]) for s in spaces.values() if s[0] == "grid")


def _trial_count(cfg: SweepConfig, spaces: dict) -> int:
    points = _points(spaces)
    draws = [f"--{k.replace('_', '-')}" for k, s in spaces.items() if s[0] != "grid"]
    if cfg.trials is None:
        if draws:
            raise StageError(f"{', '.join(draws)} draw values: say how many trials with --trials N.")
        return points
    if cfg.trials < 1 or cfg.trials % points:
        raise StageError(
            f"--trials {cfg.trials}: the grid has {points} points, each tried equally often: "
            f"use a multiple of {points}."
        )
    return cfg.trials


# --- before any work ------------------------------------------------------------------------------
def _check(cfg: SweepConfig) -> tuple[dict, TrainConfig, dict, int]:
    """The spaces, the trials' shared config, ROOT's inputs and the trial count; every value at
    the edges of the space checked as train checks its flags."""
    spaces = {k: parse_space(k.replace("_", "-"), getattr(cfg, k), KINDS[k]) for k in SEARCHED if getattr(cfg, k)}
    if not spaces:
        raise StageError(
            "Nothing to search: give at least one of --lr, --weight-decay, --batch-size, --crop, --schedule "
            "(a grid 0.005,0.01,0.02 or a draw log:0.001:0.05)."
        )
    if "batch_size" in spaces and cfg.train.get("batch_per_worker") is not None:
        raise StageError("--batch-size is searched: leave out --batch-per-worker.")
    unknown = set(cfg.train) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise StageError(f"Not a training setting: {', '.join(sorted(unknown))}.")
    # A single value is no search: it is every trial's setting, as train's flag would be.
    single = {k: s[1][0] for k, s in spaces.items() if s[0] == "grid" and len(s[1]) == 1}
    spaces = {k: s for k, s in spaces.items() if k not in single}
    base = TrainConfig(data=cfg.data, **{**cfg.train, **single})
    _check_scheduler(cfg, base.epochs)
    trials = _trial_count(cfg, spaces)
    # the trials' config checked at the first corner of the space, then every other corner
    base_checked, inputs = train.checked(dataclasses.replace(base, **{k: _corners(s)[0] for k, s in spaces.items()}))
    for key, space in spaces.items():
        for value in _corners(space)[1:]:
            train.checked(dataclasses.replace(base_checked, **{key: value}), inputs)
    return spaces, dataclasses.replace(base_checked, **{k: getattr(base, k) for k in spaces}), inputs, trials


def _check_scheduler(cfg: SweepConfig, epochs: int) -> None:
    if cfg.scheduler == "asha" and not 1 <= cfg.grace_epochs <= epochs:
        raise StageError(f"--grace-epochs {cfg.grace_epochs}: from 1 to --epochs ({epochs}).")
    if cfg.reduction_factor < 2:
        raise StageError(f"--reduction-factor {cfg.reduction_factor}: at least 2 (2 keeps the better half).")
    if cfg.max_concurrent is not None and cfg.max_concurrent < 1:
        raise StageError(f"--max-concurrent {cfg.max_concurrent}: at least 1.")


# --- the driver -----------------------------------------------------------------------------------
def run(cfg: SweepConfig) -> dict:
    t0 = time.monotonic()
    spaces, base, _, trials = _check(cfg)
    tracking.check_reachable()
    runs = base.storage or storage.join(cfg.data, "runs")
    runs = runs if storage.is_s3(runs) else os.path.abspath(runs)
    ray = ensure_ray(dashboard=True)
    concurrent, base = _concurrency(cfg, dataclasses.replace(base, storage=runs), trials, ray)
    # One driver per sweep at a time: a second would run the same trials into the same runs.
    with lease.hold(storage.join(runs, cfg.name), "sweep"):
        return _sweep(cfg, spaces, base, trials, concurrent, t0)


def _concurrency(cfg: SweepConfig, base: TrainConfig, trials: int, ray) -> tuple[int, TrainConfig]:
    """Trials at a time (--max-concurrent, or as many as the cluster holds at once, at most
    --trials), and the trials' config with its device and each worker's CPUs made concrete: on
    CPUs a trial's workers share the CPUs left to it, so K trials at once never wait on each other."""
    res = ray.cluster_resources()
    gpu = base.gpu if base.gpu is not None else res.get("GPU", 0) >= 1
    fits = int(res.get("GPU" if gpu else "CPU", 0) // base.workers)
    concurrent = cfg.max_concurrent or max(1, min(fits, trials))
    cpus = base.cpus_per_worker
    if cpus is None and gpu:
        cpus = train.cpus_per_worker(base, ray.nodes(), True)
    elif cpus is None:
        cpus = float(min(max(res.get("CPU", 0) // (base.workers * concurrent), 1), base.max_cpus_per_worker))
    kind = "GPU" if gpu else "CPU"
    need = concurrent * base.workers * (1 if gpu else cpus)
    if not on_cluster() and need > res.get(kind, 0):  # a cluster may autoscale; this machine will not
        each = "one GPU" if gpu else f"{cpus:g} CPUs"
        if fits < 1:  # not even one trial: fewer workers, not fewer trials
            raise StageError(
                f"--workers {base.workers} needs {base.workers} {kind}s for each trial and this machine's Ray has "
                f"{res.get(kind, 0):g}: use --workers {max(int(res.get(kind, 0)), 1)} or fewer, or a cluster "
                "(RAY_ADDRESS)."
            )
        raise StageError(
            f"--max-concurrent {concurrent} trials of {base.workers} workers with {each} each need "
            f"{need:g} {kind}s and this machine's Ray has {res.get(kind, 0):g}: use --max-concurrent "
            f"{max(fits, 1)} or fewer, or a cluster (RAY_ADDRESS)."
        )
    return concurrent, dataclasses.replace(base, gpu=gpu, cpus_per_worker=cpus)


def _sweep(cfg: SweepConfig, spaces: dict, base: TrainConfig, trials: int, concurrent: int, t0: float) -> dict:
    """The sweep's MLflow run (new, or the name's to resume), Tune's fit, the record of its trials."""
    folder = storage.join(base.storage, cfg.name)
    parent = tracking.start_or_resume_run(base.experiment, cfg.name, tags={"pipelines.stage": "sweep"})
    done = _finished(folder)
    try:
        _same_sweep(cfg, parent, spaces, base, trials)
    except StageError:
        tracking.end_run(parent, "FINISHED" if done else "KILLED")  # as it was: a refused rerun changes nothing
        raise
    if done:  # rerunning a finished sweep: every trial has its decision, nothing to rerun
        tracking.end_run(parent, "FINISHED")
        print(_said(cfg, done) + " (it had finished: nothing was run)", file=sys.stderr, flush=True)
        return {**done, "skipped": True, "seconds": round(time.monotonic() - t0, 2)}
    _record_start(cfg, parent, spaces, base, concurrent)
    tuner = _tuner(cfg, spaces, base, trials, concurrent, parent)
    print(
        f"sweep {cfg.name}: {trials} trials of up to {base.epochs} epochs, {concurrent} at a time "
        f"({cfg.scheduler}); MLflow run {parent}",
        file=sys.stderr,
        flush=True,
    )
    try:
        # Off the main thread, as train's fit: Ctrl-C ends the sweep with one line, its run KILLED.
        # Tune prints its heading to stdout, where a stage writes only its JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            grid = off_the_main_thread(tuner.fit, "ray-tune-fit")
    except BaseException as e:
        if not isinstance(e, Exception):  # Ctrl-C: Tune's loop, left running, says no more
            logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        tracking.end_run(parent, "FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    return _record_end(cfg, parent, folder, grid, base, t0)


def _same_sweep(cfg: SweepConfig, parent: str, spaces: dict, base: TrainConfig, trials: int) -> None:
    """The sweep's space, as params of its run; a rerun of the name with another space is
    refused (Tune restores the trials it drew, not a new space)."""
    fixed = {"search." + k.replace("_", "-"): getattr(cfg, k) for k in spaces}
    fixed.update(trials=trials, scheduler=cfg.scheduler, grace_epochs=cfg.grace_epochs)
    fixed.update(reduction_factor=cfg.reduction_factor, epochs=base.epochs)
    conflicts = tracking.log_params(parent, fixed)
    if conflicts:
        raise StageError(
            f"Sweep '{cfg.name}' was started with other {', '.join(conflicts)}: a rerun of a name resumes "
            "that sweep as it was; give this one a new --name."
        )


def _record_start(cfg: SweepConfig, parent: str, spaces: dict, base: TrainConfig, concurrent: int) -> None:
    """The training flags given, how many trials ran at a time, and the space as a document."""
    given = {f"train.{k}": v for k, v in cfg.train.items()}
    tracking.log_params(parent, {**given, "max_concurrent": concurrent, "workers": base.workers})
    tracking.log_json(parent, {k: list(v) for k, v in spaces.items()}, "search_space.json")


def _tuner(cfg: SweepConfig, spaces: dict, base: TrainConfig, trials: int, concurrent: int, parent: str):
    """Tune's experiment ROOT/runs/NAME: restored when it exists, else a new one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from .arrowfs import filesystem

    fs, path = filesystem(base.storage)
    trainable = tune.with_resources(_trial, {"CPU": 0, "memory": TRIAL_MEMORY})
    space = {
        "searched": {k: _domain(s) for k, s in spaces.items()},
        "base": dataclasses.asdict(base),
        # the submitting shell's tracking server, wherever a trial runs (Tune's own MLflow
        # callback leaves that to the environment of each node)
        "sweep": {"name": cfg.name, "parent": parent, "tracking_uri": tracking.tracking_uri()},
    }
    experiment = storage.join(path, cfg.name) if fs is None else f"{path}/{cfg.name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        print(f"sweep {cfg.name}: resuming its trials", file=sys.stderr, flush=True)
        return tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, param_space=space, storage_filesystem=fs
        )
    points = _points(spaces)
    scheduler = (
        ASHAScheduler(
            time_attr="epoch", max_t=base.epochs, grace_period=cfg.grace_epochs, reduction_factor=cfg.reduction_factor
        )
        if cfg.scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_top1",
            mode="max",
            num_samples=trials // points,
            scheduler=scheduler,
            # the same draws for the same --seed; a trial that waits holds no process (Tune's
            # max_concurrent_trials would be ignored beside a search algorithm of one's own)
            search_alg=BasicVariantGenerator(random_state=base.seed, max_concurrent=concurrent),
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            # a trial's driver lost with its node is started again, and its training resumes
            failure_config=tune.FailureConfig(max_failures=base.max_failures),
            verbose=0,  # the progress lines below say what Tune's tables would
            callbacks=[Progress(cfg.name, storage.join(base.storage, cfg.name), trials, base.epochs)],
        ),
    )


# --- a trial (in a Ray Tune trial's process) ------------------------------------------------------
def trial_name(sweep: str, index: int) -> str:
    return f"{sweep}-trial-{index:02d}"


def _trial(config: dict) -> None:
    """One trial: train.run with this point of the space, nested under the sweep's run. Its
    record (ROOT/runs/SWEEP/trials/NN.json) says it ran, then how it ended; an error of the run's
    own (a diverged loss, a bad value) is recorded and not retried, as retrying cannot mend it."""
    from ray import tune

    s = config["sweep"]
    os.environ["MLFLOW_TRACKING_URI"] = s["tracking_uri"]
    trial_id = tune.get_context().get_trial_id()
    index = int(trial_id.rsplit("_", 1)[-1])
    values = config["searched"]
    base = config["base"]
    name = trial_name(s["name"], index)
    record = storage.join(base["storage"], s["name"], TRIALS, f"{index:02d}.json")
    doc = {"trial": index, "trial_id": trial_id, "name": name, "values": values, "state": "running"}
    storage.write_json(record, doc)
    cfg = TrainConfig(**{**base, **values, "name": name})
    tags = {"pipelines.sweep": s["name"], "pipelines.trial": str(index)}
    try:
        out = _train_when_free(cfg, train.Within(s["parent"], tags, (_epochs_to_tune(cfg.epochs),)))
    except StageError as e:
        storage.write_json(record, {**doc, "state": "failed", "error": str(e)})
        return
    storage.write_json(record, {**doc, "state": "finished", "run_id": out["run_id"], "model_uri": out["model_uri"]})
    # The last epoch, reported once the run has its model: ASHA stops every trial that reaches
    # the last epoch, and Tune ends a stopped trial's process at once.
    tune.report(
        {k: out[k] for k in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5")} | {"epoch": out["epochs"]}
    )


def _train_when_free(cfg: TrainConfig, within: train.Within) -> dict:
    """train.run, once the trial's run is free: the run a killed sweep's trial left on another
    node holds its lease until the lease goes stale (a holder on this node is seen gone at once)."""
    deadline = time.monotonic() + lease.stale_after() + 2 * lease.beat_every()
    while True:
        try:
            return train.run(cfg, within=within)
        except lease.LeaseHeld as e:
            if time.monotonic() > deadline:
                raise
            print(f"trial {cfg.name}: waiting for an earlier run of it to let go: {e}", file=sys.stderr, flush=True)
            time.sleep(lease.beat_every())


def _epochs_to_tune(epochs: int):
    """Ray Train's reports to Ray Tune (TuneReportCallback), those of epoch ends before the last:
    the mid-epoch checkpoints' reports hold no val_top1 for ASHA to rank, and the last epoch's
    waits for the run's end (_trial)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if "val_top1" in metrics[0] and metrics[0]["epoch"] < epochs:
                super().after_report(run_context, metrics, checkpoint)

    return EpochsToTune()


class Progress(Callback):
    """Tune's events as the sweep's progress: a line for each trial's epochs and end, with the
    counts, also written to ROOT/runs/NAME/progress.json for `status`."""

    def __init__(self, name: str, folder: str, trials: int, epochs: int):
        self.name, self.folder, self.trials, self.epochs = name, folder, trials, epochs
        self.t0, self.best = time.monotonic(), None  # best: (val_top1, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.best is None or result["val_top1"] > self.best[0]:
            self.best = (result["val_top1"], _index(trial))
        values = trial.config["searched"].items()
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values)
        epoch = f"epoch {result['epoch']}/{self.epochs}" + (" (before the restart)" if result.get("again") else "")
        self._say(f"trial {_index(trial)} {epoch}: val_top1 {result['val_top1']:.4f} ({shown})", trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epoch = trial.last_result.get("epoch", 0)
        how = "trained every epoch" if epoch >= self.epochs else f"stopped at epoch {epoch}"
        try:  # the trial's own record says when its run failed (and why)
            rec = storage.read_json(storage.join(self.folder, TRIALS, f"{_index(trial)}.json"))
            how = f"failed: {rec['error']}" if rec["state"] == "failed" else how
        except (OSError, ValueError, KeyError, StageError):
            pass
        self._say(f"trial {_index(trial)} {how}", trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"trial {_index(trial)} failed (its lines above say why)", trials)

    def _say(self, what: str, trials) -> None:
        counts = {
            "ended": sum(t.status in ("TERMINATED", "ERROR") for t in trials),
            "running": sum(t.status == "RUNNING" for t in trials),
            "stopped_early": sum(
                t.status == "TERMINATED" and t.last_result.get("epoch", 0) < self.epochs for t in trials
            ),
        }
        said = f"{counts['ended']}/{self.trials} ended, {counts['running']} running"
        if self.best is not None:
            counts.update(best_val_top1=self.best[0], best_trial=self.best[1])
            said += f"; best val_top1 so far {counts['best_val_top1']:.4f} (trial {counts['best_trial']})"
        elapsed = time.monotonic() - self.t0
        print(f"sweep {self.name}: {what} [{said}; {elapsed:.0f} s]", file=sys.stderr, flush=True)
        try:
            storage.write_json(storage.join(self.folder, PROGRESS), {"trials": self.trials, **counts})
        except OSError as e:  # progress is for people: a store that hiccups only delays it
            print(f"sweep {self.name}: progress not written ({e})", file=sys.stderr)


def _index(trial) -> str:
    return f"{int(trial.trial_id.rsplit('_', 1)[-1]):02d}"


# --- the record of the trials ---------------------------------------------------------------------
def _records(folder: str) -> list[dict]:
    url = storage.join(folder, TRIALS)
    return [storage.read_json(storage.join(url, n)) for n in storage.list_dir(url) if n.endswith(".json")]


def _rows(folder: str, grid, base: TrainConfig) -> list[dict]:
    """One row per trial: its values, its MLflow run, val_top1 by epoch (as Tune saw it), the
    decision on it and its cost."""
    results = list(grid)
    rows = []
    for rec in sorted(_records(folder), key=lambda r: r["trial"]):
        result = next((r for r in results if rec["trial_id"] in str(r.path)), None)
        curve = _curve(result)
        epoch = max(curve, default=0)
        if rec["state"] == "finished":
            decision = f"finished at epoch {epoch}"
        elif rec["state"] == "failed":
            decision = f"failed: {rec['error']}"
        elif result is not None and result.error is not None:
            decision = f"failed: {str(result.error).strip().splitlines()[-1][:300]}"
        else:
            decision = f"stopped at epoch {epoch} by ASHA"
        run_id = rec.get("run_id") or tracking.find_run(base.experiment, rec["name"])
        last = result.metrics if result is not None and result.metrics else {}
        spent = meter.metrics(meter.hours(storage.join(base.storage, rec["name"])), base.price_per_hour)
        rows.append(
            {
                "trial": rec["trial"],
                "name": rec["name"],
                "run_id": run_id,
                **rec["values"],
                "epochs": epoch,
                "val_top1": curve.get(epoch, float("nan")),
                "best_val_top1": max(curve.values(), default=float("nan")),
                "decision": decision,
                "model_uri": rec.get("model_uri"),
                **spent,
                "curve": curve,
                "last_report": last.get("timestamp"),  # when Tune had the trial's last epoch
            }
        )
    return rows


def _curve(result) -> dict[int, float]:
    """val_top1 by epoch, from the results Tune recorded for one trial."""
    if result is None or result.metrics_dataframe is None or "val_top1" not in result.metrics_dataframe:
        return {}
    df = result.metrics_dataframe.dropna(subset=["val_top1"])
    return {int(e): float(v) for e, v in zip(df["epoch"], df["val_top1"])}


def _record_end(cfg: SweepConfig, parent: str, folder: str, grid, base: TrainConfig, t0: float) -> dict:
    """Each trial run's decision (a stopped one is ended here: its driver was stopped with it),
    then the sweep run's table, plot, best trial, model and cost; the summary, also in
    ROOT/runs/NAME/sweep.json, where a rerun and `status` find it."""
    rows = _rows(folder, grid, base)
    for row in rows:
        if row["run_id"]:
            _settle(row)
    finished = [r for r in rows if r["decision"].startswith("finished")]
    best = max(finished, key=lambda r: r["best_val_top1"], default=None)
    model_uri = _register(cfg, best, parent) if best else None
    cost = {k: sum(r.get(k, 0.0) for r in rows) for k in rows[0] if k.startswith("cost/")} if rows else {}
    table = [{k: v for k, v in r.items() if k not in ("curve", "last_report")} for r in rows]
    tracking.log_table(parent, table, "trials.json")
    tracking.log_figure(parent, _plot(cfg.name, rows), "val_top1_by_epoch.png")
    counts = {f"trials_{k}": sum(r["decision"].startswith(k) for r in rows) for k in ("finished", "stopped", "failed")}
    tracking.log_metrics(parent, {**cost, **counts, **({"best_val_top1": best["best_val_top1"]} if best else {})})
    if best:
        tracking.set_tags(
            parent, {"pipelines.sweep.best_trial": best["name"], "pipelines.sweep.best_run_id": best["run_id"]}
        )
    summary = {
        "stage": "sweep",
        "data": cfg.data,
        "name": cfg.name,
        "run_id": parent,
        "trials": table,
        "best": {k: v for k, v in best.items() if k not in ("curve", "last_report")} if best else None,
        "model_uri": model_uri,
        "cost": cost,
        **counts,
    }
    storage.write_json(storage.join(folder, SUMMARY), summary)
    tracking.end_run(parent, "FINISHED")
    print(_said(cfg, summary), file=sys.stderr, flush=True)
    return {**summary, "skipped": False, "seconds": round(time.monotonic() - t0, 2)}


def _said(cfg: SweepConfig, summary: dict) -> str:
    """The sweep's end in a line: how its trials ended, the best one and its model."""
    counts = ", ".join(f"{summary[f'trials_{k}']} {k}" for k in ("finished", "stopped", "failed"))
    best = summary["best"]
    if best is None:
        unregistered = f"; nothing registered as {cfg.register}" if cfg.register else ""
        return f"sweep {cfg.name}: {len(summary['trials'])} trials ({counts}); no trial finished{unregistered}"
    values = ", ".join(f"{k} {best[k]:g}" if isinstance(best[k], float) else f"{k} {best[k]}" for k in _searched(best))
    return (
        f"sweep {cfg.name}: {len(summary['trials'])} trials ({counts}); best {best['name']}: val_top1 "
        f"{best['best_val_top1']:.4f} ({values}), model {summary['model_uri']}"
    )


def _searched(row: dict) -> list[str]:
    return [k for k in SEARCHED if k in row]


def _settle(row: dict) -> None:
    """A trial run's decision tag; a run ASHA stopped (its driver ended with it) gets its cost
    and its end here, and a failed one its end."""
    tracking.set_tags(row["run_id"], {DECISION: row["decision"]})
    if row["decision"].startswith("stopped"):
        tracking.log_metrics(row["run_id"], {k: v for k, v in row.items() if k.startswith("cost/")}, row["epochs"])
        tracking.end_run(row["run_id"], "FINISHED", end_time=row["last_report"])  # not the sweep's end
    elif row["decision"].startswith("failed"):  # a trial lost for good leaves its run RUNNING
        tracking.end_run(row["run_id"], "FAILED", end_time=row["last_report"])


def _register(cfg: SweepConfig, best: dict, parent: str) -> str:
    """The best trial's model; with --register, a registry version that names the sweep."""
    if not cfg.register:
        return best["model_uri"]
    from . import registry

    tags = {"pipelines.sweep": cfg.name, "pipelines.sweep_run_id": parent, "pipelines.run_id": best["run_id"]}
    return registry.register(best["model_uri"], cfg.register, cfg.alias, tags)


def _plot(name: str, rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["curve"]:
            epochs = sorted(r["curve"])
            style = "-" if r["decision"].startswith("finished") else ":"  # stopped or failed: dotted
            label = f"{r['trial']:02d}: {r['decision'][:40]}"
            ax.plot(epochs, [r["curve"][e] for e in epochs], style, marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="val_top1", title=f"sweep {name}: val_top1 by epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _finished(folder: str) -> dict | None:
    """The summary of a sweep that already ended, or None."""
    url = storage.join(folder, SUMMARY)
    if not storage.exists(url):
        return None
    doc = storage.read_json(url)
    return doc if doc.get("stage") == "sweep" else None
