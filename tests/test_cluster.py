"""The way a team runs it: data and checkpoints in S3 (SeaweedFS), runs on an MLflow
server whose artifacts go to S3, every stage submitted as a Ray job to a Ray head with token
authentication. All three are real servers on loopback, started here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import boto3
import pytest

from pipelines.sample import SampleConfig
from pipelines.sample import run as make_sample

from . import services as sv
from .helpers import sigint_as_a_terminal_gives_it

pytestmark = [pytest.mark.slow, pytest.mark.fault]
ROOT = f"s3://{sv.BUCKET}/root"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    with (
        sv.seaweedfs(tmp / "s3") as s3,
        sv.mlflow_server(tmp / "mlflow", s3) as ml,
        sv.ray_head(tmp / "ray", node_env=sv.s3_env(s3["port"])) as ray,
    ):
        env = {
            **os.environ,
            **s3["env"],
            "MLFLOW_TRACKING_URI": ml["uri"],
            "RAY_ADDRESS": ray["address"],
            "RAY_AUTH_MODE": "token",
        }
        yield {"s3": s3, "mlflow": ml, "ray": ray, "env": env, "tmp": tmp}


def _s3(stack):
    e = stack["s3"]["env"]
    return boto3.client(
        "s3",
        endpoint_url=e["AWS_ENDPOINT_URL"],
        aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
        region_name=e["AWS_REGION"],
    )


def _keys(stack, prefix: str) -> list[str]:
    pages = _s3(stack).get_paginator("list_objects_v2").paginate(Bucket=sv.BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _pipelines(stack, *args, env=None, timeout=600) -> tuple[subprocess.CompletedProcess, dict | None]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", *args],
        capture_output=True,
        text=True,
        env=env or stack["env"],
        timeout=timeout,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        last = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        last = None
    return proc, last


OUTPUTS: list[str] = []  # everything the jobs printed, searched for secrets below


def _submit(stack, *stage_args, timeout=600) -> subprocess.CompletedProcess:
    proc, summary = _pipelines(stack, "submit", "--", *stage_args, timeout=timeout)
    OUTPUTS.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{stage_args[0]} job failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert summary["status"] == "SUCCEEDED"
    # submit's own lines: one when the job is submitted, one when it ends (Ray's client says nothing)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("submitted ") and ": SUCCEEDED after " in lines[1], "\n".join(lines)
    return proc


@pytest.fixture(scope="module")
def pipeline(stack):
    """Sample data into the bucket, then prepare (index, shard and stats in one process) and
    train, each a Ray job. (Each stage as its own job: tests/test_multinode_s3.py.)"""
    local = stack["tmp"] / "sample"
    make_sample(SampleConfig(out=str(local), classes=4, train_per_class=20, val_per_class=5))
    s3 = _s3(stack)
    for path in (local / "tarballs").iterdir():
        s3.upload_file(str(path), sv.BUCKET, f"src/tarballs/{path.name}")
    source = f"s3://{sv.BUCKET}/src/tarballs"
    _submit(stack, "prepare", "--source", source, "--data", ROOT, "--samples-per-shard", "30", "--resize", "72")
    train = _submit(
        stack,
        "train",
        "--data",
        ROOT,
        "--workers",
        "2",
        "--no-gpu",
        "--epochs",
        "1",  # a job that trains, checkpoints and logs its model to the bucket: one epoch shows it
        "--crop",
        "64",
        "--batch-size",
        "16",
        "--init",
        "kaiming",
        "--name",
        "cluster-run",
        "--experiment",
        "cluster",
    )
    summary = json.loads([l for l in train.stdout.splitlines() if l.startswith('{"stage": "train"')][-1])
    return {"train": summary}


def test_stages_as_ray_jobs_write_everything_to_the_bucket(stack, pipeline):
    keys = _keys(stack, "root/")
    assert {
        "root/classes.json",
        "root/index/train.parquet",
        "root/index/val.parquet",
        "root/stats.json",
        "root/shards/train.json",
        "root/shards/val.json",
    } <= set(keys)
    manifest = json.loads(_s3(stack).get_object(Bucket=sv.BUCKET, Key="root/shards/train.json")["Body"].read())
    assert manifest["complete"] and manifest["samples"] == 80
    assert {f"root/shards/train/{s['name']}" for s in manifest["shards"]} <= set(keys)
    checkpoint = pipeline["train"]["checkpoint"]
    assert checkpoint.startswith(f"s3://{sv.BUCKET}/root/runs/cluster-run/checkpoint_")
    assert checkpoint[len(f"s3://{sv.BUCKET}/") :] + "/state.pt" in keys
    # The model logged through the server's artifact proxy lands in the bucket too.
    assert any(k.startswith("mlartifacts/") and k.endswith("MLmodel") for k in _keys(stack, "mlartifacts/"))
    assert not any(".tmp-" in k for k in keys)


def test_the_server_holds_the_runs_metrics_and_lineage(stack, pipeline):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack["mlflow"]["uri"])
    run = client.get_run(pipeline["train"]["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")] == [1]
    assert run.inputs.dataset_inputs and run.data.tags["pipelines.shard_runs"]
    assert len(run.data.params["git_sha"]) == 40  # the job's copy has no .git: submit passes the SHA
    stage_runs = client.search_runs([client.get_experiment_by_name("preprocessing").experiment_id])
    assert sorted(r.data.tags["pipelines.stage"] for r in stage_runs) == ["index", "pipeline", "shard", "stats"]
    assert run.data.tags["pipelines.shard_runs"] in {r.info.run_id for r in stage_runs}


def test_no_secret_reaches_mlflow(stack, pipeline, tmp_path):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri=stack["mlflow"]["uri"])
    secret = sv.SECRET_KEY
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) >= 4
    for r in runs:
        text = json.dumps([r.data.params, r.data.tags])
        assert secret not in text, r.info.run_id
        dest = tmp_path / r.info.run_id
        download_artifacts(run_id=r.info.run_id, dst_path=str(dest), tracking_uri=stack["mlflow"]["uri"])
        for f in dest.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


def test_no_secret_in_the_jobs_logs_or_the_dataset_files(stack, pipeline):
    assert len(OUTPUTS) == 2 and all(OUTPUTS)
    for text in OUTPUTS:
        assert sv.SECRET_KEY not in text
    # The jobs' info as the Jobs API (and `ray job list`, the dashboard) shows it: the runtime
    # env carries the endpoint and the tracking URI, never a credential.
    listed = subprocess.run(
        [str(sv.VENV_BIN / "ray"), "job", "list", "--address", stack["ray"]["address"]],
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "runtime_env" in listed.stdout, listed.stderr[-2000:]
    assert "AWS_ENDPOINT_URL" in listed.stdout
    for secret in (sv.SECRET_KEY, sv.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        assert secret not in listed.stdout, secret
    s3 = _s3(stack)
    for key in _keys(stack, "root/"):
        if key.endswith((".json", ".jsonl", ".yaml")):
            assert sv.SECRET_KEY.encode() not in s3.get_object(Bucket=sv.BUCKET, Key=key)["Body"].read(), key


def test_wrong_s3_credentials_fail_clearly_and_write_nothing(stack, pipeline):
    env = {**stack["env"], "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc, _ = _pipelines(
        stack, "index", "--source", f"s3://{sv.BUCKET}/src/tarballs", "--data", f"s3://{sv.BUCKET}/denied", env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert "refused the credentials" in proc.stderr and "AWS_SECRET_ACCESS_KEY" in proc.stderr
    assert "not-the-secret" not in proc.stderr
    assert _keys(stack, "denied") == []


@pytest.mark.parametrize("case", ["wrong token", "no token anywhere", "RAY_AUTH_MODE unset"])
def test_a_job_without_the_clusters_token_is_refused(stack, case, tmp_path):
    """Each way of not holding the cluster's token is refused, and the error names what is missing."""
    env = {k: v for k, v in stack["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    if case == "wrong token":
        env["RAY_AUTH_TOKEN"] = "not-the-token"
        hint = "The token in RAY_AUTH_TOKEN is not this cluster's"
    elif case == "no token anywhere":
        env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token here
        hint = "No token found: set RAY_AUTH_TOKEN"
    else:
        env.pop("RAY_AUTH_MODE", None)
        hint = "Set RAY_AUTH_MODE=token"
    proc, _ = _pipelines(stack, "submit", "--", "status", "--data", ROOT, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refused the request" in proc.stderr and hint in proc.stderr, proc.stderr[-2000:]


def test_unreachable_tracking_server_stops_a_stage_before_any_work(stack):
    env = {**stack["env"], "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    proc, _ = _pipelines(
        stack, "index", "--source", f"s3://{sv.BUCKET}/src/tarballs", "--data", f"s3://{sv.BUCKET}/unreached", env=env
    )
    assert proc.returncode == 2 and "http://127.0.0.1:9 is not reachable" in proc.stderr
    assert _keys(stack, "unreached") == []


def test_ctrl_c_on_submit_leaves_the_job_running_and_names_the_commands_that_follow_or_stop_it(stack, tmp_path):
    """Ctrl-C while submit follows a job: exit 130, one line naming the job and the two commands;
    the job goes on, and `submit --follow JOB` sees it to its end with its exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "submit", "--", "sample", "--out", str(tmp_path / "s"), "--classes", "4"],
        env=stack["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_a_terminal_gives_it,
    )
    submitted = proc.stderr.readline()  # submit's first line, once the cluster accepted the job
    assert submitted.startswith("submitted "), submitted
    job_id = submitted.split()[1].rstrip(":")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if "interrupted" in x]
    assert f"job {job_id} goes on" in line and f"submit --follow {job_id}" in line and f"submit --stop {job_id}" in line
    followed, summary = _pipelines(stack, "submit", "--follow", job_id, timeout=300)
    assert followed.returncode == 0 and summary["status"] == "SUCCEEDED", followed.stderr[-3000:]


def test_a_stage_tracked_on_the_server_prints_one_json_line_on_stdout(stack, pipeline):
    """MLflow prints "View run ... at: URL" to stdout when a run on a server ends: the stages
    keep stdout to their one JSON line (a rerun of the index, skipped, still opens and ends a run)."""
    args = ("index", "--source", f"s3://{sv.BUCKET}/src/tarballs", "--data", ROOT, "--samples-per-shard", "30")
    proc, summary = _pipelines(stack, *args)
    assert proc.returncode == 0 and summary["skipped"], proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
