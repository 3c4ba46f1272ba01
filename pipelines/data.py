"""Shards -> batches for one training worker, following the epoch plan (no Ray Train here).

    seg = plan.epoch_plan(counts, seed=0, epoch=3, batch_size=128, world=2, loader_workers=4)
    loader = train_loader(shards, TrainTransform.from_stats(stats, crop=224), segment=seg, rank=0)
    for x_uint8, y, keys in on_device(loader, "cuda"): ...   # exactly the segment's remaining steps

``shards`` is [(tar url, samples)]; each tar has its sample index beside it (pipelines/tarindex.py),
so a loader worker reads the runs of consecutive samples the plan gives it with one seek or one
ranged GET each, never a whole shard it does not need. pipelines/plan.py decides which samples
each rank and loader worker reads at each step; this module only reads, decodes and batches them.
Loader workers decode JPEGs with torchvision's decode_jpeg (libjpeg-turbo, no PIL) and do the
uint8 crop/flip; each sample's crop and flip come from a generator seeded by (seed, epoch,
sample), so they do not depend on which rank or worker reads it (a resume or a new world size
crops the same sample the same way). Batches leave as uint8: the float conversion, PCA
lighting and normalisation run batched on the training device (TrainTransform.photometric).

Two decode paths, the same batches either way:
  decode="worker"  the loader workers decode on the CPU and crop; uint8 crops cross to the device.
  decode="device"  the workers only read each JPEG's size from its header and draw the crop and
                   flip with the same generator calls; the JPEG bytes cross, and the training
                   process decodes the whole batch in one call on the device (nvjpeg on CUDA)
                   and crops there. CPU decoding costs about a millisecond per image per
                   core, and a GPU trains AlexNet on thousands of images a second: nvjpeg
                   frees those cores (benchmarks/gpu.py measures both).
``on_device(loader, device)`` yields (uint8 images, labels, keys) on the device for either path;
``choose_decode`` picks "device" for a CUDA device and "worker" otherwise.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import plan, storage, tarindex
from .errors import StageError
from .plan import seed_for

DECODES = ("auto", "worker", "device")


def choose_decode(decode: str, device) -> str:
    """ "auto" -> "device" on a CUDA device (nvjpeg), "worker" otherwise; others pass through.

    On a CPU device, decoding in the training process would only take the work off the loader
    workers' parallel cores onto one, so "auto" keeps it there."""
    if decode not in DECODES:
        raise ValueError(f"Unknown decode '{decode}'. Expected one of: {', '.join(DECODES)}.")
    if decode != "auto":
        return decode
    return "device" if torch.device(device).type == "cuda" else "worker"


def decode_rgb(jpg: bytes) -> torch.Tensor:
    """JPEG bytes -> RGB 3 x H x W uint8 (libjpeg-turbo; CMYK and greyscale become RGB as PIL's convert)."""
    return jpeg_codec()[0](torch.frombuffer(bytearray(jpg), dtype=torch.uint8))


def encode_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """RGB 3 x H x W uint8 -> baseline JPEG bytes as a uint8 tensor (libjpeg-turbo)."""
    return jpeg_codec()[1](x, quality)


_codec: tuple | None = None


def jpeg_codec() -> tuple:
    """(decode(uint8 bytes) -> RGB tensor, encode(tensor, quality) -> uint8 bytes): torchvision's
    libjpeg-turbo ops, loaded without importing the torchvision package where that works.

    ``import torchvision`` also imports its models and ops, and through them torch._dynamo and
    triton: ~1.1 s of CPU (2 s from a cold disk) in every shard worker, on a stage whose start-up
    is what users wait for. Loading the image extension alone takes milliseconds. The ops are
    torchvision's own, so the pixels are the same; a round trip checks that this torchvision's
    ops take these arguments, and anything unexpected falls back to the public torchvision.io."""
    global _codec
    if _codec is None:
        _codec = _load_image_ops() or _public_codec()
    return _codec


def _public_codec() -> tuple:
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    return (lambda data: decode_jpeg(data, mode=ImageReadMode.RGB), lambda x, quality: encode_jpeg(x, quality=quality))


def _load_image_ops() -> tuple | None:
    import importlib.machinery
    import importlib.util

    try:
        spec = importlib.util.find_spec("torchvision")
        folder = list(spec.submodule_search_locations)[0]
        finder = importlib.machinery.FileFinder(
            folder, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
        )
        lib = finder.find_spec("image_stable") or finder.find_spec("image")  # (the name since 0.25, before)
        torch.ops.load_library(lib.origin)
        ops = torch.ops.image
        rgb = 3  # torchvision.io.ImageReadMode.RGB
        codec = (
            lambda data: ops.decode_jpeg(data, rgb, False),  # False: no EXIF rotation, as the public call
            lambda x, quality: ops.encode_jpeg(x, quality),
        )
        x = torch.tensor([200, 100, 50], dtype=torch.uint8)[:, None, None].expand(3, 16, 24).contiguous()
        y = codec[0](codec[1](x, 95))  # a flat colour survives JPEG within a level or two, in RGB order
        if y.shape != x.shape or y.dtype != torch.uint8 or (y.int() - x.int()).abs().max() > 4:
            return None
        return codec
    except Exception:  # any other layout or signature: the public API
        return None


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

    data: torch.Tensor  # uint8, the JPEGs back to back
    lengths: torch.Tensor  # int64, bytes of each JPEG
    params: list  # transform.params() of each sample, drawn in the worker
    labels: torch.Tensor  # int64
    keys: list  # each sample's __key__ (for the sample ledger)


