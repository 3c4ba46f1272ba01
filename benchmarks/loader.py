"""Loader: augmented training batches per second, as the training loop receives them.

    python -m benchmarks.loader [--take 2560] [--batch 128] [--workers 2] [--repeats 3]

Contenders, interleaved, same images, same loader worker count, same batch, same augmentation
(the paper's: random 224x224 patch of the 256x256 image, random mirror, PCA lighting, then
normalisation), each batch ending as a normalised float32 N x 3 x 224 x 224 tensor:

  pipelines    pipelines.data.train_loader over the shard stage's 256x256 shards, following
               the epoch plan (runs of samples read through each shard's sample index,
               decode_jpeg, uint8 crop/flip in the workers; lighting + normalisation batched in
               the training process, where the project runs them)
  pipelines-s3 the same, with the shards in a local S3 server (SeaweedFS on loopback, started
               by the benchmark): every run of samples is one ranged GET (--no-s3 skips it)
  torchvision  torchvision.datasets.ImageFolder + DataLoader over the original JPEGs with
               Resize(256), CenterCrop(256), RandomCrop(224), RandomHorizontalFlip, ToTensor,
               PCA lighting, Normalize: torchvision's reference-script style

Each repeat builds a fresh loader and takes the same number of batches. The rate is timed from
the first batch on (an epoch is thousands of batches); the first batch's latency, a fresh
loader's start-up, is reported apart, and so is the rate with it. Per core = images/s divided
by the machine's cores, which both contenders use fully.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common
from .common import STATS
from .shard import _dataset, _env

def _shards(data: str, cache: str) -> list[tuple[str, int]]:
    import json

    manifest = os.path.join(data, "shards", "train.json")
    m = json.load(open(manifest)) if os.path.exists(manifest) else {}
    if not m.get("complete") or any("index" not in s for s in m["shards"]):  # (a rerun adds indexes)
        subprocess.run([sys.executable, "-m", "pipelines", "shard", "--data", data, "--split", "train"],
                       check=True, env=_env(cache), stdout=subprocess.DEVNULL)
    m = json.load(open(manifest))
    return [(os.path.join(data, "shards", "train", s["name"]), s["samples"]) for s in m["shards"]]


def pipelines_batches(shards, batch: int, workers: int, steps: int, crop: int):
    import model
    from pipelines import data, plan

    tf = model.TrainTransform.from_stats(STATS, crop=crop)
    epochs = itertools.count(1)

    def run():
        seg = plan.epoch_plan([n for _, n in shards], seed=0, epoch=next(epochs), batch_size=batch, world=1,
                              loader_workers=workers)
        if seg.steps < steps:
            raise SystemExit(f"--take {steps * batch} is more than one epoch of {seg.steps * batch}: lower it")
        loader = data.train_loader(shards, tf, segment=seg, rank=0)
        x_float = None
        for x, _, _ in _timed(itertools.islice(loader, steps)):
            x_float = tf.photometric(x, out=x_float)  # as train_loop does on a CPU
    return run


def in_s3(shards, tmp: str):
    """The shards and their sample indexes uploaded to a SeaweedFS started on loopback; returns
    (s3 shards, the server). The AWS_* settings go into this process's environment, which
    the loader workers inherit."""
    from pipelines import storage, tarindex
    from tests.services import BUCKET, SeaweedFS

    server = SeaweedFS(Path(tmp))
    server.start()
    os.environ.update(server.env)
    out = []
    for url, n in shards:
        for local in (url, tarindex.index_url(url)):
            storage.write_bytes(f"s3://{BUCKET}/loader/{os.path.basename(local)}", Path(local).read_bytes())
        out.append((f"s3://{BUCKET}/loader/{os.path.basename(url)}", n))
    return out, server


def torchvision_batches(folder: str, batch: int, workers: int, steps: int, crop: int):
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from model.transforms import Lighting

    tf = T.Compose([T.Resize(256), T.CenterCrop(256), T.RandomCrop(crop), T.RandomHorizontalFlip(),
                    T.ToTensor(), Lighting(STATS["eigval"], STATS["eigvec"], 0.1),
                    T.Normalize(STATS["mean"], STATS["std"])])
    ds = ImageFolder(folder, transform=tf)

    def run():
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                             drop_last=True)
        for x, y in _timed(itertools.islice(loader, steps)):
            pass
    return run


class _Clock:
    """Images, and seconds to the first batch and after it, of the last _timed() loop."""
    images, first, rest = 0, 0.0, 0.0


def _timed(batches):
    t0 = time.perf_counter()
    _Clock.images = 0
    for i, batch in enumerate(batches):
        if i == 0:
            t1 = time.perf_counter()
            _Clock.first = t1 - t0
        else:
            _Clock.images += len(batch[0])
        yield batch
    _Clock.rest = time.perf_counter() - t1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000, help="size of the source set (shared with benchmarks.shard)")
    ap.add_argument("--samples-per-shard", type=int, default=250)
    ap.add_argument("--take", type=int, default=2560, help="images per repeat")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="loader worker processes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(common.OUT, "cache"))
    ap.add_argument("--no-s3", dest="s3", action="store_false", help="skip the row that reads from S3")
    a = ap.parse_args(argv)

    src, data, _ = _dataset(a.images, 10, a.samples_per_shard, a.cache)
    shards = _shards(data, a.cache)
    steps = a.take // a.batch
    contenders = {"pipelines": pipelines_batches(shards, a.batch, a.workers, steps, a.crop),
                  "torchvision": torchvision_batches(os.path.join(src, "train"), a.batch, a.workers, steps, a.crop)}
    server = None
    if a.s3:
        s3_shards, server = in_s3(shards, tempfile.mkdtemp(prefix="bench-s3-"))
        contenders["pipelines-s3"] = pipelines_batches(s3_shards, a.batch, a.workers, steps, a.crop)
    try:
        return _measure(a, contenders, steps, argv)
    finally:
        if server is not None:
            server.stop()


def _measure(a, contenders, steps, argv) -> dict:
    steady, first, overall = {k: [] for k in contenders}, {k: [] for k in contenders}, {k: [] for k in contenders}
    for r in range(a.repeats):
        for name, run in contenders.items():
            run()
            steady[name].append(_Clock.images / _Clock.rest)
            first[name].append(_Clock.first)
            overall[name].append((_Clock.images + a.batch) / (_Clock.first + _Clock.rest))
            print(f"  repeat {r + 1}/{a.repeats} {name}: {steady[name][-1]:,.0f} images/s after a first batch "
                  f"in {first[name][-1]:.2f} s", file=sys.stderr, flush=True)
    cores = os.cpu_count()
    med = {k: common.median(v) for k, v in steady.items()}
    rows = [{"contender": k, "images/s": v, "batches/s": v / a.batch, "batches/s/core": v / a.batch / cores,
             "first batch s": common.median(first[k]), "with first batch": common.median(overall[k]),
             "pipelines x": med["pipelines"] / v} for k, v in med.items()]
    return common.report(
        "loader", f"loader: {steps} batches of {a.batch} at {a.crop} px, {a.workers} loader workers on {cores} "
        f"cores, median of {a.repeats}; rates after the first batch (its latency, a fresh loader's start, "
        "apart)", rows,
        ["contender", "images/s", "batches/s", "batches/s/core", "first batch s", "with first batch", "pipelines x"],
        {"steady": steady, "first_batch_seconds": first, "overall": overall,
         "ratios": {"vs_torchvision": med["pipelines"] / med["torchvision"],
                    "vs_torchvision_with_first_batch":
                        common.median(overall["pipelines"]) / common.median(overall["torchvision"]),
                    **({"s3_vs_torchvision": med["pipelines-s3"] / med["torchvision"],
                        "s3_vs_local": med["pipelines-s3"] / med["pipelines"]} if "pipelines-s3" in med else {})},
         "command": "python -m benchmarks.loader " + " ".join(argv or sys.argv[1:])})


if __name__ == "__main__":
    main()
