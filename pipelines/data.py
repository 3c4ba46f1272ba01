"""Shards -> batches for one training worker (no Ray Train here: rank and world size come in).

    loader = train_loader(urls_and_counts, batch_size=64, rank=0, world_size=2, epoch=3, seed=0,
                          transform=TrainTransform.from_stats(stats, crop=224))
    for x_uint8, y in itertools.islice(loader, plan.steps): ...

The shard list is split across ranks, then across a rank's loader workers; each worker streams
its tars through webdataset's tar expander and a shuffle buffer seeded by (seed, epoch, rank,
worker), decodes JPEGs with torchvision.io.decode_jpeg (libjpeg-turbo, no PIL) and does the
uint8 crop/flip. Batches leave as uint8: the float conversion, PCA lighting and normalisation
run batched on the training device (TrainTransform.photometric).

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
import random
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import storage


# torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; decode_jpeg is
# still the fastest JPEG path here (libjpeg-turbo, and nvjpeg on a GPU), so keep it quiet.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


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


def _decode(jpg: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)


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
    """One rank's samples as (uint8 image, label); ``cycle`` repeats the shards endlessly."""

    def __init__(self, urls: list[str], transform, *, seed: int = 0, epoch: int = 0, rank: int = 0,
                 shuffle_buffer: int = 0, cycle: bool = False):
        self.urls, self.transform = list(urls), transform
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.shuffle_buffer, self.cycle = shuffle_buffer, cycle

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
            img = _decode(jpg)
            yield self.transform.geometric(img, gen), label


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
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      drop_last=False)


def train_loader(shards: list[tuple[str, int]], transform, *, batch_size: int, rank: int, world_size: int,
                 epoch: int, seed: int, num_workers: int = 2, shuffle_buffer: int = 2000,
                 pin_memory: bool = False) -> tuple[DataLoader, EpochPlan]:
    """The training batches of one rank for one epoch; take exactly ``plan.steps`` of them."""
    plan = plan_epoch(shards, batch_size=batch_size, rank=rank, world_size=world_size, epoch=epoch, seed=seed)
    workers = min(num_workers, len(plan.shards))
    ds = ShardStream(plan.shards, transform, seed=seed, epoch=epoch, rank=rank,
                     shuffle_buffer=shuffle_buffer, cycle=True)
    return loader(ds, batch_size, workers, pin_memory), plan


def eval_loader(urls: list[str], transform, *, batch_size: int, num_workers: int = 2,
                pin_memory: bool = False) -> DataLoader:
    """Every sample of ``urls`` once, in shard order (no shuffle, no cycle)."""
    ds = ShardStream(urls, transform)
    return loader(ds, batch_size, min(num_workers, len(urls)), pin_memory)
