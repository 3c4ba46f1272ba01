"""Node loss on a real multi-node Ray (a head with no CPUs and 1-CPU worker nodes joined to it,
on this machine): a node is SIGKILLed mid-work, the way a spot instance goes, and never comes
back. Training goes on with fewer workers and reads the rest of the epoch's samples, each once;
the shard stage finishes with the same bytes as an undisturbed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from pipelines.worker import METRICS

from .helpers import epoch_keys, ledger_worlds, read_ledger, recovered
from .multinode import FAST_TRAIN_RESTART, ray_cluster
from .services import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.fault]


def _entries(folder):
    return [json.loads(line) for p in sorted(folder.glob("rank*.jsonl")) for line in p.read_text().splitlines()]


def _summary(output: str) -> dict:
    """The stage's closing JSON line: the last line that is one (Ray prints what it hears of a
    lost node's raylet to the driver's output, sometimes after it)."""
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no summary line in:\n{output[-3000:]}")


def _latest_checkpoint(runs):
    try:
        return json.loads((runs / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"][
            "metrics"
        ]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return {}


def test_a_lost_node_leaves_training_on_fewer_workers_with_each_sample_once(one_shard, tmp_path, record_property):
    ledger, runs = tmp_path / "ledger", tmp_path / "runs"
    with ray_cluster(tmp_path / "cluster", [{"num_cpus": 1}] * 3) as cluster:
        env = {**os.environ, **cluster.env, **FAST_TRAIN_RESTART}
        out = (tmp_path / "driver.log").open("w")
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines",
                "train",
                "--data",
                one_shard,
                "--workers",
                "2-3",
                "--no-gpu",
                "--epochs",
                "2",
                "--crop",
                "64",
                "--batch-size",
                "16",
                "--init",
                "kaiming",
                "--checkpoint-every",
                "2",
                "--name",
                "elastic",
                "--experiment",
                "elastic",
                "--storage",
                str(runs),
                "--ledger",
                str(ledger),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        log = lambda: (tmp_path / "driver.log").read_text()[-4000:]  # noqa: E731
        try:
            deadline = time.monotonic() + 300
            # A checkpoint from the middle of epoch 1, on three workers, is registered: lose a node now.
            while not (
                _latest_checkpoint(runs / "elastic").get("epoch") == 1
                and "step" in _latest_checkpoint(runs / "elastic")
            ):
                assert driver.poll() is None and time.monotonic() < deadline, log()
                time.sleep(0.1)
            first = _entries(ledger)
            assert {e["world"] for e in first} == {3}, "did not start on three workers"
            victim = cluster.node_of(next(e["pid"] for e in first if e["rank"] == 2))
            assert victim >= 0
            lost = time.monotonic()
            cluster.kill_node(victim)  # SIGKILL of its raylet and every process on it; it stays gone
            killed_at = max(e["step"] for e in _entries(ledger) if e["epoch"] == 1)
            assert killed_at < 6, "killed too late: epoch 1 had finished"
            while 2 not in ledger_worlds(ledger):
                assert driver.poll() is None and time.monotonic() < deadline + 600, log()
                time.sleep(0.1)
            recovered(record_property, "Ray node SIGKILLed mid-epoch: to the first step on the workers left", lost)
            assert driver.wait(600) == 0, log()
        finally:
            if driver.poll() is None:
                driver.kill()
    text = (tmp_path / "driver.log").read_text()
    summary = _summary(text)
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


def test_a_node_lost_mid_shard_leaves_the_shards_byte_identical(tmp_path):
    """The shard stage on a head with no CPUs and two 1-CPU worker nodes; one node is SIGKILLed
    once shards have been recorded. Ray reruns its tasks on the node left; the stage finishes
    with every shard byte for byte what a run nobody disturbed made, and no temp file left."""
    from pipelines import index
    from pipelines.config import IndexConfig
    from pipelines.sample import SampleConfig
    from pipelines.sample import run as make_sample

    src = tmp_path / "src"
    make_sample(SampleConfig(out=str(src), classes=4, train_per_class=40, val_per_class=4, size=(800, 600)))
    roots = {name: tmp_path / name for name in ("reference", "node-lost")}
    for root in roots.values():
        index.run(IndexConfig(source=str(src / "folders"), data=str(root), samples_per_shard=4))

    def checksums(root):
        return {
            s["name"]: s["checksum"]
            for split in ("train", "val")
            for s in json.loads((root / "shards" / f"{split}.json").read_text())["shards"]
        }

    with ray_cluster(tmp_path / "cluster", [{"num_cpus": 1}] * 2) as cluster:
        env = {**os.environ, **cluster.env}
        ref = subprocess.run(
            [sys.executable, "-m", "pipelines", "shard", "--data", str(roots["reference"])],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert ref.returncode == 0, ref.stderr[-3000:]
        root = roots["node-lost"]
        log = (tmp_path / "node-lost.log").open("w+")  # a file, not a pipe nobody reads while the test waits
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "shard", "--data", str(root)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output = lambda: (tmp_path / "node-lost.log").read_text()  # noqa: E731
        try:
            manifest = root / "shards" / "train.json"
            deadline = time.monotonic() + 300
            while not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
                assert proc.poll() is None and time.monotonic() < deadline, output()[-3000:]
                time.sleep(0.05)
            # A worker node goes while one of its processes runs a shard task (see kill_mid_task).
            cluster.workers[1].kill_mid_task("counted_task", running=lambda: proc.poll() is None)
            assert proc.wait(600) == 0, output()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
        wait_for(lambda: cluster.alive_nodes() == 2, "the GCS to count the head and the node left", 60)
    out = output()
    summary = _summary(out)
    assert summary["failed"] == 0 and summary["written"] == summary["shards"]
    assert checksums(root) == checksums(roots["reference"])
    assert [p for p in root.rglob("*") if ".tmp-" in p.name] == []
