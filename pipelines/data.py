"""Shards -> batches for one training worker (no Ray Train here: rank and world size come in).

    loader = train_loader(urls_and_counts, batch_size=64, rank=0, world_size=2, epoch=3, seed=0,
                          transform=TrainTransform.from_stats(stats, crop=224))
    for x_uint8, y in itertools.islice(loader, plan.steps): ...

The shard list is split across ranks, then across a rank's loader workers; each worker streams
its tars through webdataset's tar expander and a shuffle buffer seeded by (seed, epoch, rank,
worker), decodes JPEGs with torchvision.io.decode_jpeg (libjpeg-turbo, no PIL) and does the
uint8 crop/flip. Batches leave as uint8: the float conversion, PCA lighting and normalisation
run batched on the training device (TrainTransform.photometric).

Two decode paths (issue "Performance"), the same batches either way:
  decode="worker"  the loader workers decode on the CPU and crop; uint8 crops cross to the device.
  decode="device"  the workers only read each JPEG's size from its header and draw the crop and
                   flip with the same generator calls; the JPEG bytes cross, and the training
                   process decodes the whole batch in one call on the device (nvjpeg on CUDA)
                   and crops there. CPU decoding costs about a millisecond per image per
                   core, and a GPU trains AlexNet on thousands of images a second: nvjpeg
                   frees those cores (benchmarks/gpu.py measures both).
``on_device(loader, device)`` yields uint8 batches on the device for either path;
``choose_decode`` picks "device" for a CUDA device and "worker" otherwise.

Equal work per rank (no hang at the epoch's end): every rank runs exactly
``steps = (total samples // world_size) // batch_size`` steps per epoch. Shards are dealt to
ranks by a seeded shuffle that balances sample counts; a worker's stream cycles through its
shards, so a rank whose shards hold fewer samples than ``steps * batch_size`` repeats its
first few samples of the epoch, and the samples beyond that count are not seen this epoch
(at most ``world_size * batch_size`` dropped plus the imbalance between ranks). Over epochs
the shuffle moves which samples those are.
"""
from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import storage


DECODES = ("auto", "worker", "device")


def choose_decode(decode: str, device) -> str:
    """"auto" -> "device" on a CUDA device (nvjpeg), "worker" otherwise; others pass through.

    On a CPU device, decoding in the training process would only take the work off the loader
    workers' parallel cores onto one, so "auto" keeps it there."""
    if decode not in DECODES:
        raise ValueError(f"Unknown decode '{decode}'. Expected one of: {', '.join(DECODES)}.")
    if decode != "auto":
        return decode
    return "device" if torch.device(device).type == "cuda" else "worker"


