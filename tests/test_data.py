"""Shards -> batches for one worker (issue 3): balanced ranks, seeded order, fast decode."""
from __future__ import annotations

import io
import itertools

import pytest
import torch
from PIL import Image

import model
from pipelines import data

from .helpers import write_shard_tar

STATS = {"mean": [0.5] * 3, "std": [0.25] * 3, "eigval": [0.02, 0.01, 0.005],
         "eigvec": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}


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


def test_plan_gives_every_rank_the_same_steps_and_all_shards_once(uneven):
    for epoch in range(5):
        plans = [data.plan_epoch(uneven, batch_size=3, rank=r, world_size=2, epoch=epoch, seed=0) for r in range(2)]
        assert plans[0].steps == plans[1].steps == (14 // 2) // 3
        assert sorted(u for p in plans for u in p.shards) == sorted(u for u, _ in uneven)
        assert sorted(p.samples for p in plans) == [7, 7]  # greedy balance: 7 | 5+2
    again = data.plan_epoch(uneven, batch_size=3, rank=0, world_size=2, epoch=1, seed=0)
    assert again == data.plan_epoch(uneven, batch_size=3, rank=0, world_size=2, epoch=1, seed=0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        data.plan_epoch(uneven, batch_size=8, rank=0, world_size=2, epoch=0, seed=0)


def test_uneven_ranks_yield_exactly_steps_batches_with_cycling(uneven):
    tf = model.TrainTransform.from_stats(STATS, crop=64)
    for rank in range(2):
        loader, plan = data.train_loader(uneven, tf, batch_size=4, rank=rank, world_size=3, epoch=0, seed=0,
                                         num_workers=0, shuffle_buffer=4)
        batches = list(itertools.islice(loader, plan.steps))
        assert len(batches) == plan.steps == (14 // 3) // 4
        for x, y in batches:
            assert x.dtype == torch.uint8 and x.shape == (4, 3, 64, 64) and y.shape == (4,)
    # A rank with a single 2-sample shard still fills its batches: its stream cycles.
    tiny = [uneven[2]]
    loader, plan = data.train_loader(tiny * 1, tf, batch_size=1, rank=0, world_size=1, epoch=0, seed=0,
                                     num_workers=0, shuffle_buffer=0)
    ds = loader.dataset
    assert len(list(itertools.islice(iter(ds), 5))) == 5


def test_shuffle_is_seeded_per_epoch_and_keeps_every_sample(uneven):
    tf = model.EvalTransform.from_stats(STATS, crop=64)
    urls = [u for u, _ in uneven]

    def labels(epoch, seed=0):
        ds = data.ShardStream(urls, tf, seed=seed, epoch=epoch, shuffle_buffer=5)
        return [int(y) for _, y in ds]

    assert labels(0) == labels(0)
    assert labels(0) != labels(1)
    assert sorted(labels(0)) == sorted(labels(1)) == sorted(i % 3 for i in range(14))


def test_eval_loader_reads_every_sample_once_across_loader_workers(uneven):
    tf = model.EvalTransform.from_stats(STATS, crop=64)
    loader = data.eval_loader([u for u, _ in uneven], tf, batch_size=4, num_workers=2)
    ys = torch.cat([y for _, y in loader])
    assert sorted(ys.tolist()) == sorted(i % 3 for i in range(14))


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


# --- decode="device" (issue "Performance"): the same batches, decoded in the training process ---
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


def _batches(loader, device="cpu", steps=None):
    return list(itertools.islice(data.on_device(loader, device), steps))


def test_device_decode_on_cpu_gives_the_worker_paths_train_batches(photos):
    tf = model.TrainTransform.from_stats(STATS, crop=64)
    for rank, workers in ((0, 0), (1, 2)):  # in-process, and through loader worker processes
        kw = dict(batch_size=3, rank=rank, world_size=2, epoch=1, seed=7, num_workers=workers, shuffle_buffer=4)
        want, plan = data.train_loader(photos, tf, **kw)
        got, _ = data.train_loader(photos, tf, decode="device", **kw)
        want, got = _batches(want, steps=plan.steps), _batches(got, steps=plan.steps)
        assert len(got) == len(want) == plan.steps
        for (xw, yw), (xg, yg) in zip(want, got):
            assert xg.dtype == torch.uint8 and xg.shape == xw.shape == (3, 3, 64, 64)
            assert torch.equal(xg, xw) and torch.equal(yg, yw)
    # The comparison can fail: crops and flips differ between seeds.
    other, _ = data.train_loader(photos, tf, **{**kw, "seed": 8})
    assert not torch.equal(_batches(other, steps=1)[0][0], want[0][0])


@pytest.mark.parametrize("ten_crop", [False, True])
def test_device_decode_on_cpu_gives_the_worker_paths_eval_batches(photos, ten_crop):
    tf = model.EvalTransform.from_stats(STATS, crop=64, ten_crop=ten_crop)
    urls = [u for u, _ in photos]
    want = _batches(data.eval_loader(urls, tf, batch_size=5, num_workers=2))
    got = _batches(data.eval_loader(urls, tf, batch_size=5, num_workers=2, decode="device"))
    assert [x.shape for x, _ in got] == [x.shape for x, _ in want]
    assert want[0][0].shape == ((5, 10, 3, 64, 64) if ten_crop else (5, 3, 64, 64))
    for (xw, yw), (xg, yg) in zip(want, got):
        assert torch.equal(xg, xw) and torch.equal(yg, yw)


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
    from pipelines.common import StageError
    from pipelines.config import TrainConfig

    assert data.choose_decode("auto", torch.device("cuda", 0)) == "device"
    assert data.choose_decode("auto", "cuda") == "device"
    assert data.choose_decode("auto", "cpu") == "worker"
    assert data.choose_decode("device", "cpu") == "device"
    assert data.choose_decode("worker", "cuda") == "worker"
    with pytest.raises(ValueError, match="Unknown decode 'gpu'. Expected one of: auto, worker, device"):
        data.choose_decode("gpu", "cuda")
    with pytest.raises(ValueError, match="choose_decode"):
        data.ShardStream([], None, decode="auto")

    assert TrainConfig(data="x").decode == "auto"
    train._validate(TrainConfig(data="x", decode="device"))
    with pytest.raises(StageError, match="Unknown decode 'nvjpeg'. Expected one of: auto, worker, device"):
        train._validate(TrainConfig(data="x", decode="nvjpeg"))
    assert vars(cli.parser().parse_args(["train", "--data", "x", "--decode", "device"]))["decode"] == "device"
    assert "decode" not in vars(cli.parser().parse_args(["train", "--data", "x"]))  # config.py's default wins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg needs a CUDA device")
def test_nvjpeg_batches_match_the_cpu_path_within_jpeg_tolerance(photos):
    tf = model.TrainTransform.from_stats(STATS, crop=64)
    kw = dict(batch_size=4, rank=0, world_size=1, epoch=0, seed=0, num_workers=2, shuffle_buffer=4)
    want, plan = data.train_loader(photos, tf, **kw)
    got, _ = data.train_loader(photos, tf, decode="device", **kw)
    want, got = _batches(want, steps=plan.steps), _batches(got, "cuda", steps=plan.steps)
    for (xw, yw), (xg, yg) in zip(want, got):
        assert xg.device.type == "cuda" and xg.dtype == torch.uint8 and xg.shape == xw.shape
        assert torch.equal(yg.cpu(), yw)
        diff = (xg.cpu().int() - xw.int()).abs()
        # nvjpeg and libjpeg-turbo differ in IDCT and chroma upsampling rounding, not in content.
        assert diff.float().mean() < 1.0 and diff.max() <= 16, (diff.float().mean(), diff.max())
