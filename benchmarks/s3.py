"""Shard stage from S3 against local disk: the same ILSVRC tarballs on the same machine.

    python -m benchmarks.s3 [--images 4096] [--repeats 4]

The source: ``--images`` photo-like 500x375 train JPEGs (~108 KB, ImageNet's average file) in
the original tarball layout (a train tar of per-class tars, the val tar, the devkit), 8
classes, indexed into shards of 1,024 (runs of 64 neighbouring images, as at ImageNet's
4,096). The same files sit on local disk and in a local S3 server (SeaweedFS on loopback,
started here). Each repeat runs the shard stage twice, interleaved, against one Ray started
here (as on a cluster, Ray's start-up is paid once, not per stage), after one untimed warm-up
run of each:

  local   source and ROOT on local disk
  s3      source and ROOT in S3: tar members read by merged ranged GETs, shards uploaded

Reported: each one's images/s over the stage's own time (its summary's ``seconds``) and from
process start, the ratio s3 / local, and the S3 GET requests per image the shard tasks sent
(the stage's own count, from boto3's event hooks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common

CLASSES, PER_SHARD, RESIZE = 8, 1024, 256


def _stage(args: list[str], env: dict) -> tuple[float, dict]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pipelines", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"pipelines {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summary = next(json.loads(line) for line in reversed(p.stdout.strip().splitlines()) if line.startswith("{"))
    return time.perf_counter() - t, summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096, help="train images (8 classes)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (0: none, a smoke test)")
    ap.add_argument("--cache", default=os.path.join(common.OUT, "cache"))
    a = ap.parse_args(argv)

    import ray

    from pipelines import storage
    from pipelines.config import SampleConfig
    from pipelines.sample import write_tarballs
    from tests.services import BUCKET, SeaweedFS

    per_class = -(-a.images // CLASSES)
    src = os.path.join(a.cache, f"s3-tarballs-{per_class * CLASSES}x500x375")
    cfg = SampleConfig(out=src, classes=CLASSES, train_per_class=per_class, val_per_class=2)
    if not os.path.exists(os.path.join(src, "ready")):
        shutil.rmtree(src, ignore_errors=True)
        print(f"making {per_class * CLASSES} photo-like 500x375 JPEGs in the tarball layout ...", file=sys.stderr)
        jpgs = common.photo_jpegs(per_class * CLASSES + 2 * CLASSES, size=(500, 375), vary=0.2, seed=2)
        write_tarballs(src, cfg, jpgs)
        Path(src, "ready").touch()
    images = per_class * CLASSES

    tmp = tempfile.mkdtemp(prefix="bench-s3-")
    server = SeaweedFS(Path(tmp) / "s3")
    server.start()
    try:
        # This process's S3 settings are the Ray node's own (as an instance profile gives a
        # cloud node): its workers inherit them.
        os.environ.update(server.env)
        for name in os.listdir(src):
            if name != "ready":
                storage.write_bytes(f"s3://{BUCKET}/src/{name}", Path(src, name).read_bytes())
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        env = {
            **os.environ,
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "PYTHONPATH": os.getcwd(),
        }
        roots = {"local": (src, os.path.join(tmp, "root")), "s3": (f"s3://{BUCKET}/src", f"s3://{BUCKET}/root")}
        for source, root in roots.values():
            _stage(["index", "--source", source, "--data", root, "--samples-per-shard", str(PER_SHARD)], env)
        wall = {k: [] for k in roots}
        own = {k: [] for k in roots}
        gets = []
        for r in range(-a.warmup, a.repeats):  # r < 0: warm-ups (SeaweedFS grows its volumes on the
            for name, (_, root) in roots.items():  # first writes, Ray starts workers): not timed
                for f in storage.list_dir(storage.join(root, "shards")):  # a fresh run: nothing to skip
                    url = storage.join(root, "shards", f)
                    if storage.is_dir(url):
                        for g in storage.list_dir(url):
                            storage.remove(storage.join(url, g))
                    else:
                        storage.remove(url)
                seconds, summary = _stage(["shard", "--split", "train", "--data", root, "--resize", str(RESIZE)], env)
                if summary["samples"] != images or summary["written"] != images // PER_SHARD + bool(images % PER_SHARD):
                    raise RuntimeError(f"{name}: unexpected summary {summary}")
                if r < 0:
                    print(
                        f"  warm-up {name}: {summary['images_per_second']:,.0f} images/s", file=sys.stderr, flush=True
                    )
                    continue
                wall[name].append(images / seconds)
                own[name].append(summary["images_per_second"])
                if name == "s3":
                    gets.append(summary["source_gets"])
                print(
                    f"  repeat {r + 1}/{a.repeats} {name}: {own[name][-1]:,.0f} images/s (stage), "
                    f"{wall[name][-1]:,.0f} from process start",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: common.median(v) for k, v in own.items()}
    med_wall = {k: common.median(v) for k, v in wall.items()}
    rows = [
        {
            "contender": k,
            "images/s": med[k],
            "images/s from start": med_wall[k],
            "source GETs": common.median(gets) if k == "s3" else 0,
            "images per GET": images / common.median(gets) if k == "s3" else None,
        }
        for k in roots
    ]
    ratios = {"s3_vs_local": med["s3"] / med["local"], "s3_vs_local_from_start": med_wall["s3"] / med_wall["local"]}
    return common.report(
        "s3",
        f"shard stage, {images} photo-like JPEGs in the ILSVRC tarball layout -> 256x256 q90 shards of "
        f"{PER_SHARD}, from S3 (SeaweedFS on loopback) against local disk; median of {a.repeats}",
        rows,
        ["contender", "images/s", "images/s from start", "source GETs", "images per GET"],
        {
            "images": images,
            "stage_rates": own,
            "wall_rates": wall,
            "source_gets": gets,
            "gets_per_image": common.median(gets) / images,
            "ratios": ratios,
            "command": "python -m benchmarks.s3 " + " ".join(argv or sys.argv[1:]),
        },
    )


if __name__ == "__main__":
    main()
