"""Shards -> batches for one worker: what the plan deals, read through the sample index, fast decode."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from PIL import Image

import model
from pipelines import data, plan

from .helpers import write_shard_tar

STATS = {
    "mean": [0.5] * 3,
    "std": [0.25] * 3,
    "eigval": [0.02, 0.01, 0.005],
    "eigvec": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
}


def _shard(path, keys_labels, size=(80, 80)):
    samples = []
    for key, label in keys_labels:
        buf = io.BytesIO()
        Image.new("RGB", size, (label * 20 % 256, 100, 50)).save(buf, "JPEG", quality=95)
        samples.append((key, buf.getvalue(), label))
    return write_shard_tar(path, samples)


@pytest.fixture
def uneven(tmp_path):
    """3 shards of 7, 5 and 2 samples: no even split over 2 ranks exists."""
    sizes = [7, 5, 2]
    shards, n = [], 0
    for i, size in enumerate(sizes):
        keys = [(f"img{n + j:03d}", (n + j) % 3) for j in range(size)]
        n += size
        shards.append((_shard(tmp_path / f"train-{i:06d}.tar", keys), size))
    return shards


def _segment(shards, batch_size, world, loader_workers, epoch=0, seed=0, buffer=4, segments=()):
    return plan.epoch_plan(
        [n for _, n in shards],
        seed=seed,
        epoch=epoch,
        batch_size=batch_size,
        world=world,
        loader_workers=loader_workers,
        buffer=buffer,
        block=3,
        segments=segments,
    )


def _keys_by_step(shards, seg, rank, processes):
    loader = data.train_loader(
        shards, model.TrainTransform.from_stats(STATS, crop=64), segment=seg, rank=rank, processes=processes
    )
    return [(x.shape, y.tolist(), keys) for x, y, keys in loader]


def test_loaders_read_exactly_what_the_plan_deals_in_step_order(uneven):
    """14 samples in shards of 7/5/2, global batch 5 over 3 ranks (2/2/1 a rank), 2 loader workers
    each: every step of every rank holds the plan's samples, read through the sample index."""
    seg = _segment(uneven, 5, 3, 2)
    assert (seg.steps, seg.remainder) == (2, 4)
    key_of = {i: f"img{i:03d}" for i in range(14)}
    seen = []
    for rank in range(3):
        want = sorted(
            (
                (s, [key_of[int(i)] for i in ids])
                for w in range(2)
                for win in seg.worker_windows(rank, w)
                for s, ids in win
            )
        )
        for processes in (False, True):  # in this process, and through DataLoader worker processes
            got = _keys_by_step(uneven, seg, rank, processes)
            assert [keys for _, _, keys in got] == [keys for _, keys in want]
            assert all(shape == (len(keys), 3, 64, 64) for shape, _, keys in got)
            assert all(labels == [int(k[3:]) % 3 for k in keys] for _, labels, keys in got)
        seen += [k for _, keys in want for k in keys]
    assert len(seen) == len(set(seen)) == 10  # each used sample once; 4 left out this epoch


def test_a_resumed_segment_yields_the_rest_of_the_epoch_unchanged(uneven):
    seg = _segment(uneven, 4, 1, 2)
    whole = _keys_by_step(uneven, seg, 0, False)
    for start in range(1, seg.steps):
        resumed = _segment(uneven, 4, 1, 2, segments=[(1, 2, start)])
        assert resumed.start == start
        rest = _keys_by_step(uneven, resumed, 0, True)
        assert [k for *_, k in rest] == [k for *_, k in whole[start:]]


_HELD = threading.Lock()  # taken by _LockingTransform in the loader workers


class _LockingTransform(model.TrainTransform):
    def geometric(self, img, generator=None):
        with _HELD:
            return super().geometric(img, generator)


def test_loader_workers_of_a_threaded_process_inherit_no_held_lock(uneven):
    """A worker forked while another thread holds a lock gets that lock held by no one, forever
    (a training run hung this way, in a Ray Train worker). Here a thread holds a lock the
    workers' transform takes while the loader starts its workers; every batch still comes."""
    seg = _segment(uneven, 4, 1, 2)
    tf = _LockingTransform.from_stats(STATS, crop=64)
    want = [keys for *_, keys in data.train_loader(uneven, tf, segment=seg, rank=0, processes=False)]
    held, done, got = threading.Event(), threading.Event(), []

    def hold():
        with _HELD:
            held.set()
            done.wait(120)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    held.wait()
    reader = threading.Thread(
        target=lambda: got.extend(keys for *_, keys in data.train_loader(uneven, tf, segment=seg, rank=0)), daemon=True
    )
    reader.start()
    reader.join(90)
    done.set()
    assert not reader.is_alive(), "the loader's workers hung on a lock held when they started"
    assert got == want


def test_crops_follow_the_sample_not_the_rank_that_reads_it(uneven):
    """The same sample is cropped the same way whatever world size deals it."""
    tf = model.TrainTransform.from_stats(STATS, crop=64)
    crops = {}
    for world in (1, 2):
        for rank in range(world):
            seg = _segment(uneven, 4, world, 1)
            for x, _, keys in data.train_loader(uneven, tf, segment=seg, rank=rank, processes=False):
                for img, key in zip(x, keys):
                    if key in crops:
                        assert torch.equal(crops[key], img), key
                    crops[key] = img
    assert len(crops) == 12


