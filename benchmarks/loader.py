"""Loader: augmented training batches per second, as the training loop receives them.

    python -m benchmarks.loader [--take 2560] [--batch 128] [--workers 2] [--repeats 3]

Contenders, interleaved, same images, same loader worker count, same batch, same augmentation
(the paper's: random 224x224 patch of the 256x256 image, random mirror, PCA lighting, then
normalisation), each batch ending as a normalised float32 N x 3 x 224 x 224 tensor:

  pipelines    pipelines.data.train_loader over the shard stage's 256x256 shards, following
               the epoch plan (runs of samples read through each shard's sample index,
               decode_jpeg, uint8 crop/flip in the workers; lighting + normalisation batched in
               the training process, where the project runs them, on one thread as each
               contender's transforms run on one thread in its workers)
  pipelines-s3 the same, with the shards in a local S3 server (SeaweedFS on loopback, started
               by the benchmark): every run of samples is one ranged GET (--no-s3 skips it)
  webdataset   the same shard files read as a webdataset user would, as its docs show:
               wds.WebDataset(shards, shardshuffle=...).shuffle(1000).decode("torchrgb")
               .to_tuple("jpg", "cls").map_tuple(transform).repeat() and a torch DataLoader
               with batch_size (webdataset gives each worker whole shards); transform =
               RandomCrop(224), RandomHorizontalFlip, PCA lighting, Normalize: the torchvision
               row's transform after its resize ("torchrgb" is PIL decode + ToTensor's float
               conversion), all in the workers. The peer over the same 256 px files, the row
               the offline resize does not flatter
  torchvision  torchvision.datasets.ImageFolder + DataLoader over the original JPEGs with
               Resize(256), CenterCrop(256), RandomCrop(224), RandomHorizontalFlip, ToTensor,
               PCA lighting, Normalize: torchvision's reference-script style
  floor        no loader: the same 256 px JPEG bytes, read from the shards into memory first,
               decoded in a tight loop in this process on one thread (torch.set_num_threads(1)),
               no augmentation; libjpeg-turbo through torchvision.io.decode_jpeg and through
               PIL (Image.open().convert("RGB"), np.asarray) are both timed each repeat and the
               faster by its median is the floor (the title names it). A loader can beat it
               per core only by decoding less

Each repeat builds a fresh loader and takes the same number of batches. The rate is timed from
the first batch on (an epoch is thousands of batches); the first batch's latency, a fresh
loader's start-up, is reported apart, and so is the rate with it. Per core = images/s divided
by the cores the contender uses: the machine's cores for the loaders, which use them fully,
one for the floor. "pipelines x" is pipelines' images/s per core over the row's.
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
        subprocess.run(
            [sys.executable, "-m", "pipelines", "shard", "--data", data, "--split", "train"],
            check=True,
            env=_env(cache),
            stdout=subprocess.DEVNULL,
        )
    m = json.load(open(manifest))
    return [(os.path.join(data, "shards", "train", s["name"]), s["samples"]) for s in m["shards"]]


def pipelines_batches(shards, batch: int, workers: int, steps: int, crop: int):
    import torch

    import model
    from pipelines import data, plan

    tf = model.TrainTransform.from_stats(STATS, crop=crop)
    epochs = itertools.count(1)

    def run():
        # The photometric step on one thread, as every contender's transforms run on one thread in
        # its workers: with more, its OpenMP threads spin for the cores the loader workers use.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _epoch()
        finally:
            torch.set_num_threads(threads)

    def _epoch():
        seg = plan.epoch_plan(
            [n for _, n in shards], seed=0, epoch=next(epochs), batch_size=batch, world=1, loader_workers=workers
        )
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


def _augment(crop: int):
    """The paper's augmentation of a 256 px image as torchvision transforms, split where the
    image becomes a float tensor: (geometric, photometric) lists."""
    import torchvision.transforms as T

    from model.transforms import Lighting

    return (
        [T.RandomCrop(crop), T.RandomHorizontalFlip()],
        [Lighting(STATS["eigval"], STATS["eigvec"], 0.1), T.Normalize(STATS["mean"], STATS["std"])],
    )


def torchvision_batches(folder: str, batch: int, workers: int, steps: int, crop: int):
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    geometric, photometric = _augment(crop)
    tf = T.Compose([T.Resize(256), T.CenterCrop(256), *geometric, T.ToTensor(), *photometric])
    ds = ImageFolder(folder, transform=tf)

    def run():
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
        for _batch in _timed(itertools.islice(loader, steps)):
            pass

    return run


def webdataset_dataset(urls: list[str], crop: int):
    """webdataset's documented pipeline over the shard files, yielding (float 3 x crop x crop, label).

    .repeat(): every worker keeps yielding full batches whatever the shard count (an epoch is
    thousands of batches). webdataset hands each DataLoader worker whole shards, so a worker
    beyond the shard count has none (empty_check=False lets it stop instead of failing)."""
    import torchvision.transforms as T
    import webdataset as wds

    geometric, photometric = _augment(crop)
    tf = T.Compose([*geometric, *photometric])  # "torchrgb" already gives float 3 x H x W in 0..1
    return (
        wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
        .shuffle(1000)
        .decode("torchrgb")
        .to_tuple("jpg", "cls")
        .map_tuple(tf, None)
        .repeat()
    )


def webdataset_batches(urls: list[str], batch: int, workers: int, steps: int, crop: int):
    import torch

    ds = webdataset_dataset(urls, crop)

    def run():
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
        for _batch in _timed(itertools.islice(loader, steps)):
            pass

    return run


def shard_jpegs(urls: list[str]) -> list[bytes]:
    """Every .jpg member of the shard tars, in memory."""
    import tarfile

    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.isfile() and m.name.endswith(".jpg")]
    return out


def floor_decodes(jpgs: list[bytes], n: int):
    """``n`` decodes (cycling through ``jpgs``) on one thread with each decoder, no augmentation;
    _Clock gets the faster decoder's, _Floor both rates."""
    import io

    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpgs]  # bytes -> tensor outside the loop
    decoders = {
        "torchvision.io.decode_jpeg": lambda i: decode_jpeg(tensors[i % len(tensors)], mode=ImageReadMode.RGB),
        "PIL": lambda i: np.asarray(Image.open(io.BytesIO(jpgs[i % len(jpgs)])).convert("RGB")),
    }

    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name, decode in decoders.items():
                decode(0)  # warm: the library loaded, the first image's buffers allocated
                t0 = time.perf_counter()
                for i in range(n):
                    decode(i)
                _Floor.rates.setdefault(name, []).append(n / (time.perf_counter() - t0))
        finally:
            torch.set_num_threads(threads)
        best = max(decoders, key=lambda k: _Floor.rates[k][-1])  # this repeat's; the report picks by median
        _Clock.images, _Clock.first, _Clock.rest = n, None, n / _Floor.rates[best][-1]

    return run


