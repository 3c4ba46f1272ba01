"""index, shard and stats in one process: ``python -m pipelines prepare --source SRC --data ROOT``.

The same three stages as run one by one, with the same flags and defaults, writing the same
files: each is still its own MLflow run (experiment 'preprocessing'), nested under one run
'prepare', and each can still be rerun alone. What one process saves is the start-up the three
would each pay (Python's imports, MLflow's store, the local workers' start and torch import):
the local workers start while the index reads the source, and the shard and stats stages share
them. A rerun finds each stage's work done and redoes nothing.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from . import index, shard, stats, storage, tracking
from .cluster import local_workers_shared, prestart_local_pool
from .config import IndexConfig, PrepareConfig, ShardConfig, StatsConfig
from .contract import index_paths
from .errors import StrictFailure

EXPERIMENT = "preprocessing"
STEPS = {  # what each stage does, as its heading says
    "index": "the source's images, their labels and shards",
    "shard": "decode, resize and re-encode the images into webdataset shards",
    "stats": "mean, std and RGB eigen-decomposition over the training shards",
}


def stage_configs(cfg: PrepareConfig) -> dict:
    """Each stage's config from prepare's flags (the fields they share); --strict is judged once,
    at the end, over every input the index and the shard stage rejected."""
    given = {**dataclasses.asdict(cfg), "strict": False}
    return {
        name: cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})
        for name, cls in (("index", IndexConfig), ("shard", ShardConfig), ("stats", StatsConfig))
    }


def check(cfg: PrepareConfig) -> None:
    """Every flag and the source, before any work or MLflow run."""
    configs = stage_configs(cfg)
    index.check(configs["index"])
    shard.check_flags(configs["shard"])


def warm_start(cfg: PrepareConfig) -> None:
    """The shard stage's local workers start now and import torch while the index reads the
    source, when the shard stage will use them: a local source under --ray-min-bytes (an S3
    source waits for the index, whose sizes say)."""
    if not storage.is_s3(cfg.source):
        prestart_local_pool(
            cfg.parallel, lambda: _local_bytes(cfg.source, cfg.ray_min_bytes), cfg.ray_min_bytes, 1.0, shard.__name__
        )


def _local_bytes(folder: str, enough: int) -> int:
    """The bytes of the files below ``folder``, counted until there are ``enough``."""
    total = 0
    for _, size, _ in storage.walk_files(folder):
        total += size
        if total >= enough:
            break
    return total


def stages(configs: dict, parent, experiment: str = EXPERIMENT) -> dict:
    """index, shard and stats, each an MLflow run of its own nested under ``parent`` (a run id,
    or the future of one still opening); the local workers are handed from stage to stage."""
    runs = dict(experiment=experiment, parent_run_id=parent)
    done = {}
    with local_workers_shared():
        for name, module in (("index", index), ("shard", shard), ("stats", stats)):
            print(f"\n== {name}: {STEPS[name]}", file=sys.stderr, flush=True)
            if hasattr(module, "warm_start") and name != "index":
                module.warm_start(configs[name])  # no-op where workers were started for it
            done[name] = tracking.track_stage(name, configs[name], module.run, **runs)
    return done


def run(cfg: PrepareConfig) -> dict:
    t0 = time.monotonic()
    tracking.check_reachable()
    with tracking.on_a_thread(_open_run, cfg) as opening:
        try:
            done = stages(stage_configs(cfg), opening)
        except BaseException as e:
            if opening.exception() is None:
                tracking.end_run(opening.result(), "FAILED" if isinstance(e, Exception) else "KILLED")
            raise
    summary = {
        "stage": "prepare",
        "data": cfg.data,
        **{name: {k: v for k, v in s.items() if k != "stage"} for name, s in done.items()},
        "seconds": round(time.monotonic() - t0, 2),
        "mlflow_run_id": opening.result(),
    }
    rejected = done["shard"]["rejected"]  # the index's and the shard stage's, as the shard run counts them
    if cfg.strict and rejected:
        tracking.end_run(opening.result(), "FAILED")
        raise StrictFailure(
            f"--strict: {rejected} inputs were rejected; reasons in {index_paths(cfg.data)['rejected']}. "
            "The shards and stats were written.",
            summary,
        )
    tracking.end_run(opening.result())
    return summary


def _open_run(cfg: PrepareConfig) -> str:
    run_id = tracking.start_pipeline_run(EXPERIMENT, "prepare", "prepare", {"pipelines.data": cfg.data})
    tracking.log_params(run_id, {**dataclasses.asdict(cfg), **tracking.environment()})
    return run_id
