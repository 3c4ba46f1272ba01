"""Faults injected for real: processes killed mid-work, then rerun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipelines import index, shard, stats
from pipelines.config import IndexConfig, ShardConfig, StatsConfig
from pipelines.sample import SampleConfig
from pipelines.sample import run as make_sample
from pipelines.worker import METRICS

from . import services as sv
from .helpers import recovered, sigint_as_a_terminal_gives_it
from .multinode import wait_stopped

pytestmark = [pytest.mark.slow, pytest.mark.fault]


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


def _recorded(manifest: Path) -> int:
    try:
        return len(json.loads(manifest.read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _kill_shard_run_midway(root: Path, env: dict, total: int) -> int:
    """Start the shard CLI and SIGKILL it once it has recorded a shard of its own (more than the
    manifest held when it started) but not all; returns how many are recorded. The count that
    decides is read with the process stopped (it alone writes the manifest), so it is the count
    at the kill."""
    manifest = root / "shards" / "train.json"
    before = _recorded(manifest)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "shard", "--data", str(root)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _recorded(manifest) == before:
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)
    wait_stopped([proc.pid])
    recorded = _recorded(manifest)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert before < recorded < total, f"not killed after real progress: {before} -> {recorded} of {total} recorded"
    return recorded


def test_shard_stage_killed_twice_then_rerun_matches_an_uninterrupted_run(big_index, ray_local, record_property):
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
    t = time.monotonic()
    summary = shard.run(ShardConfig(data=str(root)))
    recovered(record_property, "shard SIGKILLed twice: the rerun, from its start to every shard made", t)
    assert summary["skipped"] >= recorded  # everything recorded before the kill was kept, not redone
    assert summary["written"] + summary["skipped"] == len(want)
    assert _checksums(root) == want  # same bytes as the run nobody killed
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("parallel", ["local", "ray"])
def test_ctrl_c_stops_the_shard_stage_with_one_line_and_exit_130_and_a_rerun_finishes_the_same_bytes(
    big_index, parallel, tmp_path, request, record_property
):
    """Ctrl-C as a terminal sends it, to the whole process group (the stage and its local
    workers), once the run has recorded a shard of its own: no new task starts, the ones in
    flight finish and are recorded, the lease is released, and the stage exits 130 with one line
    saying how far it got and how to go on. The rerun makes the rest: the reference's bytes."""
    reference = _index(big_index, "reference")
    shard.run(ShardConfig(data=str(reference), parallel="local"))
    want = _checksums(reference)
    root = _index(big_index, f"ctrl-c-{parallel}")
    manifest, err = root / "shards" / "train.json", tmp_path / "stderr"
    env = None
    if parallel == "ray":  # the tasks on a running Ray, as a submitted job's are
        env = dict(os.environ, RAY_ADDRESS=request.getfixturevalue("ray_local").get_runtime_context().gcs_address)
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "shard", "--data", str(root), "--parallel", parallel],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # a group of its own, as a terminal's foreground job is
            preexec_fn=sigint_as_a_terminal_gives_it,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _recorded(manifest) == 0:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        t = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        recovered(record_property, f"Ctrl-C to shard ({parallel}): to its exit", t)
    said = err.read_text()
    assert proc.returncode == 130, said[-3000:]
    assert "Traceback" not in said and out == b"", said[-3000:]
    [line] = [x for x in said.splitlines() if "interrupted" in x]
    assert line.startswith("shard: interrupted: ") and "shard tasks done and recorded; what was finished" in line, line
    recorded = _recorded(manifest)
    assert 0 < recorded < sum(1 for n in want if n.startswith("train")), recorded
    assert not (root / ".lease.json").exists()  # released: the rerun needs no wait
    summary = shard.run(ShardConfig(data=str(root), parallel="local"))
    assert summary["skipped"] >= recorded and _checksums(root) == want


