"""`make demo` as a new user sees it: the terminal, and the commands it prints."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]
# The project's own lines: stage headers and progress, the workers' epoch and progress lines, the
# status table and the summary. Anything else (Ray's, MLflow's) is counted as noise.
OURS = re.compile(r"^(== |sample: |index |shard: |stats: |evaluate: |dataset |stage |index  |shard (train|val) |"
                  r"stats  |val top-1 |   on \d+ val |shards: |checkpoint: |MLflow (run|UI): |took \d+ s$|"
                  r"\(RayTrainWorker pid=\d+\) (rank 0 on |epoch \d+/\d+|checkpoint at epoch ))")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    p = subprocess.run([sys.executable, "-m", "pipelines", "demo", "--out", str(tmp / "out")], cwd=PROJECT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return {"tmp": tmp, "stdout": p.stdout, "stderr": p.stderr, "summary": json.loads(p.stdout.strip().splitlines()[-1])}


def test_the_demo_terminal_is_the_projects_own(demo):
    lines = [l for l in demo["stderr"].splitlines() if l.strip()]
    noise = [l for l in lines if not OURS.match(l)]
    assert len(noise) <= 3, "\n".join(noise)  # Ray's PreemptionWatcher line is one it prints itself
    assert not any("\x1b[" in l for l in demo["stderr"].splitlines() + demo["stdout"].splitlines())
    assert "Traceback" not in demo["stderr"]
    # Progress inside each epoch, from rank 0 only: step/steps, images/s, ETA for the epoch and run.
    progress = [l for l in lines if re.search(r"epoch \d+/8 step \d+/\d+: \d+ images/s, epoch ETA \S+, run ETA \S+$", l)]
    assert len({re.search(r"epoch (\d+)/8", l)[1] for l in progress}) == 8, "\n".join(lines)
    assert len({re.search(r"pid=(\d+)", l)[1] for l in progress}) == 1


def test_the_printed_evaluate_command_works_from_another_folder(demo):
    line = next(l for l in demo["stderr"].splitlines() if l.startswith("evaluate:    "))
    command = line[len("evaluate:    "):]
    elsewhere = demo["tmp"] / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH")}
    p = subprocess.run(command, shell=True, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["run_id"] == demo["summary"]["run_id"] and got["top1"] == demo["summary"]["top1_10crop"]
    assert os.listdir(elsewhere) == []  # no store made where the user stood
