"""The stall report, on local files: two "ranks" (processes with a real Heartbeat) train a few
steps, then one is SIGSTOPped while the other waits for it, as a rank waits in an all-reduce.
(tests/test_faults.py stops a real Ray Train worker and checks the restart.)"""

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

from pipelines import stall

RANK = """
import os, sys, time
from pipelines import stall
stall.BEAT_S = 0.2
run_dir, rank, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hb = stall.Heartbeat(run_dir, rank, 2, float(sys.argv[4]), node_id="")

def all_reduce_stand_in(step):  # waits for the peer's step, as a collective does
    while not os.path.exists(os.path.join(run_dir, f"step-{1 - rank}-{step}")):
        time.sleep(0.05)

for step in range(10**6):
    open(os.path.join(run_dir, f"step-{rank}-{step}"), "w").close()
    all_reduce_stand_in(step)
    hb.progress("train", 1, step, [f"key{rank}-{step}-{i}" for i in range(4)])
    if step >= steps:
        time.sleep(0.1)  # then slower: the test stops rank 1 after a few steps
"""


def _wait(check, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _beat(run_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((run_dir / stall.HEARTBEATS / f"rank{rank:03d}.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.fault
@pytest.mark.parametrize("action", ["report", "restart"])
def test_a_stopped_rank_is_named_silent_and_the_waiting_rank_shows_where_it_waits(tmp_path, monkeypatch, action):
    monkeypatch.setattr(stall, "BEAT_S", 0.2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(f"stall-{action}")).info.run_id
    ranks = [
        subprocess.Popen([sys.executable, "-c", RANK, str(run_dir), str(r), "5", "2"], cwd=Path(__file__).parent.parent)
        for r in (0, 1)
    ]
    restarted = []
    watch = stall.Watch(str(run_dir), run_id, floor_s=2, action=action, restart=restarted.extend).start()
    try:
        _wait(lambda: (b := _beat(run_dir, 1)) and b["progress"] >= 8, "rank 1's eighth step")
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        _wait(lambda: (run_dir / stall.REPORT).exists(), "the stall report", timeout=60)
        took = time.monotonic() - stopped
    finally:
        watch.stop()
        for p in ranks:
            p.kill()
            p.wait()
    report = (run_dir / stall.REPORT).read_text()
    lines = report.splitlines()
    assert lines[0].startswith("STALL at ") and "no rank has made progress" in lines[0], report
    silent = next(line for line in lines if line.lstrip().startswith("rank 1 "))
    assert f"pid {ranks[1].pid}" in silent and "SILENT" in silent and "stopped" in silent, report
    assert "samples key1-" in silent, report  # the last samples it trained on
    waiting = next(line for line in lines if line.lstrip().startswith("rank 0 "))
    assert "waits in" in waiting and "all_reduce_stand_in" in waiting, report
    assert "The other ranks wait for rank 1." in report
    assert took < 2 + 30, f"reported {took:.1f} s after the stop"  # the default 120 s: within 2.5 min
    assert (run_dir / stall.STACKS / "rank000.txt").exists() and not (run_dir / stall.STACKS / "rank001.txt").exists()
    logged = client.download_artifacts(run_id, stall.REPORT, str(tmp_path / "dl"))
    assert Path(logged).read_text() == report
    assert [r["rank"] for r in restarted] == ([1] if action == "restart" else [])


def test_the_stall_time_is_ten_step_times_or_the_floor():
    assert stall.stall_s(None, 120) == 120
    assert stall.stall_s(3.0, 120) == 120
    assert stall.stall_s(30.0, 120) == 300
