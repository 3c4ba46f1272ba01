"""How each preprocessing stage's cost grows with the dataset: N, 2N and 4N images of ImageNet's shape.

    python -m benchmarks.scale [--n 25000] [--size 64x48] [--resize 64]      (make bench-scale)

For each scale k in 1, 2, 4 it generates an ImageNet-shaped source (`sample --imagenet`:
1,000 classes, the devkit's 1,860 synsets, the original tarball layout) of k x N images, 80%
train and 20% val, small images so that the run measures the per-image and per-class
overheads rather than JPEG work, and runs `index`, `shard` and `stats` on it, each as the
command a user types, in a fresh process. Per stage and scale it reports:

  wall s          process start to exit (imports, MLflow, Ray start-up included)
  stage s         the stage's own `seconds` (its work, after start-up)
  us/image        stage s per image, and its ratio to the value at N (1.00: linear)
  driver MB       the stage process's peak resident memory (ru_maxrss; Ray's workers apart)
  index B/img     bytes of ROOT/index/*.parquet per image (index row only)
  manifest B/img  bytes of the shard manifests and sample indexes per image (shard row only)

and the growth of driver memory per added image from N to 4N. Then the training epoch plan at
ImageNet's full size (1,281,167 samples in shards of 1,024, 64 ranks x 8 loader workers, global
batch 64 x 128) is made as the pure function it is, in a fresh process: the plan, and every
rank's and loader worker's stream of it, timed, with the process's peak memory.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

from . import common

SCALES = (1, 2, 4)
STAGES = ("index", "shard", "stats")
IMAGENET_TRAIN = 1_281_167

# Runs a module as `python -m` would and writes the process's peak RSS (kB) to the file named by
# $PEAK_RSS_FILE at exit, SystemExit included: the driver's memory, not Ray's worker processes'.
_PEAK = """
import atexit, os, resource, runpy, sys
atexit.register(
    lambda: open(os.environ["PEAK_RSS_FILE"], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
)
sys.argv = ["pipelines", *sys.argv[1:]]
runpy.run_module("pipelines", run_name="__main__", alter_sys=True)
"""

_PLAN = """
import json, resource, sys, time
import numpy as np
from pipelines import plan
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
samples, per_shard, world, workers, batch = map(int, sys.argv[1:6])
counts = [per_shard] * (samples // per_shard) + ([samples % per_shard] if samples % per_shard else [])
t0 = time.perf_counter()
seg = plan.epoch_plan(counts, seed=0, epoch=1, batch_size=batch, world=world, loader_workers=workers)
t_plan = time.perf_counter() - t0
t1 = time.perf_counter()
one = seg.stream(0, 0)
t_one = time.perf_counter() - t1
t2 = time.perf_counter()
seen = 0
for r in range(world):
    for w in range(workers):
        seen += sum(len(idx) for _, idx in seg.stream(r, w))
t_all = time.perf_counter() - t2
print(json.dumps({"shards": len(counts), "plan_s": t_plan, "one_worker_s": t_one, "all_workers_s": t_all,
                  "samples_in_streams": seen, "steps": seg.steps,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "imports_mb": before / 1024}))
"""


def _env(cache: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A store of the benchmark's own, made once before the first timed stage (its creation is a
    # one-off, not a cost that grows with the data).
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{os.path.abspath(cache)}/mlflow.db", "PYTHONPATH": os.getcwd()}


def _source(cache: str, images: int, size: str) -> tuple[str, dict]:
    """An ImageNet-shaped tarball source of ``images`` images (80% train), built once and cached."""
    train_pc, val_pc = max(1, round(images * 0.8 / 1000)), max(1, round(images * 0.2 / 1000))
    tag = f"imagenet-{train_pc}x{val_pc}-{size}"
    out = os.path.join(cache, tag)
    if not os.path.exists(os.path.join(out, "truth.json")):
        shutil.rmtree(out, ignore_errors=True)
        print(
            f"making an ImageNet-shaped source of {1000 * (train_pc + val_pc):,} {size} images in {out} ...",
            file=sys.stderr,
            flush=True,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines",
                "--quiet",
                "sample",
                "--out",
                out,
                "--imagenet",
                "--layouts",
                "tarballs",
                "--train-per-class",
                str(train_pc),
                "--val-per-class",
                str(val_pc),
                "--size",
                size,
            ],
            check=True,
            env=_env(cache),
            stdout=subprocess.DEVNULL,
        )
    return os.path.join(out, "tarballs"), {"train": 1000 * train_pc, "val": 1000 * val_pc}


def _stage(argv: list[str], cache: str) -> dict:
    """One stage command in a fresh process: its summary, wall time and peak RSS."""
    peak = os.path.join(cache, "peak-rss")
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", _PEAK, "--quiet", *argv],
        env={**_env(cache), "PEAK_RSS_FILE": peak},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    return {"summary": summary, "wall": wall, "peak_mb": int(open(peak).read()) / 1024}


def _bytes(pattern: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(pattern, recursive=True))


def _epoch_plan(samples: int, per_shard: int, world: int, workers: int, batch: int) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", _PLAN, str(samples), str(per_shard), str(world), str(workers), str(batch)],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=25_000, help="images at the smallest scale (default 25000)")
    ap.add_argument("--size", default="64x48", help="nominal source image size WxH (default 64x48)")
    ap.add_argument("--resize", type=int, default=64, help="the shards' image size (default 64)")
    ap.add_argument("--samples-per-shard", type=int, default=1024)
    ap.add_argument("--cache", default=os.path.join(common.OUT, "scale-cache"))
    a = ap.parse_args(argv)
    t_start = time.monotonic()
    os.makedirs(a.cache, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pipelines", "--quiet", "status", "--data", os.path.join(a.cache, "none")],
        env=_env(a.cache),
        capture_output=True,
    )  # imports warm in the page cache, nothing timed

    rows, results = [], {}
    for k in SCALES:
        src, counts = _source(a.cache, k * a.n, a.size)
        images = counts["train"] + counts["val"]
        data = os.path.join(a.cache, f"data-{k}")
        shutil.rmtree(data, ignore_errors=True)
        r = {
            "index": _stage(
                ["index", "--source", src, "--data", data, "--samples-per-shard", str(a.samples_per_shard)], a.cache
            ),
            "shard": _stage(["shard", "--data", data, "--resize", str(a.resize)], a.cache),
            "stats": _stage(["stats", "--data", data], a.cache),
        }
        r["index"]["bytes_per_image"] = _bytes(os.path.join(data, "index", "*.parquet")) / images
        r["shard"]["bytes_per_image"] = (
            _bytes(os.path.join(data, "shards", "*.json")) + _bytes(os.path.join(data, "shards", "*", "*.idx.json"))
        ) / images
        r["images"] = images
        results[k] = r
        for stage in STAGES:
            done = r[stage]
            n = counts["train"] if stage == "stats" else images  # stats reads the train shards only
            print(
                f"  {k}N ({images:,} images) {stage}: {done['wall']:.1f} s wall, {done['summary']['seconds']:.1f} s "
                f"stage, driver {done['peak_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
            done["n"] = n
    for stage in STAGES:
        base = results[1][stage]["summary"]["seconds"] / results[1][stage]["n"]
        for k in SCALES:
            d = results[k][stage]
            per = d["summary"]["seconds"] / d["n"]
            rows.append(
                {
                    "stage": stage,
                    "scale": f"{k}N",
                    "images": d["n"],
                    "wall s": d["wall"],
                    "stage s": d["summary"]["seconds"],
                    "us/image": per * 1e6,
                    "vs N": per / base,
                    "driver MB": d["peak_mb"],
                    "B/img": d.get("bytes_per_image"),
                }
            )
    growth = {
        stage: (results[4][stage]["peak_mb"] - results[1][stage]["peak_mb"])
        * 2**20
        / (results[4][stage]["n"] - results[1][stage]["n"])
        for stage in STAGES
    }
    worst = {
        stage: max(results[k][stage]["summary"]["seconds"] / results[k][stage]["n"] for k in SCALES)
        / (results[1][stage]["summary"]["seconds"] / results[1][stage]["n"])
        for stage in STAGES
    }

    ep = _epoch_plan(IMAGENET_TRAIN, 1024, 64, 8, 64 * 128)
    print(
        f"\nepoch plan at ImageNet's size ({IMAGENET_TRAIN:,} samples, {ep['shards']} shards, 64 ranks x 8 loader "
        f"workers, global batch {64 * 128}): plan {ep['plan_s']:.2f} s, one worker's stream "
        f"{ep['one_worker_s']:.3f} s, all 512 streams {ep['all_workers_s']:.2f} s; peak {ep['peak_mb']:.0f} MB "
        f"(of which imports {ep['imports_mb']:.0f} MB)"
    )
    print(
        "driver memory growth from N to 4N, bytes per added image: "
        + ", ".join(f"{s} {g:,.0f}" for s, g in growth.items())
    )
    print("largest time per image against N's: " + ", ".join(f"{s} {w:.2f}x" for s, w in worst.items()))
    return common.report(
        "scale",
        f"preprocessing at N, 2N, 4N images of ImageNet's shape (1,000 classes, {a.size} sources, "
        f"{a.resize} px shards of {a.samples_per_shard}); each stage a fresh process; stats reads the train split",
        rows,
        ["stage", "scale", "images", "wall s", "stage s", "us/image", "vs N", "driver MB", "B/img"],
        {
            "n": a.n,
            "results": {f"{k}N": v for k, v in results.items()},
            "memory_growth_bytes_per_image": growth,
            "time_per_image_worst_vs_n": worst,
            "epoch_plan": ep,
            "seconds": time.monotonic() - t_start,
            "command": "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
    )


if __name__ == "__main__":
    main()
