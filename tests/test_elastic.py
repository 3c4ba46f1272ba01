"""Node loss on a real multi-node Ray (a head with no CPUs and 1-CPU worker nodes joined to it,
on this machine): a node is SIGKILLed mid-work, the way a spot instance goes, and never comes
back. The shard stage finishes with the same bytes as an undisturbed run. (Training through a
node loss: the storm, in tests/test_multinode_s3.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .multinode import ray_cluster
from .services import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.fault]


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