def test_shuffle_is_seeded_per_epoch(uneven):
    def keys(epoch, seed=0):
        return [k for *_, k in _keys_by_step(uneven, _segment(uneven, 2, 1, 1, epoch=epoch, seed=seed), 0, False)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1) and keys(0) != keys(0, seed=1)
    assert sorted(sum(keys(0), [])) == sorted(sum(keys(1), [])) == [f"img{i:03d}" for i in range(14)]


def test_eval_loader_reads_every_sample_once_across_ranks_and_loader_workers(uneven):
    tf = model.EvalTransform.from_stats(STATS, crop=64)
    for world in (1, 2, 3, 20):
        keys = []
        for rank in range(world):
            for workers in (0, 2):
                loader = data.eval_loader(uneven, tf, batch_size=4, rank=rank, world=world, num_workers=workers)
                got = [k for _, _, ks in loader for k in ks]
                if workers:
                    keys += got
        assert sorted(keys) == [f"img{i:03d}" for i in range(14)], world


def test_a_shard_without_its_sample_index_is_named_with_the_fix(uneven):
    import os

    from pipelines import tarindex
    from pipelines.errors import StageError

    os.remove(tarindex.index_url(uneven[1][0]))
    seg = _segment(uneven, 14, 1, 1)
    with pytest.raises(StageError, match="train-000001.idx.json.*rerun the shard stage"):
        list(
            data.train_loader(
                uneven, model.TrainTransform.from_stats(STATS, crop=64), segment=seg, rank=0, processes=False
            )
        )


