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
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--tiny",
                        "--compile-backend", "eager"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(row["part"], row["contender"]): row for row in record["rows"]}
    assert set(rows) == {("model", "eager"), ("model", "compiled"),
                         ("end-to-end", "decode=worker"), ("end-to-end", "decode=device")}
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
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--device cpu --tiny" in r.stderr


def test_s3_benchmark_runs_small_and_counts_the_gets(tmp_path):
    env = {**os.environ, "BENCH_OUT": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "benchmarks.s3", "--images", "256", "--repeats", "1", "--warmup", "0"],
                       cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "s3.json").read_text())
    rows = {row["contender"]: row for row in record["rows"]}
    assert set(rows) == {"local", "s3"} and all(row["images/s"] > 0 for row in rows.values())
    # 256 images of 8 classes in one shard: 4 runs of 64, neighbours in the tar: a few GETs at most.
    assert rows["local"]["source GETs"] == 0 and 1 <= rows["s3"]["source GETs"] <= 4
    assert record["ratios"]["s3_vs_local"] > 0
