"""submit's checks that need no cluster: they run before anything is sent."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("uri", [None, "sqlite:///mlflow.db"])
def test_a_tracked_stage_without_a_tracking_server_is_refused_before_submission(uri, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    # Nothing listens at this address: the refusal must come before any request to it.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "submit",
            "--address",
            "http://127.0.0.1:9",
            "--",
            "shard",
            "--data",
            "s3://bucket/root",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MLFLOW_TRACKING_URI is" in proc.stderr and "tracking server (http://HOST:PORT)" in proc.stderr
    assert "Cannot reach the Ray Jobs API" not in proc.stderr
    # An untracked stage is not held to it: it goes on to the (missing) cluster.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "submit",
            "--address",
            "http://127.0.0.1:9",
            "--",
            "status",
            "--data",
            "s3://bucket/root",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Cannot reach the Ray Jobs API" in proc.stderr, proc.stderr[-2000:]