def test_fast_decode_matches_pil_within_jpeg_tolerance(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    arr = (rng.random((96, 128, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    fast = data.decode_rgb(buf.getvalue()).permute(1, 2, 0).numpy().astype(int)
    slow = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(int)
    assert fast.shape == slow.shape
    assert np.abs(fast - slow).mean() < 1.0 and np.abs(fast - slow).max() <= 8


# --- decode="device": the same batches, decoded in the training process ---
def _photo_shard(path, keys_labels, sizes):
    """Textured JPEGs of the given (w, h) sizes: every crop position and flip shows in the pixels."""
    import numpy as np

    rng = np.random.default_rng(len(keys_labels))
    samples = []
    for (key, label), (w, h) in zip(keys_labels, sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        px = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 64 * 4], -1) + rng.normal(0, 20, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(px.clip(0, 255).astype("uint8")).save(buf, "JPEG", quality=90)
        samples.append((key, buf.getvalue(), label))
    return write_shard_tar(path, samples)


@pytest.fixture
def photos(tmp_path):
    """3 shards, 16 samples, non-square images of varying size (a swapped height/width shows)."""
    shards, n = [], 0
    for i, count in enumerate([6, 6, 4]):
        keys = [(f"img{n + j:03d}", (n + j) % 5) for j in range(count)]
        sizes = [(80 + 4 * ((n + j) % 3), 72 + 6 * ((n + j) % 2)) for j in range(count)]
        n += count
        shards.append((_photo_shard(tmp_path / f"train-{i:06d}.tar", keys, sizes), count))
    return shards


def _batches(loader, device="cpu"):
    return list(data.on_device(loader, device))


def test_device_decode_on_cpu_gives_the_worker_paths_train_batches(photos):
    tf = model.TrainTransform.from_stats(STATS, crop=64)
    for rank, processes in ((0, False), (1, True)):  # in-process, and through loader worker processes
        seg = _segment(photos, 6, 2, 2, epoch=1, seed=7)
        want = _batches(data.train_loader(photos, tf, segment=seg, rank=rank, processes=processes))
        got = _batches(data.train_loader(photos, tf, segment=seg, rank=rank, processes=processes, decode="device"))
        assert len(got) == len(want) == seg.steps
        for (xw, yw, kw), (xg, yg, kg) in zip(want, got):
            assert xg.dtype == torch.uint8 and xg.shape == xw.shape == (3, 3, 64, 64)
            assert torch.equal(xg, xw) and torch.equal(yg, yw) and kg == kw
    # The comparison can fail: crops and flips differ between seeds.
    other = _batches(data.train_loader(photos, tf, segment=_segment(photos, 6, 2, 2, epoch=1, seed=8), rank=1))
    assert not torch.equal(other[0][0], want[0][0])


@pytest.mark.parametrize("ten_crop", [False, True])
def test_device_decode_on_cpu_gives_the_worker_paths_eval_batches(photos, ten_crop):
    tf = model.EvalTransform.from_stats(STATS, crop=64, ten_crop=ten_crop)
    want = _batches(data.eval_loader(photos, tf, batch_size=5, num_workers=2))
    got = _batches(data.eval_loader(photos, tf, batch_size=5, num_workers=2, decode="device"))
    assert [x.shape for x, *_ in got] == [x.shape for x, *_ in want]
    assert want[0][0].shape == ((5, 10, 3, 64, 64) if ten_crop else (5, 3, 64, 64))
    for (xw, yw, kw), (xg, yg, kg) in zip(want, got):
        assert torch.equal(xg, xw) and torch.equal(yg, yw) and kg == kw


def test_params_then_apply_is_geometric_with_the_same_generator_draws():
    img = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tf = model.TrainTransform.from_stats(STATS, crop=64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(10):
        assert torch.equal(tf.geometric(img, g1), tf.apply(img, tf.params(70, 90, g2)))
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))  # same draws consumed
    with pytest.raises(ValueError, match="smaller than the 64 px crop"):
        tf.params(60, 90)


def test_auto_decode_is_device_only_on_cuda_and_config_and_cli_take_it():
    from pipelines import cli, train
    from pipelines.config import TrainConfig
    from pipelines.errors import StageError

    assert data.choose_decode("auto", torch.device("cuda", 0)) == "device"
    assert data.choose_decode("auto", "cuda") == "device"
    assert data.choose_decode("auto", "cpu") == "worker"
    assert data.choose_decode("device", "cpu") == "device"
    assert data.choose_decode("worker", "cuda") == "worker"
    with pytest.raises(ValueError, match="Unknown decode 'gpu'. Expected one of: auto, worker, device"):
        data.choose_decode("gpu", "cuda")
    with pytest.raises(ValueError, match="choose_decode"):
        data.PlanStream([], [], None, decode="auto")

    assert TrainConfig(data="x").decode == "auto"
    train._validate(TrainConfig(data="x", decode="device"))
    with pytest.raises(StageError, match="Unknown decode 'nvjpeg'. Expected one of: auto, worker, device"):
        train._validate(TrainConfig(data="x", decode="nvjpeg"))
    assert vars(cli.parser().parse_args(["train", "--data", "x", "--decode", "device"]))["decode"] == "device"
    assert "decode" not in vars(cli.parser().parse_args(["train", "--data", "x"]))  # config.py's default wins


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg needs a CUDA device")
def test_nvjpeg_batches_match_the_cpu_path_within_jpeg_tolerance(photos):
    tf = model.TrainTransform.from_stats(STATS, crop=64)
    seg = _segment(photos, 4, 1, 2)
    want = _batches(data.train_loader(photos, tf, segment=seg, rank=0))
    got = _batches(data.train_loader(photos, tf, segment=seg, rank=0, decode="device"), "cuda")
    assert len(want) == len(got) == seg.steps
    for (xw, yw, _), (xg, yg, _) in zip(want, got):
        assert xg.device.type == "cuda" and xg.dtype == torch.uint8 and xg.shape == xw.shape
        assert torch.equal(yg.cpu(), yw)
        # Compared in luma: nvjpeg upsamples the half-resolution chroma by plain replication,
        # libjpeg-turbo by interpolation, which on these noisy test images moves RGB values by 4.5
        # on average and up to ~90 (seen on an H200; libjpeg-turbo's own fast upsampling gives 4.2
        # and 90 on the CPU). Luma is stored at full resolution and recomputing it from RGB cancels
        # chroma (up to clipping): fast against interpolated upsampling gives mean 0.28, 99th
        # percentile 1.9. On this texture a crop one pixel off moves it by ~15 on average, a flip by ~35.
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        diff = ((xg.cpu().float() - xw.float()) * luma).sum(1).abs()
        assert diff.mean() < 1.0 and diff.quantile(0.99) <= 4, (diff.mean(), diff.quantile(0.99))


def test_the_fast_tar_header_reader_agrees_with_tarfile_and_leaves_damage_to_it():
    """parse_run reads the shard stage's plain ustar headers itself; any other header (a long name
    split into ustar's prefix field, a damaged checksum) goes to tarfile, which parses or rejects it."""
    import tarfile

    from pipelines import tarindex
    from pipelines.shard import add_member

    names = ["n01440764_10026", "ILSVRC2012_val_00000001", "photo-ß-日本", "dir/sub/x_y", "d" * 80 + "/" + "k" * 90]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # as the shard stage
        for i, key in enumerate(names):
            add_member(tar, f"{key}.jpg", bytes([i]) * (700 + i))
            add_member(tar, f"{key}.cls", str(i).encode())
    raw = buf.getvalue()
    headers = [raw[m.offset : m.offset + tarfile.BLOCKSIZE] for m in tarfile.open(fileobj=io.BytesIO(raw))]
    for h in headers:
        info = tarfile.TarInfo.frombuf(h, "utf-8", "surrogateescape")
        assert tarindex._plain_member(h) == (None if len(info.name) > 100 else (info.name, info.size))
    assert tarindex.parse_run(raw) == [(k, bytes([i]) * (700 + i), i) for i, k in enumerate(names)]

    damaged = bytearray(raw)
    damaged[5] ^= 0x20  # a name byte of the first header: its checksum no longer matches
    assert tarindex._plain_member(bytes(damaged[: tarfile.BLOCKSIZE])) is None
    with pytest.raises(tarfile.HeaderError, match="checksum"):
        tarindex.parse_run(bytes(damaged))
