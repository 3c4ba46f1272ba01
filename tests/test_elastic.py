"""Elastic training on a real multi-node Ray (a head with no CPUs and three 1-CPU worker nodes
on this machine): a node is SIGKILLed mid-epoch, the way a spot instance goes, and never comes
back; training goes on with two workers and reads the rest of the epoch's samples, each once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from pipelines.train import METRICS

from .helpers import epoch_keys, read_ledger
from .multinode import FAST_TRAIN_RESTART, ray_cluster

pytestmark = pytest.mark.slow


def _entries(folder):
    return [json.loads(line) for p in sorted(folder.glob("rank*.jsonl")) for line in p.read_text().splitlines()]


def _latest_checkpoint(runs):
    try:
        return json.loads((runs / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]["metrics"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def test_a_lost_node_leaves_training_on_fewer_workers_with_each_sample_once(one_shard, tmp_path):
    ledger, runs = tmp_path / "ledger", tmp_path / "runs"
    with ray_cluster(tmp_path / "cluster", [{"num_cpus": 1}] * 3) as cluster:
        env = {**os.environ, **cluster.env, **FAST_TRAIN_RESTART}
        out = (tmp_path / "driver.log").open("w")
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "train", "--data", one_shard, "--workers", "2-3", "--no-gpu",
             "--epochs", "2", "--crop", "64", "--batch-size", "16", "--init", "kaiming", "--checkpoint-every", "2",
             "--name", "elastic", "--experiment", "elastic", "--storage", str(runs), "--ledger", str(ledger)],
            env=env, stdout=out, stderr=subprocess.STDOUT)
        log = lambda: (tmp_path / "driver.log").read_text()[-4000:]  # noqa: E731
        try:
            deadline = time.monotonic() + 300
            # A checkpoint from the middle of epoch 1, on three workers, is registered: lose a node now.
            while not (_latest_checkpoint(runs / "elastic").get("epoch") == 1 and "step" in _latest_checkpoint(runs / "elastic")):
                assert driver.poll() is None and time.monotonic() < deadline, log()
                time.sleep(0.1)
            first = _entries(ledger)
            assert {e["world"] for e in first} == {3}, "did not start on three workers"
            victim = cluster.node_of(next(e["pid"] for e in first if e["rank"] == 2))
            assert victim >= 0
            cluster.kill_node(victim)  # SIGKILL of its raylet and every process on it; it stays gone
            killed_at = max(e["step"] for e in _entries(ledger) if e["epoch"] == 1)
            assert killed_at < 6, "killed too late: epoch 1 had finished"
            assert driver.wait(600) == 0, log()
        finally:
            if driver.poll() is None:
                driver.kill()
    text = (tmp_path / "driver.log").read_text()
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["epochs"] == 2 and summary["left_out_per_epoch"] == 8

    final = read_ledger(ledger)
    per_step_world = {step: len(ranks) for step, ranks in final[1].items()}
    # Epoch 1: its first steps on three workers, the rest (from a checkpoint step) on two.
    three = sorted(s for s, n in per_step_world.items() if n == 3)
    two = sorted(s for s, n in per_step_world.items() if n == 2)
    assert three and two and three == list(range(len(three))) and two == list(range(len(three), 7)), per_step_world
    assert len(three) % 2 == 0  # resumed at a checkpoint (every 2 steps)
    assert all(n == 2 for n in map(len, final[2].values())) and sorted(final[2]) == list(range(7))
    for epoch in (1, 2):  # every sample once, but the 8 left out (120 = 7 x 16 + 8)
        keys = epoch_keys(final, epoch)
        assert len(keys) == len(set(keys)) == 112, epoch
    assert "on 2 workers" in text and "dealt over 2 workers" in text

    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    for key in METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