def decode_batch(batch: EncodedBatch, transform, device) -> torch.Tensor:
    """An EncodedBatch -> uint8 N x 3 x crop x crop on ``device`` (N x 10 x ... for ten-crop):
    one batched decode_jpeg call (nvjpeg on CUDA), then each sample's drawn crop and flip."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpgs = list(batch.data.split(batch.lengths.tolist()))
    imgs = decode_jpeg(jpgs, device=device, mode=ImageReadMode.RGB)
    return torch.stack([transform.apply(img, p) for img, p in zip(imgs, batch.params)])


def on_device(loader: DataLoader, device, started=None):
    """(uint8 images, labels, keys) on ``device`` from a train_loader / eval_loader, whichever
    decode path its stream uses: the transfer (decode="worker") or the decode (decode="device").
    ``started``: the loader's iterator, when it was started ahead (its workers already reading)."""
    device = torch.device(device)
    decode, transform = loader.dataset.decode, loader.dataset.transform
    for batch in started if started is not None else loader:
        if decode == "worker":
            x, y, keys = batch
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), keys
        else:
            yield (decode_batch(batch, transform, device), batch.labels.to(device, non_blocking=True), batch.keys)


def synthetic_batches(batch_size: int, crop: int, num_classes: int, steps: int, device):
    """``steps`` times the same random uint8 batch, already on ``device``: the training step
    without the data pipeline, for measuring it (benchmarks/train_step.py)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    for _ in range(steps):
        yield x, y


# --- reading the plan's samples -----------------------------------------------------------------
class _Reader:
    """Sample ids -> (key, jpg, label), reading runs of consecutive samples through the shards'
    sample indexes (loaded once per shard, as numpy arrays: 16 bytes a sample)."""

    def __init__(self, shards: list[tuple[str, int]]):
        self.urls = [u for u, _ in shards]
        self.counts = np.asarray([n for _, n in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _offsets(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._index:
            doc = tarindex.read(self.urls[shard])
            if doc is None or doc["samples"] != self.counts[shard]:
                found = "none" if doc is None else f"one of {doc['samples']} samples"
                raise StageError(
                    f"{self.urls[shard]}: its sample index ({tarindex.index_url(self.urls[shard])}) "
                    f"should list {self.counts[shard]} samples, found {found}: rerun the shard "
                    "stage, which adds missing indexes without re-encoding any image."
                )
            self._index[shard] = (np.asarray(doc["offsets"], np.int64), np.asarray(doc["sizes"], np.int64))
        return self._index[shard]

    def read(self, ids) -> dict[int, tuple[str, bytes, int]]:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        pos = ids - self.starts[shard]
        # a new run wherever the shard changes or the position is not the previous one + 1
        breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(pos) != 1)) + 1
        out = {}
        for run in np.split(np.arange(len(ids)), breaks):
            if not len(run):
                continue
            s, p0, p1 = int(shard[run[0]]), int(pos[run[0]]), int(pos[run[-1]])
            offsets, sizes = self._offsets(s)
            start = int(offsets[p0])
            buf = storage.read_range(self.urls[s], start, int(offsets[p1] + sizes[p1]) - start)
            samples = tarindex.parse_run(buf, self.urls[s])
            if len(samples) != len(run):
                raise StageError(
                    f"{self.urls[s]}: samples {p0}..{p1} hold {len(samples)} samples, not "
                    f"{len(run)}: the shard and its sample index disagree; rerun the shard stage."
                )
            out.update(zip(ids[run].tolist(), samples))
        return out


class PlanStream(IterableDataset):
    """Batches of the samples a plan gives each loader worker: ``windows[w]`` is worker w's list of
    windows, each a list of (step, sample ids); a window is read at once, then batched.

    Yields (uint8 images, labels, keys), or with decode="device" an EncodedBatch whose crop
    parameters come from the same generator calls, so decode_batch() gives the same crops.
    Without DataLoader workers (num_workers=0) it yields every worker's batches in step order,
    as a DataLoader with workers would."""

    def __init__(
        self,
        shards: list[tuple[str, int]],
        windows: list[list],
        transform,
        *,
        seed: int = 0,
        epoch: int = 0,
        decode: str = "worker",
        random_crops: bool = True,
    ):
        if decode not in ("worker", "device"):
            raise ValueError(
                f"PlanStream decode must be 'worker' or 'device', got '{decode}' "
                "(resolve 'auto' with choose_decode first)."
            )
        self.shards, self.windows, self.transform = list(shards), windows, transform
        self.seed, self.epoch, self.decode, self.random_crops = seed, epoch, decode, random_crops

    def _batches(self, worker: int):
        reader, gen = _Reader(self.shards), torch.Generator()
        for window in self.windows[worker]:
            samples = reader.read(np.concatenate([ids for _, ids in window]))
            for step, ids in window:
                items = []
                for i in ids.tolist():
                    key, jpg, label = samples[i]
                    # Per sample, not per stream: the same crop whichever rank/worker reads it.
                    gen.manual_seed(seed_for(self.seed, self.epoch, "crop", i))
                    g = gen if self.random_crops else None
                    if self.decode == "worker":
                        items.append((self.transform.geometric(decode_rgb(jpg), g), label, key))
                    else:
                        items.append((jpg, self.transform.params(*_jpeg_size(jpg), g), label, key))
                yield step, items

    def _collate(self, items):
        if self.decode == "worker":
            x, y, keys = zip(*items)
            batch = torch.empty((len(x), *x[0].shape), dtype=x[0].dtype)
            if get_worker_info() is not None:
                # Made in shared memory: sending it to the training process is then a handle;
                # a batch from torch.stack would be copied into shared memory once more.
                batch.share_memory_()
            return torch.stack(x, out=batch), torch.tensor(y), list(keys)
        jpgs, params, labels, keys = zip(*items)
        return EncodedBatch(
            torch.frombuffer(bytearray(b"".join(jpgs)), dtype=torch.uint8),
            torch.tensor([len(j) for j in jpgs]),
            list(params),
            torch.tensor(labels),
            list(keys),
        )

    def __iter__(self):
        info = get_worker_info()
        if info is not None:
            if info.num_workers != len(self.windows):
                raise ValueError(f"{info.num_workers} DataLoader workers for a plan of {len(self.windows)}")
            for _, items in self._batches(info.id):
                yield self._collate(items)
            return
        # One process: the workers' batches interleaved round-robin, the DataLoader's order.
        streams = [self._batches(w) for w in range(len(self.windows))]
        while streams:
            for s in list(streams):
                try:
                    _, items = next(s)
                except StopIteration:
                    streams.remove(s)
                    continue
                yield self._collate(items)


def loader(dataset: PlanStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    device = dataset.decode == "device"
    # Pinning helps only the host-to-device copy of decoded crops; JPEG bytes stay on the host
    # (nvjpeg reads them there), so pinning them would be a wasted copy. batch_size=None: the
    # plan makes the batches.
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory and not device,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        multiprocessing_context=_worker_context(dataset) if num_workers else None,
    )


def _worker_context(dataset: PlanStream):
    """How loader workers start: forked from this process only while it has no other thread;
    otherwise (a Ray Train worker, a process with MLflow's or Ray's threads) forked from a fork
    server. A fork taken while another thread holds a lock leaves the new worker waiting on it
    forever (seen here: a training run stuck as its validation loader started). The server
    imports once what a worker needs (this module and the transform's: torch, ~1.5 s of
    imports; the decoder is torchvision's extension alone, see jpeg_codec), so its workers
    start in milliseconds too."""
    import importlib
    import multiprocessing
    import threading

    needed = [__name__, type(dataset.transform).__module__]
    if threading.active_count() == 1:
        for module in needed:  # imported here once, not in every worker
            importlib.import_module(module)
        return None  # the default, fork: nothing to inherit a held lock from
    ctx = multiprocessing.get_context("forkserver")
    # (a server already running keeps the list it started with: the modules are imported by
    # each worker then, slower but the same)
    ctx.set_forkserver_preload(["__main__", *needed])
    return ctx


def train_loader(
    shards: list[tuple[str, int]],
    transform,
    *,
    segment: plan.Segment,
    rank: int,
    processes: bool = True,
    pin_memory: bool = False,
    decode: str = "worker",
) -> DataLoader:
    """The batches of ``rank`` for the rest of ``segment`` (from its step ``start``), in step
    order: one DataLoader worker per plan loader worker (in this process if not ``processes``)."""
    windows = [segment.worker_windows(rank, w) for w in range(segment.loader_workers)]
    ds = PlanStream(shards, windows, transform, seed=segment.seed, epoch=segment.epoch, decode=decode)
    return loader(ds, segment.loader_workers if processes else 0, pin_memory)


def eval_loader(
    shards: list[tuple[str, int]],
    transform,
    *,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 2,
    pin_memory: bool = False,
    decode: str = "worker",
) -> DataLoader:
    """This rank's share of every sample of ``shards``, once over all ranks (no shuffle)."""
    nw = max(1, num_workers)
    share = plan.eval_share([n for _, n in shards], rank=rank, world=world, loader_workers=nw, batch_size=batch_size)
    windows = [[[(None, ids)] for ids in batches] for batches in share]  # a window per batch: contiguous ids
    ds = PlanStream(shards, windows, transform, decode=decode, random_crops=False)
    return loader(ds, num_workers, pin_memory)