def seed_for(*parts) -> int:
    """A 63-bit seed derived from any parts, e.g. (seed, epoch, rank, worker)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class EpochPlan:
    shards: list[str]       # this rank's shard URLs, in the order they are read
    samples: int            # samples those shards hold
    steps: int              # batches every rank runs this epoch


def plan_epoch(shards: list[tuple[str, int]], *, batch_size: int, rank: int, world_size: int,
               epoch: int, seed: int) -> EpochPlan:
    """Deal (url, samples) shards to ranks: seeded by epoch, balanced by sample count."""
    total = sum(n for _, n in shards)
    steps = (total // world_size) // batch_size
    if steps < 1:
        raise ValueError(f"{total} samples over {world_size} workers cannot fill one batch of "
                         f"{batch_size} per worker: lower --batch-size or --workers.")
    order = list(shards)
    random.Random(seed_for(seed, epoch, "shards")).shuffle(order)
    # Largest first onto the least-loaded rank (greedy), ties broken by the shuffled order.
    order.sort(key=lambda s: -s[1])
    loads = [[0, r, []] for r in range(world_size)]
    for url, n in order:
        least = min(loads, key=lambda x: (x[0], x[1]))
        least[0] += n
        least[2].append(url)
    mine = loads[rank][2]
    random.Random(seed_for(seed, epoch, rank, "order")).shuffle(mine)
    return EpochPlan(shards=mine, samples=loads[rank][0], steps=steps)


def decode_rgb(jpg: bytes) -> torch.Tensor:
    """JPEG bytes -> RGB 3 x H x W uint8 (libjpeg-turbo; CMYK and greyscale become RGB as PIL's convert)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _jpeg_size(jpg: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG header; PIL reads the header only, no pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        w, h = im.size
    return h, w


class EncodedBatch(NamedTuple):
    """A batch for decode="device": every JPEG of the batch in one flat uint8 tensor.

    One tensor rather than a list of them: each tensor a worker sends costs a shared-memory
    handle (a file descriptor), and 256 per batch times the prefetched batches of a dozen
    workers runs into the open-files limit."""
    data: torch.Tensor              # uint8, the JPEGs back to back
    lengths: torch.Tensor           # int64, bytes of each JPEG
    params: list                    # transform.params() of each sample, drawn in the worker
    labels: torch.Tensor            # int64


def _collate_encoded(batch) -> EncodedBatch:
    jpgs, params, labels = zip(*batch)
    return EncodedBatch(torch.frombuffer(bytearray(b"".join(jpgs)), dtype=torch.uint8),
                        torch.tensor([len(j) for j in jpgs]), list(params), torch.tensor(labels))


def decode_batch(batch: EncodedBatch, transform, device) -> torch.Tensor:
    """An EncodedBatch -> uint8 N x 3 x crop x crop on ``device`` (N x 10 x ... for ten-crop):
    one batched decode_jpeg call (nvjpeg on CUDA), then each sample's drawn crop and flip."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpgs = list(batch.data.split(batch.lengths.tolist()))
    imgs = decode_jpeg(jpgs, device=device, mode=ImageReadMode.RGB)
    return torch.stack([transform.apply(img, p) for img, p in zip(imgs, batch.params)])


def on_device(loader: DataLoader, device):
    """(uint8 images, labels) on ``device`` from a train_loader / eval_loader, whichever
    decode path its stream uses: the transfer (decode="worker") or the decode (decode="device")."""
    device = torch.device(device)
    decode, transform = loader.dataset.decode, loader.dataset.transform
    for batch in loader:
        if decode == "worker":
            x, y = batch
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        else:
            yield decode_batch(batch, transform, device), batch.labels.to(device, non_blocking=True)


def synthetic_batches(batch_size: int, crop: int, num_classes: int, steps: int, device):
    """``steps`` times the same random uint8 batch, already on ``device``: the training step
    without the data pipeline, for measuring it (benchmarks/train_step.py)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    for _ in range(steps):
        yield x, y


def _samples(urls: list[str]):
    """(key, jpg bytes, label) from tar shards, read through the storage layer (local or S3)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def streams():
        for url in urls:
            with storage.open_read(url) as f:
                yield {"url": url, "stream": f}

    for s in group_by_keys(tar_file_expander(streams())):
        yield s["__key__"], s["jpg"], int(s["cls"])


class ShardStream(IterableDataset):
    """One rank's samples as (uint8 image, label); ``cycle`` repeats the shards endlessly.

    With decode="device", (JPEG bytes, transform.params(), label) instead: the crop parameters
    come from the same generator calls in the same order, so decode_batch() reproduces the
    worker path's crops exactly."""

    def __init__(self, urls: list[str], transform, *, seed: int = 0, epoch: int = 0, rank: int = 0,
                 shuffle_buffer: int = 0, cycle: bool = False, decode: str = "worker"):
        if decode not in ("worker", "device"):
            raise ValueError(f"ShardStream decode must be 'worker' or 'device', got '{decode}' "
                             "(resolve 'auto' with choose_decode first).")
        self.urls, self.transform = list(urls), transform
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shuffle_buffer, self.cycle, self.decode = shuffle_buffer, cycle, decode

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        urls = self.urls[wid::nw]
        if not urls:
            return
        rng = random.Random(seed_for(self.seed, self.epoch, self.rank, wid, "buffer"))
        gen = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, self.rank, wid, "crop"))
        source = _samples(urls)
        if self.cycle:
            source = _forever(lambda: _samples(urls))
        if self.shuffle_buffer > 1:
            source = _shuffle(source, self.shuffle_buffer, rng)
        for _key, jpg, label in source:
            if self.decode == "worker":
                yield self.transform.geometric(decode_rgb(jpg), gen), label
            else:
                h, w = _jpeg_size(jpg)
                yield jpg, self.transform.params(h, w, gen), label


def _forever(make):
    while True:
        yield from make()


def _shuffle(source, size: int, rng: random.Random):
    """A reservoir-style shuffle buffer: emit a random element once the buffer is full."""
    buf = []
    for item in source:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def loader(dataset: ShardStream, batch_size: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    device = dataset.decode == "device"
    # Pinning helps only the host-to-device copy of decoded crops; JPEG bytes stay on the host
    # (nvjpeg reads them there), so pinning them would be a wasted copy.
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_memory and not device, collate_fn=_collate_encoded if device else None,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      drop_last=False)


def train_loader(shards: list[tuple[str, int]], transform, *, batch_size: int, rank: int, world_size: int,
                 epoch: int, seed: int, num_workers: int = 2, shuffle_buffer: int = 2000,
                 pin_memory: bool = False, decode: str = "worker") -> tuple[DataLoader, EpochPlan]:
    """The training batches of one rank for one epoch; take exactly ``plan.steps`` of them
    (through on_device() when decode="device")."""
    plan = plan_epoch(shards, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch, seed=seed)
    workers = min(num_workers, len(plan.shards))
    ds = ShardStream(plan.shards, transform, seed=seed, epoch=epoch, rank=rank,
                     shuffle_buffer=shuffle_buffer, cycle=True, decode=decode)
    return loader(ds, batch_size, workers, pin_memory), plan


def eval_loader(urls: list[str], transform, *, batch_size: int, num_workers: int = 2,
                pin_memory: bool = False, decode: str = "worker") -> DataLoader:
    """Every sample of ``urls`` once, in shard order (no shuffle, no cycle)."""
    ds = ShardStream(urls, transform, decode=decode)
    return loader(ds, batch_size, min(num_workers, len(urls)), pin_memory)
