"""The GPU check (benchmarks/gpu_check) rehearsed on the CPU: the same script and steps a GPU
machine runs, at a tiny size, so a broken step shows here rather than in a GPU machine's minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "check.json",
    "env.json",
    "cuda-tests.json",
    "gpu.json",
    "train.json",
    "evaluate.json",
    "bisect.json",
    "run.log",
}


@pytest.mark.slow
def test_the_gpu_check_rehearsed_on_the_cpu_runs_every_step_and_writes_every_file(tmp_path, module_runs):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    work = module_runs / "work"  # the data, the training run's checkpoints and its store
    p = subprocess.run(
        ["bash", "benchmarks/gpu_check/run.sh", str(out), "--cpu-rehearsal", "--work", str(work)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert p.returncode == 0, p.stderr[-3000:] + log[-3000:]
    assert {f.name for f in out.iterdir()} == FILES  # at most 8 files come back from a GPU machine
    steps = json.loads((out / "check.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [
        "env",
        "cuda-tests",
        "bench",
        "sample",
        "index",
        "shard",
        "stats",
        "train",
        "evaluate",
        "bisect",
    ]
    assert all(s["ok"] for s in steps), steps
    read = lambda name: json.loads((out / name).read_text())  # noqa: E731
    assert read("env.json")["device"] == "CPU"
    tests = read("cuda-tests.json")  # collected, and skipped for want of a CUDA device
    assert tests["tests"] >= 4 and tests["skipped"] == tests["tests"] and tests["failures"] == 0
    assert {r["contender"] for r in read("gpu.json")["rows"]} >= {"eager", "compiled", "decode=worker", "decode=device"}
    train = read("train.json")
    assert train["epochs"] == 2 and train["gpu"] is False and train["images_per_second"] > 0
    assert 0 <= train["data_wait_fraction"] < 1
    assert "autocast torch.bfloat16, channels_last, compiled" in log  # the worker ran the GPU's flags
    evaluation = read("evaluate.json")
    assert evaluation["crops"] == 10 and evaluation["run_id"] == train["run_id"] and evaluation["images"] == 16
    [(name, variant)] = read("bisect.json")["variants"].items()
    assert name == "as-run-eager" and variant["steps"] == 2 and set(variant["loss"]) == {"1", "2"}


def test_the_slimmed_ray_wheel_keeps_its_record_true(tmp_path):
    """wheels.slim_ray drops the parts no stage uses and lists only what stays in RECORD (pip
    checks RECORD against the files)."""
    from benchmarks.gpu_check import wheels

    whl = tmp_path / "ray-0-py3-none-any.whl"
    kept = {"ray/__init__.py": b"x", "ray/train/a.py": b"y"}
    dropped = {"ray/jars/ray_dist.jar": b"j" * 100, "ray/rllib/b.py": b"z"}
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in {**kept, **dropped}.items():
            z.writestr(name, data)
        z.writestr("ray-0.dist-info/RECORD", "".join(f"{n},sha256=x,1\n" for n in [*kept, *dropped]))
    wheels.slim_ray(str(whl))
    with zipfile.ZipFile(whl) as z:
        assert set(z.namelist()) == {*kept, "ray-0.dist-info/RECORD"}
        assert z.read("ray-0.dist-info/RECORD").decode().splitlines() == [f"{n},sha256=x,1" for n in kept]
        assert all(z.read(n) == data for n, data in kept.items())
