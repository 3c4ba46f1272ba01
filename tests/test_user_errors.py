"""What a user's mistake gets: exit 2, one message that names the value and the fix, no
traceback, and nothing left behind (no MLflow run, no mlflow.db, no dataset folder). And the
Ray a stage uses when RAY_ADDRESS is unset, wrong or dead."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .services import VENV_BIN, _port_open, free_port, wait_for

PROJECT = Path(__file__).resolve().parents[1]


def _cli(args, cwd, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(PYTHONPATH=str(PROJECT), **(env_extra or {}))
    t = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "pipelines", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return p, time.monotonic() - t


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A source and a ROOT with an index (so shard's own flags are what is wrong)."""
    from pipelines import index
    from pipelines.config import IndexConfig
    from pipelines.sample import SampleConfig
    from pipelines.sample import run as make_sample

    tmp = tmp_path_factory.mktemp("errors")
    make_sample(SampleConfig(out=str(tmp / "src"), classes=2, train_per_class=4, val_per_class=2))
    index.run(IndexConfig(source=str(tmp / "src" / "folders"), data=str(tmp / "root")))
    return tmp


# (args, what the message must name); {src}, {root}, {tmp} filled in per test
CASES = [
    (["index", "--source", "{tmp}/nope", "--data", "{tmp}/new"], "{tmp}/nope' does not exist"),
    (
        ["index", "--source", "{src}/folders", "--data", "{tmp}/new", "--samples-per-shard", "0"],
        "--samples-per-shard 0",
    ),
    (["index", "--source", "{src}/folders", "--data", "{tmp}/new", "--classes", "0"], "--classes 0"),
    (["index", "--source", "{src}/folders", "--data", "{tmp}/new", "--limit", "-3"], "--limit -3"),
    (["index", "--source", "{src}/folders", "--data", "s3:///x"], "'s3:///x' names no bucket"),
    (["index", "--source", "{src}/folders", "--data", "{tmp}/new", "--layout", "kaggle"], "LOC_synset_mapping.txt"),
    (["index", "--source", "{src}", "--data", "{tmp}/new"], "No ImageNet layout found in"),
    (["index", "--source", "{src}/folders", "--data", "{tmp}/new", "--read-threads", "0"], "--read-threads 0"),
    (["shard", "--data", "{tmp}/new"], "No index in '{tmp}/new'"),
    (["shard", "--data", "{root}", "--resize", "10"], "--resize 10"),
    (["shard", "--data", "{root}", "--quality", "101"], "--quality 101"),
    (["shard", "--data", "{root}", "--split", "tests"], "invalid choice: 'tests'"),
    (["stats", "--data", "{root}"], "training shards in '{root}' are missing"),
    (["prepare", "--source", "{tmp}/nope", "--data", "{tmp}/new"], "{tmp}/nope' does not exist"),
    (["prepare", "--source", "{src}/folders", "--data", "{tmp}/new", "--resize", "10"], "--resize 10"),
    (
        ["prepare", "--source", "{src}/folders", "--data", "{tmp}/new", "--samples-per-shard", "0"],
        "--samples-per-shard 0",
    ),
    (["sample", "--out", "{tmp}/new", "--train-per-class", "0"], "--train-per-class 0"),
    (["sample", "--out", "{tmp}/new", "--size", "100"], "Bad --size '100'"),
    (["sample", "--out", "{tmp}/new", "--classes", "1"], "--classes 1"),
    (["evaluate", "--data", "{root}", "--run-id", "abc123"], "Run abc123 not found: there is no MLflow store"),
    (["evaluate", "--data", "{root}", "--checkpoint", "{tmp}/nope"], "{tmp}/nope' holds no state.pt"),
    (["train", "--data", "{tmp}/new", "--no-gpu"], "train shards in '{tmp}/new' are missing"),
    (["train", "--data", "{root}", "--no-gpu", "--workers", "2-x"], "'2-x'"),
    (["train", "--data", "{root}", "--no-gpu", "--lr", "-1"], "--lr -1.0"),
    (["train", "--data", "{root}", "--no-gpu", "--epochs", "0"], "--epochs 0"),
    (["train", "--data", "{root}", "--no-gpu", "--amp", "fp16"], "--amp fp16 needs a GPU"),
    (["train", "--data", "{root}", "--no-gpu", "--epochs", "2", "--warmup-epochs", "5"], "--warmup-epochs 5"),
]


