"""Benchmarks run (their small modes), and write the rows their reports promise.

Rates are not checked against thresholds: benchmarks are measurements, not timed tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu(tmp_path):
    env = {**os.environ, "BENCH_OUT": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--tiny", "--compile-backend", "eager"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(row["part"], row["contender"]): row for row in record["rows"]}
    assert set(rows) == {
        ("model", "eager"),
        ("model", "compiled"),
        ("end-to-end", "decode=worker"),
        ("end-to-end", "decode=device"),
    }
    for row in rows.values():
        assert row["images/s"] > 0, row
    for name in ("eager", "compiled"):
        assert rows["model", name]["TFLOP/s"] > 0 and rows["model", name]["MFU"] is None  # no GPU peak on a CPU
    for name in ("decode=worker", "decode=device"):
        assert 0 <= rows["end-to-end", name]["data wait"] < 1 and rows["end-to-end", name]["loader workers"] == 2
    # AlexNet at 64 px: the fc layers' ~58.6M weights alone are 6 FLOPs each per image (fwd + 2 bwd).
    assert record["flops_per_image"] > 6 * 58e6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_gpu_benchmark_without_cuda_says_how_to_run_it():
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--device cpu --tiny" in r.stderr


def test_s3_benchmark_runs_small_and_counts_the_gets(tmp_path):
    env = {**os.environ, "BENCH_OUT": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.s3", "--images", "64", "--repeats", "1", "--warmup", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "s3.json").read_text())
    rows = {row["contender"]: row for row in record["rows"]}
    assert set(rows) == {"local", "s3"} and all(row["images/s"] > 0 for row in rows.values())
    # 64 images of 8 classes in one shard: one run of 64 neighbours in the tar, a GET or a few.
    assert rows["local"]["source GETs"] == 0 and 1 <= rows["s3"]["source GETs"] <= 4
    assert record["ratios"]["s3_vs_local"] > 0


def _tiny_shards(tmp_path, n_shards=2, per_shard=4):
    """Shards as the shard stage writes them ({key}.jpg + {key}.cls), 256 px photo-like JPEGs."""
    import io
    import tarfile

    from benchmarks import common

    jpgs = common.photo_jpegs(n_shards * per_shard, size=(256, 256))
    urls = []
    for s in range(n_shards):
        url = tmp_path / f"train-{s:06d}.tar"
        with tarfile.open(url, "w") as tar:
            for i in range(per_shard):
                key = f"k{s}_{i}"
                for ext, data in (("jpg", jpgs[s * per_shard + i]), ("cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(url))
    return urls, jpgs


def test_loader_webdataset_row_gives_normalised_float_batches(tmp_path):
    from benchmarks import loader

    urls, _ = _tiny_shards(tmp_path)
    x, y = next(iter(torch.utils.data.DataLoader(loader.webdataset_dataset(urls, 224), batch_size=6)))
    assert x.dtype == torch.float32 and x.shape == (6, 3, 224, 224) and y.tolist() and set(y.tolist()) <= {0, 1, 2}
    assert -3 < float(x.mean()) < 3 and float(x.std()) > 0.1  # normalised, not 0..1 or 0..255


def test_loader_floor_and_report_rows(tmp_path, monkeypatch):
    """The floor times both decoders; the report has every row, per-core figures and the ratios."""
    import argparse

    from benchmarks import common, loader

    urls, jpgs = _tiny_shards(tmp_path)
    assert sorted(loader.shard_jpegs(urls)) == sorted(jpgs)
    floor = loader.floor_decodes(loader.shard_jpegs(urls), 16)

    def fake(rate):
        def run():
            loader._Clock.images, loader._Clock.first, loader._Clock.rest = 256, 0.5, 256 / rate

        return run

    monkeypatch.setattr(common, "OUT", str(tmp_path))
    a = argparse.Namespace(repeats=1, batch=128, crop=224, workers=2)
    record = loader._measure(
        a, {"pipelines": fake(800.0), "webdataset": fake(400.0), "torchvision": fake(200.0), "floor": floor}, 3, []
    )
    rows = {r["contender"]: r for r in record["rows"]}
    assert set(rows) == {"pipelines", "webdataset", "torchvision", "floor"}
    assert set(record["floor"]["images_per_s_per_core"]) == {"torchvision.io.decode_jpeg", "PIL"}
    assert record["floor"]["decoder"] in record["floor"]["images_per_s_per_core"]
    assert rows["floor"]["cores"] == 1 and rows["floor"]["images/s/core"] == rows["floor"]["images/s"] > 0
    assert rows["floor"]["first batch s"] is None and rows["floor"]["batches/s"] is None
    cores = os.cpu_count()
    assert rows["pipelines"]["images/s/core"] == pytest.approx(800 / cores)
    r = record["ratios"]
    assert r["vs_webdataset"] == pytest.approx(2.0) and r["vs_torchvision"] == pytest.approx(4.0)
    assert r["per_core_vs_decode_floor"] == pytest.approx(800 / cores / rows["floor"]["images/s"])
    assert json.loads((tmp_path / "loader.json").read_text())["ratios"] == r


def test_the_shard_benchmarks_startup_profile_traces_the_stage_it_wraps(tmp_path):
    """The profile wraps the stage's own functions by name: a rename in the stage must fail here,
    not at the end of the 20,000-image benchmark."""
    from benchmarks import shard as bench

    cache = str(tmp_path / "cache")
    _, data, jpgs = bench._dataset(40, 2, 10, cache)
    p = bench.startup_profile(data, cache)
    phases = [x["phase"] for x in p["phases"]]
    assert p["tasks"] == 4 and phases[0].startswith("python start"), phases
    assert any(x.startswith("first finished shard") for x in phases), phases
    mlflow = ["MLflow: import mlflow, open the store", "MLflow: experiment, run, params"]
    assert [x["phase"] for x in p["beside"]] == mlflow
    assert len(jpgs) == 40
