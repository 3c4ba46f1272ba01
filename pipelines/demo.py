"""The main job on its embedded defaults: ``make demo`` / ``python -m pipelines demo``.

Generates a small ImageNet-format sample (the original tarballs + devkit, read in place), then
runs index -> shard -> stats -> train (2 CPU workers) -> evaluate, every stage tracked in MLflow
(a SQLite store under --out unless MLFLOW_TRACKING_URI is set), and ends with a summary:
accuracy, where the shards and checkpoints are, and the command that opens the MLflow UI.
A second run finds the preprocessing done and resumes the finished training run: no work redone.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import contract, evaluate, prepare, sample, status, storage, tracking, train
from .cluster import ensure_ray
from .config import EvaluateConfig, IndexConfig, ShardConfig, StatsConfig, StatusConfig, TrainConfig

SAMPLE = dict(classes=10, train_per_class=60, val_per_class=10, bad=True)  # ~3 s to generate
SAMPLES_PER_SHARD = 100  # 6 train shards: enough to spread over 2 CPU workers
# Small images so 2 CPU cores train in minutes (the paper's 256/224 runs ~34 img/s per core here).
RESIZE, CROP = 72, 64
# He init learns on small data at once (model/alexnet.py); the paper's batch of 128 keeps the
# per-step cost (optimiser and all-reduce over 61M parameters) to few steps per epoch on CPU.
TRAIN = dict(
    workers=2,
    epochs=8,
    batch_size=128,
    lr=0.01,
    init="kaiming",
    name="demo",
    patience=3,
    experiment="demo",
    register="alexnet-demo",
)  # alias "champion": the model to use


def _step(name: str) -> None:
    print(f"\n== {name}", file=sys.stderr, flush=True)


def run(args: dict) -> dict:
    out = os.path.abspath(args.get("out", "demo"))
    t0 = time.monotonic()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")
    tracking.check_reachable()
    src, data = storage.join(out, "imagenet-sample"), storage.join(out, "data")
    os.makedirs(out, exist_ok=True)
    # One run for the whole pipeline, the stage runs and the training run nested under it (and the
    # evaluations under training): the MLflow UI shows the demo as one tree in its experiment.
    # It opens on a thread while the sample is made on one core: a new SQLite store's schema
    # migrations and MLflow's imports take ~3 s of the other.
    with tracking.on_a_thread(
        tracking.start_pipeline_run, TRAIN["experiment"], "pipeline", "demo", {"pipelines.data": data}
    ) as opening:
        if not storage.exists(storage.join(src, "truth.json")):
            _step(f"sample: a small ImageNet-format dataset in {src}")
            sample.run(sample.SampleConfig(out=src, **SAMPLE))
        pipeline = opening.result()
    try:
        s = _stages(storage.join(src, "tarballs"), data, pipeline)
    except BaseException as e:
        tracking.end_run(pipeline, "FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    tracking.end_run(pipeline)
    print("\n" + status.format_table(status.run(StatusConfig(data=data))), file=sys.stderr)
    uri = tracking.tracking_uri()
    e, e10 = s["evaluate"], s["evaluate10"]
    print(_summary_text(s, data, uri, time.monotonic() - t0), file=sys.stderr)
    return {
        "stage": "demo",
        "data": data,
        "seconds": round(time.monotonic() - t0, 2),
        "top1": e["top1"],
        "top5": e["top5"],
        "top1_10crop": e10["top1"],
        "top5_10crop": e10["top5"],
        "run_id": s["train"]["run_id"],
        "checkpoint": s["train"]["checkpoint"],
        "tracking_uri": uri,
    }


def _stages(source: str, data: str, pipeline: str) -> dict:
    """index, shard, stats, train and both evaluations, each nested under the pipeline's run."""
    ensure_ray(dashboard=True)  # one local Ray for shard, stats and train; train wants the dashboard
    configs = {
        "index": IndexConfig(source=source, data=data, samples_per_shard=SAMPLES_PER_SHARD),
        "shard": ShardConfig(data=data, resize=RESIZE),
        "stats": StatsConfig(data=data),
    }
    s = prepare.stages(configs, pipeline, experiment=TRAIN["experiment"])
    _step(
        f"train: AlexNet (2012) on {TRAIN['workers']} Ray Train CPU workers, {TRAIN['epochs']} epochs, {CROP} px crops"
    )
    s["train"] = train.run(TrainConfig(data=data, crop=CROP, gpu=False, **TRAIN), train.Within(pipeline))
    _step("evaluate: centre crop and the paper's 10 crops on the val shards")
    s["evaluate"] = evaluate.run(EvaluateConfig(data=data, run_id=s["train"]["run_id"], gpu=False))
    s["evaluate10"] = evaluate.run(EvaluateConfig(data=data, run_id=s["train"]["run_id"], ten_crop=True, gpu=False))
    return s


def _summary_text(s: dict, data: str, uri: str, seconds: float) -> str:
    """What the demo did and where to look, with commands that work from any folder."""
    bin_dir = Path(sys.executable).parent
    cli = (
        str(bin_dir / "alexnet-pipelines")
        if (bin_dir / "alexnet-pipelines").exists()
        else f"{sys.executable} -m pipelines"
    )
    ui = (
        f"{bin_dir / 'mlflow'} ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"
        if uri.startswith("sqlite")
        else f"open {uri}"
    )
    again = f"MLFLOW_TRACKING_URI={uri} {cli} evaluate --data {data} --run-id {s['train']['run_id']} --ten-crop"
    e, e10 = s["evaluate"], s["evaluate10"]
    quarantined = f"{s['shard']['rejected']} damaged inputs quarantined in {contract.index_paths(data)['rejected']}"
    return f"""
== summary
val top-1 {e["top1"]:.1%}, top-5 {e["top5"]:.1%} (centre crop); \
10-crop top-1 {e10["top1"]:.1%}, top-5 {e10["top5"]:.1%}
   on {e["images"]} val images of {SAMPLE["classes"]} classes (chance: {1 / SAMPLE["classes"]:.0%})
shards:      {storage.join(data, "shards")}  ({s["shard"]["samples"]} samples, {quarantined})
checkpoint:  {s["train"]["checkpoint"]}
MLflow run:  {s["train"]["run_id"]} \
(experiment '{TRAIN["experiment"]}', nested with the stage runs under run 'pipeline')
MLflow UI:   {ui}
evaluate:    {again}
took {seconds:.0f} s"""
