"""Everything real at once: a multi-node Ray (a head with no CPUs, as infra/ray/cluster.yaml's,
and 1-CPU worker nodes joined to it), a SeaweedFS S3 holding the data and the checkpoints, an
MLflow server with its artifacts in that S3. Every stage is submitted from a shell as a Ray
job to the head's dashboard, as docs/cluster.md says.

The nodes hold no static key: their environment names an AWS profile whose
``credential_process`` prints the current key of a file with an ``Expiration`` an hour ahead,
the way an instance profile or a web identity hands out keys that expire. The submitting shell holds
its own keys (and a session token) for its checks; none of them may reach the jobs.

Faults, each injected for real: a worker node SIGKILLed while the shard stage runs on it; the
nodes' key rotated (a new key issued, the file updated, the old key revoked on the server at
once, long before it expires) while training writes checkpoints; and a storm in one elastic
training run: a worker SIGKILLed, the MLflow server down, the S3 server down, a worker
SIGSTOPped, the driver SIGKILLed and rerun, then a node lost for good."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import boto3
import pytest
import torch
from botocore.exceptions import ClientError

from pipelines import meter
from pipelines.sample import SampleConfig
from pipelines.sample import run as make_sample
from pipelines.worker import METRICS

from . import services as sv
from .helpers import RECOVERY, epoch_keys, ledger_entries, ledger_worlds, read_ledger, recovered
from .multinode import CLUSTER_ENV, FAST_TRAIN_RESTART, ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.fault]

BUCKET = sv.BUCKET
ROOT = f"s3://{BUCKET}/root"
TRAIN_SHARDS, VAL_SHARDS = 20, 5  # 80 train / 20 val images, 4 a shard
# What the submitting shell holds beyond the tests' own keys: a token must not travel either.
SESSION_TOKEN = "session-token-that-must-never-leak"
# The nodes' keys live this long after each read, as an instance role's do: no process reads
# them again of its own accord within a test, so a revoked key must be noticed and replaced.
KEY_LIFETIME_S = 3600
# 80 samples make 5 global batches of 16 an epoch. Each checkpoint (weights and momentum,
# ~0.5 GB) takes seconds to reach S3 on 2 cores, so the tests ask only for those they need.
TRAIN_ARGS = [
    "--no-gpu",
    "--epochs",
    "2",
    "--crop",
    "64",
    "--batch-size",
    "16",
    "--init",
    "kaiming",
    "--experiment",
    "multinode-s3",
]
# The training the rotation run and the storm share, so that the rotation run is the storm's
# undisturbed reference: 5 epochs of 5 steps, every checkpoint kept. The reference checkpoints
# only at each epoch's end (the storm's weights are compared with it at one of them): each
# checkpoint is ~0.5 GB written to the S3 server's disk, ~6 s here, where a step takes ~0.5 s.
# The storm adds one every 2 steps (STORM_CHECKPOINTS), the points its faults are injected at.
# 5 epochs leave training to the last of the storm's faults.
LONG_EPOCHS = 5
LONG_RUN = [
    "--data",
    ROOT,
    *TRAIN_ARGS,
    "--epochs",
    str(LONG_EPOCHS),
    "--keep-checkpoints",
    "100",
]
STORM_CHECKPOINTS = ["--checkpoint-every", "2"]


class NodeKeys:
    """The nodes' S3 identity, as a cloud gives it: an AWS profile whose credential_process
    prints the key of the moment (from a file an operator rotates) with an expiry."""

    def __init__(self, folder: Path, lifetime_s: float = KEY_LIFETIME_S):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.keys = folder, []
        self.key_file = folder / "current-key"
        script = folder / "credentials.sh"
        script.write_text(
            f"read id secret < {self.key_file}\n"
            'printf \'{"Version": 1, "AccessKeyId": "%s", "SecretAccessKey": "%s", "Expiration": "%s"}\\n\' '
            f'"$id" "$secret" "$(date -u -d \'+{lifetime_s:.0f} seconds\' +%Y-%m-%dT%H:%M:%SZ)"\n'
        )
        (folder / "config").write_text(f"[profile node]\ncredential_process = sh {script}\n")
        (folder / "credentials").write_text("")  # not ~/.aws/credentials: nothing static anywhere
        self.hand_out(self.make())

    def make(self) -> tuple[str, str]:
        """A new (access key, secret): the server must know it before the file hands it out."""
        key = (f"node-key-{len(self.keys) + 1}", f"node-secret-{secrets.token_hex(12)}")
        self.keys.append(key)
        return key

    def hand_out(self, key: tuple[str, str]) -> None:
        """From now on credential_process prints ``key``."""
        staged = self.folder / ".current-key.new"
        staged.write_text(" ".join(key) + "\n")
        staged.replace(self.key_file)  # credential_process never reads half a key

    def identity(self, keys) -> dict:
        return {
            "name": "nodes",
            "actions": ["Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": a, "secretKey": s} for a, s in keys],
        }

    def env(self) -> dict:
        """A node's environment: the profile, and no static key (None removes a variable)."""
        return {
            "AWS_CONFIG_FILE": str(self.folder / "config"),
            "AWS_PROFILE": "node",
            "AWS_SHARED_CREDENTIALS_FILE": str(self.folder / "credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance metadata service on this machine
            "AWS_ACCESS_KEY_ID": None,
            "AWS_SECRET_ACCESS_KEY": None,
            "AWS_SESSION_TOKEN": None,
            "AWS_ENDPOINT_URL": None,
            "MLFLOW_TRACKING_URI": None,
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode-s3")
    keys = NodeKeys(tmp / "node-keys")
    with sv.seaweedfs(tmp / "s3") as s3:
        s3["server"].identities([keys.identity(keys.keys)])
        # FAST_TRAIN_RESTART on the nodes: a job's driver runs on the head and reads it there.
        with (
            sv.mlflow_server(tmp / "mlflow", s3) as ml,
            ray_cluster(
                tmp / "cluster",
                [{"num_cpus": 1, "resources": {"w0": 1}}, {"num_cpus": 1, "resources": {"w1": 1}}],
                node_env={**keys.env(), **FAST_TRAIN_RESTART},
            ) as cluster,
        ):
            # The submitting shell: the cluster's dashboard, the tracking server, the S3 endpoint
            # and region, and its own keys and session token, which must not travel.
            env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
            env.update(
                CLUSTER_ENV,
                RAY_ADDRESS=cluster.dashboard,
                MLFLOW_TRACKING_URI=ml["uri"],
                AWS_SESSION_TOKEN=SESSION_TOKEN,
                **s3["env"],
            )
            yield {"s3": s3, "mlflow": ml, "cluster": cluster, "env": env, "tmp": tmp, "keys": keys, "outputs": []}


def _client(world, access_key=sv.ACCESS_KEY, secret_key=sv.SECRET_KEY):
    """An S3 client with the tests' own key (made once: the tests poll the bucket), or another."""
    if access_key == sv.ACCESS_KEY and "client" in world:
        return world["client"]
    client = boto3.client(
        "s3",
        endpoint_url=world["s3"]["env"]["AWS_ENDPOINT_URL"],
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
    )
    if access_key == sv.ACCESS_KEY:
        world["client"] = client
    return client


def _wait_key(world, key: tuple[str, str], accepted: bool, timeout: float = 30) -> None:
    """Until the server (which reloads its identities in the background) accepts or refuses ``key``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _client(world, *key).head_bucket(Bucket=BUCKET)
            now = True
        except ClientError as e:
            assert e.response["Error"]["Code"] in ("403", "InvalidAccessKeyId", "AccessDenied"), e
            now = False
        if now == accepted:
            return
        assert time.monotonic() < deadline, f"the server still {'refuses' if accepted else 'accepts'} {key[0]}"
        time.sleep(0.2)


def _keys(world, prefix: str) -> dict[str, dict]:
    pages = _client(world).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def _get(world, key: str) -> bytes | None:
    try:
        return _client(world).get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except ClientError as e:
        if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise


def _submit(world, *stage_args, log: Path | None = None) -> subprocess.Popen:
    """``python -m pipelines submit -- <stage> ...`` from the submitting shell, following the job."""
    out = (log or world["tmp"] / f"{stage_args[0]}-{time.monotonic_ns()}.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "submit", "--", *stage_args],
        env=world["env"],
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = out
    return proc


def _finish(world, proc: subprocess.Popen, timeout: float = 600) -> tuple[str, dict, dict]:
    """(output, the stage's summary, submit's summary) of a submitted job that must succeed."""
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.log.seek(0)
    text = proc.log.read()
    world["outputs"].append(text)
    assert proc.returncode == 0, text[-5000:]
    lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"stage": ')]
    stage = next(s for s in reversed(lines) if s["stage"] != "submit")
    done = next(s for s in reversed(lines) if s["stage"] == "submit")
    assert done["status"] == "SUCCEEDED", done
    return text, stage, done


def _wait_while_running(proc: subprocess.Popen, check, what: str, timeout: float = 400, every: float = 0.2):
    """check()'s first true value, polled while the submitted job runs; fails loudly, with the
    job's output, if the job ends first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if proc.poll() is not None:
            proc.log.seek(0)
            raise AssertionError(f"the job ended before {what}:\n{proc.log.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(every)
    return value


def _run(world, *stage_args, timeout: float = 600):
    return _finish(world, _submit(world, *stage_args), timeout)


def _job(world, submission_id: str) -> str:
    """The Ray job id of a submitted job (the state API lists tasks and actors by it)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(world["cluster"].dashboard).get_job_info(submission_id).job_id


def _state(world, what: str, *filters: str) -> list[dict]:
    """``ray list <what>`` from the GCS, as JSON (no driver needed)."""
    cmd = [
        str(sv.VENV_BIN / "ray"),
        "list",
        what,
        f"--address={world['cluster'].gcs}",
        "--detail",
        "--format=json",
        "--limit=10000",
        *[f"--filter={f}" for f in filters],
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **world["cluster"].env})
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("No resource"):  # what `ray list` prints instead of an empty list
        return []
    return json.loads(out.stdout)


def _shard_tasks(world, job_id: str) -> list[dict]:
    """Every attempt of the shard job's Ray tasks (by job, not by function name: the stage may
    wrap its shard functions in one task function)."""
    return _state(world, "tasks", "type=NORMAL_TASK", f"job_id={job_id}")


def _node_names(world) -> dict[str, str]:
    """Node id -> "head" or the worker's name ("w0", "w1", ...: each worker node carries a
    resource of that name, as all of them share the address 127.0.0.1)."""
    names = {}
    for n in _state(world, "nodes"):
        own = [r for r in n["resources_total"] if re.fullmatch(r"w\d+", r)]
        names[n["node_id"]] = "head" if n["is_head_node"] else own[0]
    return names


def _live_workers(world, count: int = 2) -> None:
    """Top the cluster up to ``count`` live worker nodes (a test before may have killed one),
    as an autoscaler replaces a lost machine."""
    cluster = world["cluster"]
    while sum(w.alive for w in cluster.workers) < count:
        i = len(cluster.workers)
        cluster.add_node(num_cpus=1, resources={f"w{i}": 1})


def _manifest(world, root_key: str, split: str) -> dict | None:
    data = _get(world, f"{root_key}/shards/{split}.json")
    return json.loads(data) if data else None


@pytest.fixture(scope="module")
def stages(world):
    """Sample tarballs in the bucket, then index -> shard -> stats, each submitted as a job."""
    local = world["tmp"] / "sample"
    make_sample(SampleConfig(out=str(local), classes=4, train_per_class=20, val_per_class=5, size=(400, 300)))
    s3 = _client(world)
    for path in (local / "tarballs").iterdir():
        s3.upload_file(str(path), BUCKET, f"src/tarballs/{path.name}")
    _, index, _ = _run(
        world, "index", "--source", f"s3://{BUCKET}/src/tarballs", "--data", ROOT, "--samples-per-shard", "4"
    )
    _, shard, done = _run(world, "shard", "--data", ROOT, "--resize", "72")
    _run(world, "stats", "--data", ROOT)
    return {"index": index, "shard": shard, "shard_job": _job(world, done["job_id"])}


def test_every_stage_is_a_job_whose_work_ran_on_the_worker_nodes_against_s3(world, stages):
    """index, shard and stats, submitted, wrote their outputs to the bucket, and the shard
    tasks ran on the worker nodes (the Ray state API says where each ran)."""
    keys = _keys(world, "root/")
    assert {"root/classes.json", "root/index/train.parquet", "root/stats.json", "root/shards/train.json"} <= set(keys)
    for split, count in (("train", TRAIN_SHARDS), ("val", VAL_SHARDS)):
        manifest = _manifest(world, "root", split)
        assert manifest["complete"] and len(manifest["shards"]) == count
        assert {f"root/shards/{split}/{s['name']}" for s in manifest["shards"]} <= set(keys)
    assert stages["shard"]["written"] == TRAIN_SHARDS + VAL_SHARDS and stages["shard"]["failed"] == 0
    # Which nodes did the work: every shard task (the job's only tasks: one per shard) finished
    # on a worker node, both of them took some, and the head (no CPUs) none.
    names = _node_names(world)
    tasks = _shard_tasks(world, stages["shard_job"])
    finished = [names[t["node_id"]] for t in tasks if t["state"] == "FINISHED"]
    assert len(finished) == TRAIN_SHARDS + VAL_SHARDS, tasks
    assert set(finished) == {"w0", "w1"}, finished
    # The summaries say the same: shards per node, and the index's class tars read as tasks there.
    summary_nodes = {names[n["node"]]: n["shards"] for n in stages["shard"]["nodes"]}
    assert set(summary_nodes) == {"w0", "w1"} and sum(summary_nodes.values()) == TRAIN_SHARDS + VAL_SHARDS
    assert stages["index"]["ray_tasks"] == 4 + 1  # 4 class tars + the val tar
    assert {names[n["node"]] for n in stages["index"]["nodes"]} <= {"w0", "w1"}


def test_a_node_lost_mid_shard_on_s3_leaves_the_shards_byte_identical(world, stages):
    """The shard stage on a second ROOT (the same index); a worker node is SIGKILLed once a
    shard is in the bucket and recorded, with shards still to make. Ray reruns the lost tasks
    on the node left; every shard and sample-index object is byte for byte what the
    undisturbed run (the stages fixture's) wrote."""
    _live_workers(world)
    s3 = _client(world)
    for key in _keys(world, "root/index/") | {"root/classes.json": None}:  # the index, as the index stage wrote it
        s3.copy_object(Bucket=BUCKET, Key="lost/" + key[len("root/") :], CopySource={"Bucket": BUCKET, "Key": key})
    cluster = world["cluster"]
    victim = next(w for w in cluster.workers if w.alive)
    proc = _submit(world, "shard", "--data", f"s3://{BUCKET}/lost", "--resize", "72")
    _wait_while_running(
        proc,
        lambda: (_manifest(world, "lost", "train") or {}).get("shards"),
        "a recorded shard",
        timeout=300,
        every=0.1,
    )
    # A shard task takes a fraction of a second here, and the state API hears of task states up
    # to a second late: the node is killed when its own processes show a shard task running.
    victim.kill_mid_task("counted_task", running=lambda: proc.poll() is None)
    # That the task cut off was run again elsewhere is checked below from the state API.
    _, summary, done = _finish(world, proc)
    assert summary["failed"] == 0 and summary["written"] == TRAIN_SHARDS + VAL_SHARDS

    # The kill hit the stage's work: the node had shard tasks, and some were run again elsewhere.
    names = _node_names(world)
    tasks = _shard_tasks(world, _job(world, done["job_id"]))
    lost_node = f"w{victim.index}"
    assert any(names.get(t["node_id"]) == lost_node for t in tasks), tasks
    assert any(t["attempt_number"] > 0 and t["state"] == "FINISHED" for t in tasks), (
        "no shard task was rerun: the node died idle"
    )

    objects = _keys(world, "lost/shards/")
    for split in ("train", "val"):
        reference, lost = _manifest(world, "root", split), _manifest(world, "lost", split)
        assert [(s["name"], s["checksum"]) for s in lost["shards"]] == [
            (s["name"], s["checksum"]) for s in reference["shards"]
        ]
        for s in reference["shards"]:
            for name in (s["name"], s["index"]):
                assert _get(world, f"lost/shards/{split}/{name}") == _get(world, f"root/shards/{split}/{name}"), name
    assert not [k for k in objects if ".tmp-" in k]


def _latest_result(world, prefix: str) -> dict:
    """The latest checkpoint Ray Train has registered under ``prefix`` (in the bucket), as its
    snapshot names it: {"checkpoint_dir_name", "metrics"}; {} before the first."""
    data = _get(world, f"{prefix}/checkpoint_manager_snapshot.json")
    try:
        return (json.loads(data)["latest_checkpoint_result"] or {}) if data else {}
    except (json.JSONDecodeError, KeyError, TypeError):
        return {}


def _latest_checkpoint(world, prefix: str) -> dict:
    """The metrics of the latest registered checkpoint under ``prefix``."""
    return _latest_result(world, prefix).get("metrics") or {}


def _one_finished_run(world, summary: dict, name: str, epochs: int = 2) -> None:
    """The run is FINISHED on the server, with each epoch's metrics logged once, no second run
    of that name was started, and its model is in the bucket (logged through the server)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=world["mlflow"]["uri"])
    run_id = summary["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key
    same_name = client.search_runs([run.info.experiment_id], f"attributes.run_name = '{name}'")
    assert [r.info.run_id for r in same_name] == [run_id]
    model_id = summary["model_uri"].rsplit("/", 1)[-1]  # models:/m-...
    assert any(model_id in k and k.endswith("/MLmodel") for k in _keys(world, "mlartifacts/")), model_id


def _stamp(world, key: str) -> datetime:
    """Write a small object with the tests' own key and return its LastModified: a moment on the
    store's own clock, at its resolution (whole seconds), to compare other objects' times with."""
    s3 = _client(world)
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"")
    return s3.head_object(Bucket=BUCKET, Key=key)["LastModified"]


@pytest.fixture(scope="module")
def rotation(world, stages):
    """Two Ray Train workers on two nodes, checkpoints to S3 through the nodes' AWS chain.
    Once a checkpoint written with the old key is registered: a new key is issued on the server
    and handed out by the nodes' credential_process, and the old key is revoked at once, an
    hour before it expires (the answer to a leak). Returns what the run printed and summed up,
    the seconds from the revocation to the next checkpoint in the bucket, and that moment on
    the store's clock. A rotation never touches the arithmetic (a refused request is retried
    with the new key; no step is redone: checked below), so this run is also the storm's
    undisturbed reference."""
    _live_workers(world)
    keys = world["keys"]
    prefix = "root/runs/rotation"
    proc = _submit(world, "train", *LONG_RUN, "--workers", "2", "--name", "rotation")
    _wait_while_running(proc, lambda: _latest_checkpoint(world, prefix), "a registered checkpoint")
    old, new = keys.keys[-1], keys.make()
    server = world["s3"]["server"]
    server.identities([keys.identity([old, new])])  # issued: the server knows both keys
    _wait_key(world, new, accepted=True)
    keys.hand_out(new)
    server.identities([keys.identity([new])])  # revoked while every process still holds it
    _wait_key(world, old, accepted=False)  # the old key is really gone
    refused = time.monotonic()
    revoked = _stamp(world, "stamps/revoked")
    registered = _latest_checkpoint(world, prefix)
    assert proc.poll() is None and registered.get("epoch", 0) < LONG_EPOCHS, (
        f"training was at its last epoch's checkpoints when the old key was revoked ({registered}): nothing tested"
    )
    # The event itself: a checkpoint object completed in a later second of the store's clock.
    _wait_while_running(proc, lambda: _state_files_after(world, prefix, revoked), "a checkpoint after the revocation")
    took = time.monotonic() - refused
    text, summary, done = _finish(world, proc)
    assert "resumed after" not in text, text[-3000:]  # never restarted: an undisturbed reference
    return {"text": text, "summary": summary, "done": done, "prefix": prefix, "revoked": revoked, "took": took}


def test_training_on_s3_goes_on_through_a_rotation_of_the_nodes_key(world, rotation, record_property):
    """The rotation run (the fixture above): checkpoints kept landing with the new key (their
    objects are newer than a stamp the store took after the revocation) and the run finished
    with its model, on one worker on each worker node."""
    summary, prefix = rotation["summary"], rotation["prefix"]
    fault = "the nodes' S3 key revoked mid-training: to the next checkpoint in the bucket"
    record_property(RECOVERY + fault, round(rotation["took"], 1))
    assert summary["checkpoint"].startswith(f"s3://{BUCKET}/{prefix}/checkpoint_")
    final = summary["checkpoint"][len(f"s3://{BUCKET}/") :] + "/state.pt"
    after = _state_files_after(world, prefix, rotation["revoked"])
    assert final in after, f"the run's last checkpoint {final} is not newer than the revocation: {after}"
    _one_finished_run(world, summary, "rotation", LONG_EPOCHS)
    # Which nodes trained: one worker on each worker node, none on the head.
    names = _node_names(world)
    workers = _state(world, "actors", "class_name=RayTrainWorker", f"job_id={_job(world, rotation['done']['job_id'])}")
    assert sorted(names[a["node_id"]] for a in workers) == sorted(
        f"w{w.index}" for w in world["cluster"].workers if w.alive
    ), workers
    assert sorted(names[n["node"]] for n in summary["nodes"]) == sorted(names[a["node_id"]] for a in workers)


def _state_files_after(world, prefix: str, moment: datetime) -> list[str]:
    """The checkpoints' state.pt objects under ``prefix`` whose LastModified is after ``moment``."""
    return [k for k, o in _keys(world, prefix + "/").items() if k.endswith("/state.pt") and o["LastModified"] > moment]


# --- a storm of faults in one training run ----------------------------------------------------
# The faults that keep the world size, in an order drawn from the seed (another seed, another
# order: STORM_SEED=... pytest -k storm), then the node lost for good. Each is one method of Storm.
WORLD_KEEPING = ("worker_killed", "tracking_down", "s3_down", "worker_stopped", "driver_killed")
STORM_SEED = int(os.environ.get("STORM_SEED", "20261206"))
TRACKING_OUTAGE_S, S3_OUTAGE_S = 20, 15  # how long each server is down: the fault itself
# The default stall time is 120 s. A checkpoint (~0.5 GB to S3, during which no rank finishes a
# step) took up to 16 s here, and a stall time shorter than that reports checkpoints as stalls.
STALL_AFTER_S = 30


def storm_plan(seed: int) -> list[str]:
    order = list(WORLD_KEEPING)
    random.Random(seed).shuffle(order)
    return [*order, "node_lost"]


class Storm:
    """One `train --workers 1-2` on the two worker nodes (world 2 until a node is lost), and
    the faults it meets, one after the other. Each fault is injected at a checkpoint Ray Train
    registered after the previous fault's recovery; each method returns once the run has
    recovered (the event it waits for is in its docstring) and records how long that took,
    but for the MLflow outage, which runs on into the next fault."""

    PREFIX = "root/runs/storm"

    def __init__(self, world, tmp: Path, record_property):
        self.world, self.record, self.ledger = world, record_property, tmp / "ledger"
        self.args = [
            *("train", *LONG_RUN, *STORM_CHECKPOINTS, "--workers", "1-2", "--name", "storm"),
            *("--ledger", str(self.ledger)),
            *("--max-failures", "10", "--stall-after", str(STALL_AFTER_S), "--stall-action", "restart"),
        ]
        self.proc = _submit(world, *self.args)
        self.killed_output, self.stopped, self.report, self.compared = "", [], "", {}
        self.killed_worker = None  # the pid of the worker SIGKILLed
        self.tracking_back = None  # time.time() when the MLflow server came back
        self.outage = None  # the thread that brings it back

    def wait(self, check, what: str, timeout: float = 400):
        return _wait_while_running(self.proc, check, what, timeout, every=0.5)

    def latest(self) -> dict:
        return _latest_result(self.world, self.PREFIX)

    def at_next_checkpoint(self) -> None:
        seen = self.latest().get("checkpoint_dir_name")
        self.wait(lambda: self.latest().get("checkpoint_dir_name") not in (None, seen), "a checkpoint registered")

    def at_epoch_end(self) -> dict | None:
        """The latest registered checkpoint when it is an epoch's end (mid-epoch ones name a step)."""
        latest = self.latest()
        return latest if "step" not in latest["metrics"] else None

    def pid(self, rank: int) -> int:
        """The process of ``rank`` in the newest worker group, once it has trained a step there
        (the ledger names each group by its start, and each rank writes its own file)."""

        def newest():
            entries = ledger_entries(self.ledger)
            last = max((e["attempt"] for e in entries), default=None)
            return next((e["pid"] for e in entries if e["attempt"] == last and e["rank"] == rank), None)

        return self.wait(newest, f"a step of rank {rank} in the newest worker group")

    def trained_since(self, wall: float) -> bool:
        """A step trained by a worker group started after ``wall`` (time.time()): the ledger
        names each group by its start in milliseconds."""
        return any(e["attempt"] > wall * 1000 for e in ledger_entries(self.ledger))

    def worker_killed(self) -> None:
        """SIGKILL to rank 1 -> a step of the worker group Ray Train restarted."""
        victim, t, wall = self.pid(1), time.monotonic(), time.time()
        os.kill(victim, signal.SIGKILL)
        self.killed_worker = victim
        self.wait(lambda: self.trained_since(wall), "a step of the restarted worker group")
        recovered(self.record, "storm: a training worker SIGKILLed: to its restarted group's next step", t)

    def tracking_down(self) -> None:
        """The MLflow server stopped for 20 s, then started on its port and store. The storm goes
        on meanwhile (the next fault comes at the next checkpoint, the outage or not), so that
        the outage costs the same share of training on a fast machine as on a slow one. Its
        recovery, an epoch's metrics logged after the return, comes at an epoch's end: rather
        than wait for it, ``tracking_recovered`` reads it from the metrics' timestamps at the end."""
        server = self.world["mlflow"]["server"]
        server.stop()

        def back():
            time.sleep(TRACKING_OUTAGE_S)
            server.start()
            self.tracking_back = time.time()

        self.outage = threading.Thread(target=back, name="mlflow-outage")
        self.outage.start()

    def tracking_recovered(self, run_id: str) -> None:
        assert self.tracking_back is not None, "the MLflow server did not start again after its outage"
        history = self.tracking().get_metric_history(run_id, METRICS[0])
        first = min(m.timestamp / 1000 for m in history if m.timestamp / 1000 >= self.tracking_back)
        fault = "storm: MLflow server down 20 s: from its return to the next epoch logged"
        self.record(RECOVERY + fault, round(first - self.tracking_back, 1))

    def s3_down(self) -> None:
        """The S3 server (data, checkpoints, Ray Train's snapshot, the lease) stopped for 15 s,
        then started on its port and data -> a checkpoint object completed after its return."""
        server = self.world["s3"]["server"]
        server.stop()
        time.sleep(S3_OUTAGE_S)
        server.start()
        back, stamp = time.monotonic(), _stamp(self.world, "stamps/s3-back")
        self.wait(lambda: _state_files_after(self.world, self.PREFIX, stamp), "a checkpoint after S3's return")
        recovered(self.record, "storm: S3 server down 15 s: from its return to the next checkpoint in it", back)

    def worker_stopped(self) -> None:
        """SIGSTOP to rank 1 (a hang) -> the stall report names it SILENT -> a step of the worker
        group restarted by --stall-action restart."""
        hung, t, wall = self.pid(1), time.monotonic(), time.time()
        os.kill(hung, signal.SIGSTOP)
        self.stopped.append(hung)
        self.report = self.wait(lambda: self.reported(hung), "a stall report naming the stopped worker", 150)
        recovered(self.record, "storm: a training worker SIGSTOPped: to the stall report", t)
        self.wait(lambda: self.trained_since(wall), "a step of the worker group restarted after the stall")
        recovered(self.record, "storm: a training worker SIGSTOPped: to its restarted group's next step", t)

    def reported(self, pid: int) -> str | None:
        report = (_get(self.world, f"{self.PREFIX}/stall-report.txt") or b"").decode()
        named = [line for line in report.splitlines() if f"(pid {pid} " in line]
        return report if named and "SILENT" in named[-1] else None

    def driver_killed(self) -> None:
        """SIGKILL to the job's driver (the process holding the run's lease) -> the job fails;
        the same command submitted again -> a step of the rerun's worker group."""
        held = json.loads(_get(self.world, f"{self.PREFIX}/.lease.json"))
        assert b"pipelines" in Path(f"/proc/{held['pid']}/cmdline").read_bytes(), held
        t, wall = time.monotonic(), time.time()
        os.kill(held["pid"], signal.SIGKILL)
        self.proc.wait(120)  # submit follows the job: it ends when Ray marks the job failed
        self.proc.log.seek(0)
        self.killed_output = self.proc.log.read()
        assert self.proc.returncode != 0, self.killed_output[-3000:]
        self.proc = _submit(self.world, *self.args)
        # The killed fit's reservation of the workers would hold them for 180 s (Ray Train's
        # AUTOSCALING_REQUESTS_EXPIRE_TIME_S); the rerun cancels it and starts at once.
        self.wait(lambda: self.trained_since(wall), "a step of the rerun, well before the 180 s", timeout=150)
        recovered(self.record, "storm: the training driver SIGKILLed, then rerun: to the rerun's first step", t)

    def node_lost(self) -> None:
        """The node of rank 1 SIGKILLed, for good -> a step on the one worker left. Before it, the
        first epoch-end checkpoint with every other fault behind it is kept to be compared with
        the reference's; the node is lost at a mid-epoch checkpoint after it, so that training
        is left to go on with."""
        cluster = self.world["cluster"]
        self.compared = self.wait(self.at_epoch_end, "an epoch-end checkpoint")
        assert self.compared["metrics"]["epoch"] < LONG_EPOCHS, (
            f"the faults took training to its last epoch's end ({self.compared['metrics']}): no node loss left to test"
        )
        self.wait(lambda: "step" in self.latest()["metrics"], "a mid-epoch checkpoint after it")
        victim = cluster.node_of(self.pid(1))
        assert victim is not None and victim >= 0
        t = time.monotonic()
        cluster.kill_node(victim)
        self.wait(lambda: 1 in ledger_worlds(self.ledger), "a step on the worker left")
        recovered(self.record, "storm: a Ray node SIGKILLed for good: to a step on the worker left", t)

    def run_id(self) -> str:
        exp = self.tracking().get_experiment_by_name("multinode-s3")
        [run] = self.tracking().search_runs([exp.experiment_id], "attributes.run_name = 'storm'")
        return run.info.run_id

    def tracking(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.world["mlflow"]["uri"])

    def clean_up(self) -> None:
        """Whatever happened: no stopped process, no job left running, both servers up."""
        if self.outage is not None:
            self.outage.join()
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        for server in (self.world["s3"]["server"], self.world["mlflow"]["server"]):
            if server.proc is None:
                server.start()


def _state_at(world, prefix: str, result: dict, tmp: Path) -> dict:
    """A registered checkpoint's state, fetched from the bucket and verified against its checksum."""
    from pipelines import checkpoint

    local = tmp / prefix.replace("/", "-") / result["checkpoint_dir_name"]
    local.mkdir(parents=True)
    for name in (checkpoint.STATE_FILE, checkpoint.CHECKSUM_FILE):
        key = f"{prefix}/{result['checkpoint_dir_name']}/{name}"
        _client(world).download_file(BUCKET, key, str(local / name))
    return checkpoint.load(str(local))


def _reference_result(rotation, world, result: dict) -> dict:
    """The reference run's checkpoint at the same epoch's end as ``result``."""
    snapshot = json.loads(_get(world, f"{rotation['prefix']}/checkpoint_manager_snapshot.json"))
    [same] = [r for r in snapshot["checkpoint_results"] if r["metrics"]["epoch"] == result["metrics"]["epoch"]]
    return same


def test_a_storm_of_faults_in_one_training_run_on_s3(world, stages, rotation, tmp_path, record_property):
    """One training run meets, each at a checkpoint registered after the last one's recovery
    (the MLflow outage runs on into the next fault), in an order drawn from a seed: a worker
    SIGKILLed, the MLflow server down 20 s, the S3 server down 15 s, a worker SIGSTOPped (the
    stall report names it), the driver SIGKILLed and the same command rerun; then the node of
    rank 1 lost for good. It ends FINISHED as one
    MLflow run with every metric step once, the ledger holds every sample once per epoch, and
    its first epoch-end checkpoint with every world-keeping fault behind it is bitwise the
    reference's at that epoch's end: weights, momentum and data position."""
    _live_workers(world)
    storm = Storm(world, tmp_path, record_property)
    try:
        for fault in storm_plan(STORM_SEED):
            storm.at_next_checkpoint()
            print(f"storm: {fault} at the checkpoint of {storm.latest()['metrics']}", flush=True)
            getattr(storm, fault)()
        text, summary, _ = _finish(world, storm.proc, timeout=900)
    finally:
        storm.clean_up()
    storm.tracking_recovered(summary["run_id"])

    assert summary["epochs"] == LONG_EPOCHS and summary["checkpoint"].startswith(f"s3://{BUCKET}/{Storm.PREFIX}/")
    _one_finished_run(world, summary, "storm", LONG_EPOCHS)
    assert "took over the lease" in text and "resumed after epoch" in text, text[-3000:]
    final = read_ledger(storm.ledger)
    for epoch in range(1, LONG_EPOCHS + 1):  # 80 samples, 5 global batches of 16: each read once
        keys = epoch_keys(final, epoch)
        assert len(keys) == len(set(keys)) == 80, epoch
    assert {len(ranks) for steps in final.values() for ranks in steps.values()} == {1, 2}
    assert "dealt over 1 workers" in text, text[-3000:]  # the epoch's rest, re-dealt after the node loss
    # The stall report: the stopped rank named with its pid, the other waiting for it; in MLflow too.
    [hung] = storm.stopped
    lines = storm.report.splitlines()
    assert any(line.lstrip().startswith("rank 1 ") and f"pid {hung}" in line and "SILENT" in line for line in lines)
    assert any(line.lstrip().startswith("rank 0 ") and "waits in" in line for line in lines), storm.report
    assert f"rank 1 (pid {hung}): killed" in storm.killed_output + text  # by --stall-action restart
    logged = storm.tracking().download_artifacts(summary["run_id"], "stall-report.txt", str(tmp_path / "dl"))
    assert f"pid {hung}" in Path(logged).read_text()
    # Its cost counts the time of every worker process that ran, the SIGKILLed one's too: within
    # a clock's rewrite interval of what the clock files say now (a process's last seconds).
    clocks = [json.loads(_get(world, key)) for key in _keys(world, f"{Storm.PREFIX}/{meter.METER}/")]
    [victim] = [c for c in clocks if c["pid"] == storm.killed_worker]
    assert victim["seen"] > victim["started"], victim
    spent = sum(c["seen"] - c["started"] for c in clocks) / 3600
    logged = storm.tracking().get_run(summary["run_id"]).data.metrics["cost/worker_hours"]
    assert logged == pytest.approx(spent, abs=len(clocks) * meter.EVERY_S / 3600), (logged, spent, clocks)
    # Bitwise: world 2's checkpoint with every world-keeping fault behind it, the undisturbed run's.
    compared = storm.compared
    got = _state_at(world, Storm.PREFIX, compared, tmp_path)
    want = _state_at(world, rotation["prefix"], _reference_result(rotation, world, compared), tmp_path)
    assert got["epoch"] == want["epoch"] and got["position"] == want["position"], compared
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), (name, compared)
    for i, state in want["optimizer"]["state"].items():  # SGD's momentum: the steps to come alike too
        assert torch.equal(got["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"]), (i, compared)


def test_no_secret_in_the_jobs_info_or_output(world, stages):
    """The Jobs API's info on every job this module submitted (as `ray job list` and the
    dashboard show it) and everything the jobs printed: no key, secret or token of the
    submitting shell or of the nodes."""
    from ray.job_submission import JobSubmissionClient

    listed = subprocess.run(
        [str(sv.VENV_BIN / "ray"), "job", "list", "--address", world["cluster"].dashboard],
        env=world["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "runtime_env" in listed.stdout, listed.stderr[-2000:]
    infos = json.dumps(
        [j.model_dump() for j in JobSubmissionClient(world["cluster"].dashboard).list_jobs()], default=str
    )
    assert len(world["outputs"]) >= 3 and "AWS_ENDPOINT_URL" in listed.stdout
    values = [sv.SECRET_KEY, sv.ACCESS_KEY, SESSION_TOKEN, *[part for key in world["keys"].keys for part in key]]
    for text in (listed.stdout, infos, *world["outputs"]):
        for secret in values:
            assert secret not in text, secret
    # Nor a credential variable at all in the jobs' runtime env: the nodes' own chain is used.
    for text in (listed.stdout, infos):
        for name in (
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_CONFIG_FILE",
        ):
            assert name not in text, name