@pytest.mark.parametrize("args, named", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_a_wrong_invocation_exits_2_naming_the_value_and_leaves_nothing(indexed, tmp_path, args, named):
    fill = {"src": str(indexed / "src"), "root": str(indexed / "root"), "tmp": str(tmp_path)}
    before = set(os.listdir(indexed / "root"))
    p, _ = _cli([a.format(**fill) for a in args], cwd=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert named.format(**fill) in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    # Nothing left behind: no store in the folder the user stood in, no dataset folder, no run.
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    assert set(os.listdir(indexed / "root")) == before


@pytest.mark.parametrize(
    "address, named",
    [
        ("http://127.0.0.1:8265", "is a dashboard (Jobs API) address"),
        ("127.0.0.1:{port}", "Nothing answers at RAY_ADDRESS=127.0.0.1:{port}"),
    ],
)
def test_a_wrong_or_dead_ray_address_is_named_within_seconds(indexed, tmp_path, address, named):
    port = free_port()  # nothing listens there
    p, seconds = _cli(
        ["shard", "--data", str(indexed / "root")],
        cwd=tmp_path,
        env_extra={"RAY_ADDRESS": address.format(port=port)},
        timeout=60,
    )
    assert p.returncode == 2 and named.format(port=port) in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and seconds < 30
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.fault
def test_a_dead_head_left_by_ray_start_is_not_joined(indexed, tmp_path):
    """`ray start --head` records its address for ray.init() to find; kill that head and run a
    stage with RAY_ADDRESS unset: it starts a Ray of its own and finishes (ray.init()'s default
    would try to join the dead head and hang)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # RAY_TMPDIR: Ray's records stay here
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs_port = free_port()
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        record = ray_tmp / "ray" / "ray_current_cluster"
        # The head is up (its GCS answers) and has recorded its address for ray.init() to find.
        wait_for(lambda: record.exists() and _port_open(gcs_port), "the head's address recorded and its GCS up", 120)
        os.killpg(head.pid, signal.SIGKILL)  # the head is gone; its record stays
        head.wait(30)
        assert record.exists()
        # --parallel ray: a job this small would otherwise run in local processes, starting no Ray
        p, _ = _cli(
            ["shard", "--data", str(indexed / "root"), "--resize", "64", "--parallel", "ray"],
            cwd=tmp_path,
            env_extra={"RAY_TMPDIR": str(ray_tmp), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
            timeout=240,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        summary = json.loads(p.stdout.strip().splitlines()[-1])
        assert summary["stage"] == "shard" and summary["nodes"]
        assert not any(n["node"].startswith("local:") for n in summary["nodes"])  # its tasks ran on a Ray node
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_help_is_written_for_people():
    from pipelines import cli

    top = cli.parser().format_help()
    assert "index -> shard -> stats -> train -> evaluate" in top and "exit codes" in top
    for stage in cli.EXAMPLES:
        p, _ = _cli([stage, "--help"], cwd=PROJECT, timeout=60)
        assert p.returncode == 0, p.stderr
        text = " ".join(p.stdout.split())  # argparse wraps lines
        assert f"example: python -m pipelines {stage}" in text, stage
        assert "(default: None)" not in text and not re.search(r"\(default: [^)]*\) \(default:", text), stage
        if stage not in ("sample", "submit", "demo", "predict"):
            assert "--data ROOT" in text, stage


def test_quiet_prints_only_the_json_line(indexed, tmp_path):
    root = tmp_path / "root"
    subprocess.run(["cp", "-r", str(indexed / "root"), str(root)], check=True)
    p, _ = _cli(
        ["--quiet", "shard", "--data", str(root), "--resize", "64"],
        cwd=tmp_path,
        env_extra={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
        timeout=300,
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr[-2000:]
    assert [l for l in p.stdout.splitlines() if l.strip()][-1].startswith('{"stage": "shard"')
    assert len([l for l in p.stdout.splitlines() if l.strip()]) == 1, p.stdout[-2000:]
    p, _ = _cli(["-q", "shard", "--data", str(tmp_path / "none")], cwd=tmp_path)
    assert p.returncode == 2 and "No index in" in p.stderr  # errors still come