class _Floor:
    """Images/s of each floor decoder, one per repeat."""

    rates: dict[str, list[float]] = {}


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
    contenders = {
        "pipelines": pipelines_batches(shards, a.batch, a.workers, steps, a.crop),
        "webdataset": webdataset_batches([u for u, _ in shards], a.batch, a.workers, steps, a.crop),
        "torchvision": torchvision_batches(os.path.join(src, "train"), a.batch, a.workers, steps, a.crop),
    }
    server = None
    if a.s3:
        s3_shards, server = in_s3(shards, tempfile.mkdtemp(prefix="bench-s3-"))
        contenders["pipelines-s3"] = pipelines_batches(s3_shards, a.batch, a.workers, steps, a.crop)
    contenders["floor"] = floor_decodes(shard_jpegs([u for u, _ in shards]), steps * a.batch)
    try:
        return _measure(a, contenders, steps, argv)
    finally:
        if server is not None:
            server.stop()


def _measure(a, contenders, steps, argv) -> dict:
    steady, first, overall = {k: [] for k in contenders}, {k: [] for k in contenders}, {k: [] for k in contenders}
    _Floor.rates.clear()
    for r in range(a.repeats):
        for name, run in contenders.items():
            run()
            steady[name].append(_Clock.images / _Clock.rest)
            if _Clock.first is None:  # the floor: no loader, no first batch
                print(
                    f"  repeat {r + 1}/{a.repeats} {name}: {steady[name][-1]:,.0f} images/s on one core "
                    f"({', '.join(f'{k} {v[-1]:,.0f}' for k, v in _Floor.rates.items())})",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            first[name].append(_Clock.first)
            overall[name].append((_Clock.images + a.batch) / (_Clock.first + _Clock.rest))
            print(
                f"  repeat {r + 1}/{a.repeats} {name}: {steady[name][-1]:,.0f} images/s after a first batch "
                f"in {first[name][-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    floor = {}
    if "floor" in contenders:  # one decoder throughout: the faster by its median
        decoders = {k: common.median(v) for k, v in _Floor.rates.items()}
        floor = {"decoder": max(decoders, key=decoders.get), "images_per_s_per_core": dict(_Floor.rates)}
        steady["floor"] = list(_Floor.rates[floor["decoder"]])
    cores = os.cpu_count()
    used = {k: 1 if k == "floor" else cores for k in contenders}
    med = {k: common.median(v) for k, v in steady.items()}
    per_core = {k: v / used[k] for k, v in med.items()}
    loaders = [k for k in contenders if k != "floor"]
    rows = [
        {
            "contender": k,
            "images/s": v,
            "cores": used[k],
            "images/s/core": per_core[k],
            "batches/s": v / a.batch if k in loaders else None,
            "batches/s/core": v / a.batch / cores if k in loaders else None,
            "first batch s": common.median(first[k]) if first[k] else None,
            "with first batch": common.median(overall[k]) if overall[k] else None,
            "pipelines x": per_core["pipelines"] / per_core[k],
        }
        for k, v in med.items()
    ]
    return common.report(
        "loader",
        f"loader: {steps} batches of {a.batch} at {a.crop} px, {a.workers} loader workers on {cores} "
        f"cores, median of {a.repeats}; rates after the first batch (its latency, a fresh loader's start, "
        "apart)" + (f"; floor: {floor['decoder']} on one core, no augmentation" if floor else ""),
        rows,
        [
            "contender",
            "images/s",
            "cores",
            "images/s/core",
            "batches/s",
            "batches/s/core",
            "first batch s",
            "with first batch",
            "pipelines x",
        ],
        {
            "steady": steady,
            "first_batch_seconds": first,
            "overall": overall,
            **({"floor": floor} if floor else {}),
            "ratios": {
                "vs_torchvision": med["pipelines"] / med["torchvision"],
                "vs_torchvision_with_first_batch": common.median(overall["pipelines"])
                / common.median(overall["torchvision"]),
                **({"vs_webdataset": med["pipelines"] / med["webdataset"]} if "webdataset" in med else {}),
                **({"per_core_vs_decode_floor": per_core["pipelines"] / per_core["floor"]} if "floor" in med else {}),
                **(
                    {
                        "s3_vs_torchvision": med["pipelines-s3"] / med["torchvision"],
                        "s3_vs_local": med["pipelines-s3"] / med["pipelines"],
                    }
                    if "pipelines-s3" in med
                    else {}
                ),
            },
            "command": "python -m benchmarks.loader " + " ".join(argv or sys.argv[1:]),
        },
    )


if __name__ == "__main__":
    main()
