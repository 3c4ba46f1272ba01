"""The main job on its embedded defaults: ``make demo`` / ``python -m pipelines demo``.

Generates a small ImageNet-format sample (the original tarballs + devkit, read in place),
then runs index -> shard -> stats on it and shows the dataset's status. Everything lands
under ``--out`` (default ./demo); a second run finds every stage done and redoes nothing.
"""
from __future__ import annotations

import sys
import time

from . import index, sample, shard, stats, status, storage
from .config import IndexConfig, ShardConfig, StatsConfig, StatusConfig

SAMPLE = dict(classes=10, train_per_class=60, val_per_class=10, bad=True)  # ~1 s to generate
SAMPLES_PER_SHARD = 100  # 6 train shards: enough to spread over 2 CPU workers


def _step(name: str) -> None:
    print(f"\n== {name}", file=sys.stderr, flush=True)


def run(args: dict) -> dict:
    out = args.get("out", "demo")
    t0 = time.monotonic()
    src, data = storage.join(out, "imagenet-sample"), storage.join(out, "data")
    if not storage.exists(storage.join(src, "truth.json")):
        _step(f"sample: a small ImageNet-format dataset in {src}")
        sample.run(sample.SampleConfig(out=src, **SAMPLE))
    source = storage.join(src, "tarballs")
    _step(f"index: {source} -> {data}")
    summaries = {"index": index.run(IndexConfig(source=source, data=data, samples_per_shard=SAMPLES_PER_SHARD))}
    _step("shard: one Ray task per shard")
    summaries["shard"] = shard.run(ShardConfig(data=data))
    _step("stats: mean, std and RGB eigen-decomposition over the training shards")
    summaries["stats"] = stats.run(StatsConfig(data=data))
    st = status.run(StatusConfig(data=data))
    print("\n" + status.format_table(st), file=sys.stderr)
    rejected = summaries["shard"]["rejected"]
    print(f"\nShards: {storage.join(data, 'shards')}  stats: {storage.join(data, 'stats.json')}\n"
          f"{rejected} damaged inputs (planted on purpose) were quarantined with their reasons in "
          f"{index.paths(data)['rejected']}.", file=sys.stderr)
    return {"stage": "demo", "data": data, "seconds": round(time.monotonic() - t0, 2),
            "samples": summaries["shard"]["samples"], "rejected": rejected,
            "states": st["states"], "stages": {k: {"skipped": v["skipped"], "seconds": v["seconds"]}
                                               for k, v in summaries.items()}}
