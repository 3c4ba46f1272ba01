"""Shared fixtures: one generated ImageNet sample and one local Ray for the whole session
(starting Ray costs ~10 s on 2 cores; every stage reuses the running one)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pipelines.sample import SampleConfig
from pipelines.sample import run as make_sample

from .helpers import RECOVERY

LAYOUTS = {"ilsvrc-tar": "tarballs", "kaggle": "kaggle", "folder": "folders"}


@pytest.fixture(scope="session")
def sample_src(tmp_path_factory) -> Path:
    """4 classes x 8 train / 3 val, with the real quirks and planted damaged files."""
    out = tmp_path_factory.mktemp("sample") / "src"
    make_sample(SampleConfig(out=str(out), classes=4, train_per_class=8, val_per_class=3, bad=True))
    return out


@pytest.fixture(scope="session")
def truth(sample_src) -> dict:
    return json.loads((sample_src / "truth.json").read_text())


@pytest.fixture(scope="session", autouse=True)
def tracking_store(tmp_path_factory):
    """Every test (and every subprocess it starts) tracks into a SQLite store of its own."""
    store = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    return store


# Training tests' run folders go to memory (/dev/shm) where it has this much room: each
# checkpoint is ~0.5 GB, and this 2-core machine's disk writes ~100 MB/s once its write cache
# is full, so one took ~4.5 s there, longer than an epoch of these tests trains.
IN_MEMORY_ROOM = 12 * 1024**3


@pytest.fixture(scope="session")
def runs_tmp(tmp_path_factory) -> Path:
    """A scratch folder for training runs: in memory where there is room, else under pytest's."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and shutil.disk_usage(shm).free >= IN_MEMORY_ROOM):
        yield tmp_path_factory.mktemp("runs")
        return
    folder = Path(tempfile.mkdtemp(prefix="pipelines-tests-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def module_runs(runs_tmp, request) -> Path:
    """A folder of runs_tmp for one test module's runs, removed once the module is done."""
    folder = runs_tmp / request.module.__name__.rsplit(".", 1)[-1]
    folder.mkdir()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from . import services as sv

    os.environ.pop("RAY_ADDRESS", None)
    # The local Ray's node holds the tests' S3 identity of its own, as a cloud node has its
    # instance profile: drivers forward only the endpoint (per test), never credentials.
    node = {k: v for k, v in sv.s3_env(0).items() if k.startswith("AWS_") and k != "AWS_ENDPOINT_URL"}
    before = {k: os.environ.get(k) for k in node}
    os.environ.update(node)
    try:
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    finally:  # only these keys: ray.init sets variables of its own that its drivers need
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, ray_local, tracking_store, runs_tmp):
    """A sharded ROOT for training tests: 4 classes x 30 train / 6 val at 72 px, in 3 train
    shards of 50/50/20 samples (uneven over 2 workers); the shard stage ran as a tracked run."""
    from pipelines import index, shard, stats, tracking
    from pipelines.config import IndexConfig, ShardConfig, StatsConfig

    tmp = tmp_path_factory.mktemp("train")
    make_sample(SampleConfig(out=str(tmp / "src"), classes=4, train_per_class=30, val_per_class=6))
    root = str(runs_tmp / "train-root")  # its runs/ holds the checkpoints
    index.run(IndexConfig(source=str(tmp / "src" / "folders"), data=root, samples_per_shard=50))
    tracking.track_stage("shard", ShardConfig(data=root, resize=72), shard.run)  # lineage: a stage run
    stats.run(StatsConfig(data=root))
    return root


@pytest.fixture(scope="session")
def one_shard(tmp_path_factory, ray_local, tracking_store):
    """120 train images in a single shard (the index stage's default grouping), 24 val."""
    from pipelines import index, shard, stats
    from pipelines.config import IndexConfig, ShardConfig, StatsConfig

    tmp = tmp_path_factory.mktemp("one-shard")
    make_sample(SampleConfig(out=str(tmp / "src"), classes=4, train_per_class=30, val_per_class=6))
    root = str(tmp / "root")
    index.run(IndexConfig(source=str(tmp / "src" / "folders"), data=root))
    shard.run(ShardConfig(data=root, resize=72))
    stats.run(StatsConfig(data=root))
    assert [s["samples"] for s in json.loads((Path(root) / "shards" / "train.json").read_text())["shards"]] == [120]
    return root


def pytest_terminal_summary(terminalreporter):
    """The recovery times the fault tests recorded (``helpers.recovered``), one line each."""
    rows = [
        (value, name[len(RECOVERY) :], report.nodeid)
        for report in terminalreporter.stats.get("passed", [])
        if report.when == "call"
        for name, value in report.user_properties
        if name.startswith(RECOVERY)
    ]
    if rows:
        terminalreporter.section("recovery times (injection or end of the fault to recovery)")
        for seconds, fault, test in rows:
            terminalreporter.write_line(f"{seconds:7.1f} s  {fault}  [{test.split('::')[-1][:60]}]")