def _in_a_terminal(*args: str) -> subprocess.Popen:
    """A stage in a process group of its own with SIGINT at its default, as a terminal's
    foreground job is (Ctrl-C reaches the group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_as_a_terminal_gives_it,
    )


def _until_exists(path: Path, proc: subprocess.Popen, every: float = 0.01, timeout: float = 120) -> None:
    """Poll for ``path`` while ``proc`` runs (it may end first: the caller checks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not path.exists():
        time.sleep(every)


def test_ctrl_c_stops_the_index_stage_with_one_line_and_exit_130_and_a_rerun_writes_the_same_index(
    tmp_path, record_property
):
    """Ctrl-C to the index stage, as a terminal sends it, once it holds ROOT's lease and reads a
    source of 48,000 files: exit 130, one line, no traceback, nothing half-written, the lease
    released; the rerun writes the index an uninterrupted run writes."""
    src = tmp_path / "src"
    make_sample(SampleConfig(out=str(tmp_path / "sample"), classes=4, train_per_class=4, val_per_class=1))
    shutil.copytree(tmp_path / "sample" / "folders", src)
    for folder in (src / "train").iterdir():  # many files, cheaply: links to the class's images
        images = sorted(folder.iterdir())
        for i in range(12_000):
            os.link(images[i % len(images)], folder / f"{folder.name}_{900000 + i}.JPEG")
    root, lease_file = tmp_path / "root", tmp_path / "root" / ".lease.json"
    proc = _in_a_terminal("index", "--source", str(src), "--data", str(root))
    _until_exists(lease_file, proc)
    assert proc.poll() is None, "the index ended before it could be interrupted"
    t = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    recovered(record_property, "Ctrl-C to index: to its exit", t)
    assert proc.returncode == 130 and out == "" and "Traceback" not in err, err[-3000:]
    assert [x for x in err.splitlines() if "interrupted" in x] == [
        "index: interrupted: what was finished is kept; the same command goes on from there."
    ]
    assert not lease_file.exists() and not (root / "index" / "index.json").exists(), (err, lease_file.read_text())
    assert [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []  # nothing half-written
    rerun = index.run(IndexConfig(source=str(src), data=str(root)))
    whole = index.run(IndexConfig(source=str(src), data=str(tmp_path / "whole")))
    assert rerun["train"] == whole["train"] == 48_016 and rerun["output_digest"] == whole["output_digest"]


def test_ctrl_c_stops_the_stats_stage_with_one_line_and_exit_130_and_a_rerun_writes_the_same_stats(
    big_index, tmp_path, record_property
):
    """Ctrl-C to the stats stage (the stage and its local workers, as a terminal sends it) while
    it reads the shards: it is frozen once it holds ROOT's lease, found still at work (no stats
    written), and interrupted as it thaws. Exit 130, one line, no traceback, no stats.json, the
    lease released; the rerun writes the stats an uninterrupted run writes."""
    reference = _index(big_index, "reference")
    shard.run(ShardConfig(data=str(reference), parallel="local"))
    root = tmp_path / "root"
    shutil.copytree(reference, root, ignore=shutil.ignore_patterns("stats.json", ".lease.json*"))
    lease_file, out_file = root / ".lease.json", root / "stats.json"
    proc = _in_a_terminal("stats", "--data", str(root), "--parallel", "local")
    _until_exists(lease_file, proc, every=0.001)
    os.killpg(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None and not out_file.exists(), "the stats ended before they could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # delivered as the group thaws
    t = time.monotonic()
    os.killpg(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    recovered(record_property, "Ctrl-C to stats: to its exit", t)
    assert proc.returncode == 130 and out == "" and "Traceback" not in err, err[-3000:]
    assert [x for x in err.splitlines() if "interrupted" in x] == [
        "stats: interrupted: what was finished is kept; the same command goes on from there."
    ]
    assert not lease_file.exists() and not out_file.exists(), err
    rerun = stats.run(StatsConfig(data=str(root), parallel="local"))
    whole = stats.run(StatsConfig(data=str(reference), parallel="local"))
    assert rerun["output_digest"] == whole["output_digest"] and rerun["images"] == whole["images"] > 0


def test_a_shard_run_paused_past_the_stale_time_loses_its_lease_and_writes_nothing_more(
    big_index, tmp_path, record_property
):
    """Run A (its whole process group) SIGSTOPped once it has recorded a shard; once its lease is
    stale by its own last heartbeat, run B takes it over and makes every shard. A is resumed: it
    finds its lease taken, stops without writing a manifest or deleting a file, and exits 2
    naming B; B's manifests and shards are left exactly as B made them."""
    reference = _index(big_index, "reference")
    shard.run(ShardConfig(data=str(reference), parallel="local"))
    want = _checksums(reference)
    root = _index(big_index, "paused")
    env = dict(os.environ, PIPELINES_LEASE_STALE_S="3")
    manifest, lease_file = root / "shards" / "train.json", root / ".lease.json"
    a = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "shard", "--data", str(root), "--parallel", "local"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and a.poll() is None and _recorded(manifest) == 0:
            time.sleep(0.02)
        os.killpg(a.pid, signal.SIGSTOP)
        assert a.poll() is None and _recorded(manifest) > 0, "A ended before it could be paused"
        beat = json.loads(lease_file.read_text())["heartbeat_s"]
        while time.time() - beat <= 3:  # until A's lease is stale by its own last heartbeat
            time.sleep(0.05)
        b = subprocess.run(
            [sys.executable, "-m", "pipelines", "shard", "--data", str(root), "--parallel", "local"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert b.returncode == 0 and "took over the lease of a 'shard' run" in b.stderr, b.stderr[-3000:]
        made = {p: p.read_bytes() for p in (root / "shards").rglob("*") if p.is_file()}
    finally:
        resumed = time.monotonic()
        os.killpg(a.pid, signal.SIGCONT)
    _, a_err = a.communicate(timeout=120)
    recovered(record_property, "shard paused past its lease's stale time: from its resume to its stop", resumed)
    a_err = a_err.decode()
    assert a.returncode == 2 and "Traceback" not in a_err, a_err[-3000:]
    assert "lost its lease on" in a_err and "stopped before writing anything more" in a_err, a_err[-3000:]
    assert _checksums(root) == want
    after = {p: p.read_bytes() for p in (root / "shards").rglob("*") if p.is_file() and ".tmp-" not in p.name}
    assert after == {p: v for p, v in made.items() if ".tmp-" not in p.name}  # B's files, as B left them


def test_a_second_shard_run_on_the_same_root_is_refused_while_the_first_runs(big_index, ray_local):
    """Two writers on one ROOT would delete each other's temp files: the second stops at once,
    naming the first, and the first finishes untouched."""
    root = _index(big_index, "two-writers")
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "shard", "--data", str(root)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        manifest = root / "shards" / "train.json"
        _wait(
            lambda: manifest.exists() and json.loads(manifest.read_text())["shards"],
            "the first run's progress",
            120,
            every=0.05,
        )
        # Paused mid-run (a slow run, as on ImageNet), so the second surely starts while it works.
        first.send_signal(signal.SIGSTOP)
        try:
            assert first.poll() is None, "the first run finished before the second started"
            second = subprocess.run(
                [sys.executable, "-m", "pipelines", "shard", "--data", str(root)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"Another 'shard' run holds '{root}'" in second.stderr and f"process {first.pid}" in second.stderr
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert json.loads(manifest.read_text())["complete"] and not (root / ".lease.json").exists()


def _wait(check, what: str, timeout: float = 600, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_s3_outage_during_shard_upload_then_rerun_completes(big_index, ray_local, tmp_path, record_property):
    """SeaweedFS is killed while shards upload and comes back: the stage finishes after retries
    or stops with a clear error; either way a rerun completes with the reference bytes."""
    reference = big_index / "reference"
    if not (reference / "shards" / "train.json").exists():
        _index(big_index, "reference")
        shard.run(ShardConfig(data=str(reference)))
    want = _checksums(reference)

    s3 = sv.SeaweedFS(tmp_path / "s3")
    s3.start()
    try:
        env = dict(os.environ, **s3.env, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
        root = f"s3://{sv.BUCKET}/outage"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines",
                "index",
                "--source",
                str(big_index / "src" / "folders"),
                "--data",
                root,
                "--samples-per-shard",
                "4",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines", "shard", "--data", root],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=s3.env["AWS_ENDPOINT_URL"],
            aws_access_key_id=sv.ACCESS_KEY,
            aws_secret_access_key=sv.SECRET_KEY,
            region_name="us-east-1",
        )

        def first_shard():
            assert proc.poll() is None, f"the shard stage ended before its first upload:\n{proc.stderr.read()[-3000:]}"
            return client.list_objects_v2(Bucket=sv.BUCKET, Prefix="outage/shards/train/").get("KeyCount", 0) >= 1

        _wait(first_shard, "the first shard in S3", 120, every=0.05)
        assert proc.poll() is None, "the shard stage finished before the outage began"
        s3.stop()  # the store goes away mid-upload...
        time.sleep(5)
        s3.start()  # ...and comes back with its data
        back = time.monotonic()
        out, err = proc.communicate(timeout=600)
        how = "finished" if proc.returncode == 0 else "stopped with an error"
        recovered(record_property, f"S3 stopped for 5 s mid-shard: from its return until the stage {how}", back)
        if proc.returncode != 0:  # gave up during the outage: it must say why, plainly
            assert proc.returncode == 2 and "S3" in err, err[-3000:]
        # Before any rerun: every shard object under its final name is whole, byte for byte the
        # reference (an interrupted upload never became an object), whichever way the run ended.
        ref_dir = reference / "shards"
        listed = client.list_objects_v2(Bucket=sv.BUCKET, Prefix="outage/shards/").get("Contents", [])
        tars = [o["Key"] for o in listed if o["Key"].endswith(".tar")]
        assert tars, "no shard reached S3 before or after the outage"
        for key in tars:
            split, name = key.split("/")[-2:]
            body = client.get_object(Bucket=sv.BUCKET, Key=key)["Body"].read()
            assert body == (ref_dir / split / name).read_bytes(), f"{key} is not the whole shard"
        rerun = subprocess.run(
            [sys.executable, "-m", "pipelines", "shard", "--data", root],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        got = {}
        for split in ("train", "val"):
            m = json.loads(client.get_object(Bucket=sv.BUCKET, Key=f"outage/shards/{split}.json")["Body"].read())
            assert m["complete"]
            got.update({s["name"]: s["checksum"] for s in m["shards"]})
            for s in m["shards"]:
                head = client.head_object(Bucket=sv.BUCKET, Key=f"outage/shards/{split}/{s['name']}")
                assert head["ContentLength"] == s["bytes"]
        assert got == want
    finally:
        s3.stop()


# --- the epoch plan under faults: one train shard, mid-epoch checkpoints, the sample ledger ------
# With the throughput recipe's step-wise parts on: the lr scaled to twice --lr (batch 16 over a
# reference of 8) and warmed up over 2 epochs, so the kill in epoch 2 lands mid-warm-up, and the
# gradients all-reduced in bf16. The resumed run must still match the uninterrupted one bit for bit.
# Only the interrupted run checkpoints mid-epoch (MID_EPOCH): the reference needs no checkpoint
# but its last, and each is ~0.5 GB written to a disk of ~100 MB/s here, where a step takes ~0.5 s.
ONE_SHARD = [
    "--workers",
    "2",
    "--no-gpu",
    "--loader-workers",
    "2",
    "--epochs",
    "2",
    "--crop",
    "64",
    "--batch-size",
    "16",
    "--init",
    "kaiming",
    "--experiment",
    "plan",
    "--lr-scaling",
    "linear",
    "--lr-reference-batch",
    "8",
    "--warmup-epochs",
    "2",
    "--grad-compression",
    "bf16",
]
MID_EPOCH = ["--checkpoint-every", "4"]  # of 7 steps an epoch


@pytest.fixture(scope="module")
def uninterrupted(one_shard, module_runs):
    """The reference: 2 workers x 2 loader workers on one shard, never interrupted, with a ledger."""
    from pipelines import cli, train

    tmp = module_runs / "uninterrupted"
    tmp.mkdir()
    # The interrupted run's flags (but its mid-epoch checkpoints), parsed as the CLI does, run here.
    args = vars(
        cli.parser().parse_args(
            [
                "train",
                "--data",
                one_shard,
                *ONE_SHARD,
                "--name",
                "uninterrupted",
                "--storage",
                str(tmp / "runs"),
                "--ledger",
                str(tmp / "ledger"),
            ]
        )
    )
    cfg = args.pop("config")(**{k: v for k, v in args.items() if k not in ("module", "command", "quiet")})
    return {**train.run(cfg), "ledger": tmp / "ledger"}


def test_one_shard_over_two_workers_reads_every_sample_once_per_epoch(uninterrupted):
    """Fewer shards than workers: both ranks train 7 steps of 8 per epoch (120 = 7 * 16 + 8),
    each from 2 loader workers, and the ledger holds every sample once an epoch but 8."""
    from .helpers import epoch_keys, read_ledger

    ledger = read_ledger(uninterrupted["ledger"])
    assert uninterrupted["epochs"] == 2 and uninterrupted["left_out_per_epoch"] == 8
    for epoch in (1, 2):
        assert sorted(ledger[epoch]) == list(range(7))
        assert all(
            sorted(ranks) == [0, 1] and all(len(k) == 8 for k in ranks.values()) for ranks in ledger[epoch].values()
        )
        keys = epoch_keys(ledger, epoch)
        assert len(keys) == len(set(keys)) == 112
    assert len({k for e in (1, 2) for k in epoch_keys(ledger, e)}) > 112  # a different 8 each epoch


def test_the_warmup_raises_the_lr_step_by_step_to_the_scaled_peak(uninterrupted):
    """lr (the rate of each epoch's last step) from 0.01 (the reference batch's) toward 0.02
    (--lr x 16 / 8) over 2 epochs of 7 steps: 0.01 + 0.01 x 7/14 after epoch 1, the peak after
    epoch 2. An epoch-wise warm-up would log 0.01 or 0.015 for epoch 1."""
    history = MlflowClient().get_metric_history(uninterrupted["run_id"], "lr")
    assert [(m.step, round(m.value, 9)) for m in history] == [(1, 0.015), (2, 0.02)]


def test_ctrl_c_to_the_driver_mid_epoch_then_a_rerun_resumes_at_the_step_bitwise(
    one_shard, uninterrupted, module_runs, record_property
):
    """Ctrl-C to the driver once a mid-epoch checkpoint of epoch 1 is registered (mid-warm-up):
    exit 130, one line, the run KILLED. The rerun of the same --name resumes at that step and
    ends with the uninterrupted run's weights, bit for bit, the same ledger, and one MLflow run
    with every epoch logged once. (A SIGKILLed driver and its rerun: the storm, in
    tests/test_multinode_s3.py.)"""
    from pipelines import checkpoint

    from .helpers import read_ledger

    tmp_path = module_runs / "interrupted"
    tmp_path.mkdir()
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "train",
        "--data",
        one_shard,
        *ONE_SHARD,
        *MID_EPOCH,
        "--name",
        "interrupted",
        "--storage",
        str(tmp_path / "runs"),
        "--ledger",
        str(tmp_path / "ledger"),
    ]
    env = dict(os.environ, RAY_ADDRESS=os.environ.get("RAY_ADDRESS") or _gcs())
    snap = tmp_path / "runs" / "interrupted" / "checkpoint_manager_snapshot.json"

    def mid_epoch_one() -> bool:
        try:
            latest = json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"] or {}
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return False
        return latest.get("epoch") == 1 and "step" in latest

    first = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_a_terminal_gives_it,
    )
    try:
        _wait(mid_epoch_one, "a mid-epoch checkpoint of epoch 1 registered", every=0.05)
        t = time.monotonic()
        first.send_signal(signal.SIGINT)  # Ctrl-C: the driver's process (the workers are the cluster's)
        out, err = first.communicate(timeout=180)
        recovered(record_property, "Ctrl-C to train: to its exit", t)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130 and "Traceback" not in err, err[-4000:]
    assert [x for x in err.splitlines() if "interrupted" in x] == [
        "train: interrupted: the run keeps its checkpoints; the same command (same --name) resumes from the last one."
    ], err[-4000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("plan").experiment_id
    [run] = client.search_runs([experiment], "attributes.run_name = 'interrupted'")
    assert run.info.status == "KILLED"

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    resumed = [line for line in (rerun.stderr + rerun.stdout).splitlines() if "resumed after epoch" in line]
    assert resumed and all("after epoch 0, at step" in line and "of epoch 1" in line for line in resumed), resumed
    assert "gradients all-reduced in bf16" in rerun.stderr + rerun.stdout  # the recipe was on
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])

    got, want = checkpoint.load(summary["checkpoint"]), checkpoint.load(uninterrupted["checkpoint"])
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert read_ledger(tmp_path / "ledger") == read_ledger(uninterrupted["ledger"])
    [run] = client.search_runs([experiment], "attributes.run_name = 'interrupted'")
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]
    for key in METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key


def _gcs() -> str:
    import ray

    return ray.get_runtime_context().gcs_address
