"""Shared fixtures: one generated ImageNet sample and one local Ray for the whole session
(starting Ray costs ~10 s on 2 cores; every stage reuses the running one)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipelines.sample import SampleConfig, run as make_sample

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


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="WARNING")
    yield ray
    ray.shutdown()
