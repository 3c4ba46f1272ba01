"""Faults injected for real (issue 5): processes killed mid-work, then rerun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlflow import MlflowClient

from pipelines import index, shard
from pipelines.config import IndexConfig, ShardConfig
from pipelines.sample import SampleConfig, run as make_sample
from pipelines.train import METRICS

from . import services as sv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big_index(tmp_path_factory):
    """Photo-sized images in many small shards, so a shard run lasts long enough to be killed."""
    tmp = tmp_path_factory.mktemp("kill")
    make_sample(SampleConfig(out=str(tmp / "src"), classes=4, train_per_class=40, val_per_class=4, size=(800, 600)))
    return tmp


def _index(tmp: Path, name: str) -> Path:
    root = tmp / name
    index.run(IndexConfig(source=str(tmp / "src" / "folders"), data=str(root), samples_per_shard=4))
    return root


def _checksums(root: Path) -> dict[str, str]:
    out = {}
    for split in ("train", "val"):
        m = json.loads((root / "shards" / f"{split}.json").read_text())
        assert m["complete"]
        out.update({s["name"]: s["checksum"] for s in m["shards"]})
    return out


def _kill_shard_run_midway(root: Path, env: dict, total: int) -> int:
    """Start the shard CLI, SIGKILL it once some but not all shards are recorded; returns how many were."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "shard", "--data", str(root)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = root / "shards" / "train.json"
    deadline = time.monotonic() + 120
    recorded = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            recorded = len(json.loads(manifest.read_text())["shards"])
        except (FileNotFoundError, json.JSONDecodeError):
            recorded = 0
        if recorded >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 1 <= recorded < total, f"not killed mid-run: {recorded} of {total} train shards recorded"
    return recorded


def test_shard_stage_killed_twice_then_rerun_matches_an_uninterrupted_run(big_index, ray_local):
    reference = _index(big_index, "reference")
    shard.run(ShardConfig(data=str(reference)))
    want = _checksums(reference)
    total_train = sum(1 for n in want if n.startswith("train"))

    root = _index(big_index, "killed")
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    _kill_shard_run_midway(root, env, total_train)
    recorded = _kill_shard_run_midway(root, env, total_train)  # killed again, later in the work
    # Killed writers may leave hidden temp files; no reader ever sees one under a shard's name.
    assert all(p.name.startswith(".") for p in (root / "shards" / "train").iterdir() if ".tmp-" in p.name)
    summary = shard.run(ShardConfig(data=str(root)))
    assert summary["skipped"] >= recorded  # everything recorded before the kill was kept, not redone
    assert summary["written"] + summary["skipped"] == len(want)
    assert _checksums(root) == want  # same bytes as the run nobody killed
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def _wait(check, what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_tracking_server_outage_mid_training_loses_no_metric(dataset, ray_local, tmp_path):
    server = sv.MlflowServer(tmp_path / "mlflow")
    server.start()
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.uri,
               RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "train", "--data", dataset, "--workers", "2", "--no-gpu",
         "--epochs", "4", "--crop", "64", "--batch-size", "16", "--init", "kaiming", "--name", "outage",
         "--experiment", "outage", "--storage", str(runs)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(tracking_uri=server.uri)

        def epoch_one_logged():
            exp = client.get_experiment_by_name("outage")
            found = client.search_runs([exp.experiment_id]) if exp else []
            steps = [m.step for m in client.get_metric_history(found[0].info.run_id, "val_top1")] if found else []
            return found[0].info.run_id if steps == [1] else None

        run_id = _wait(epoch_one_logged, "epoch 1 in MLflow")
        server.stop()  # the tracking server goes away mid-training...
        seen = set((runs / "outage").glob("checkpoint_2*"))
        _wait(lambda: set((runs / "outage").glob("checkpoint_2*")) - seen, "an epoch finished during the outage")
        server.start()  # ...and comes back on the same port and store
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        assert "MLflow not reachable" in out  # the worker noticed, and went on training
        run = client.get_run(run_id)
        for key in METRICS:
            assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4], key
        assert run.info.status == "FINISHED" and "pipelines.model_uri" in run.data.tags
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
