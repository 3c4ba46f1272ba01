"""pipelines.tracking against a real local SQLite MLflow store.

A new SQLite store costs ~4 s of schema migrations on 2 cores, so the tests share one store
per module and keep apart by experiment and run names (each test's own name).
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from pipelines import lineage, tracking
from pipelines.errors import StageError, StrictFailure


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def client(store_dir, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store_dir}/mlflow.db")
    monkeypatch.chdir(store_dir)
    return MlflowClient(tracking.configure())


@pytest.fixture
def exp(request) -> str:
    return f"exp-{request.node.name}"


def all_text(client, run_id) -> str:
    """Every param and tag of a run, keys and values, as one string to search."""
    data = client.get_run(run_id).data
    return json.dumps([data.params, data.tags])


def test_tracking_uri_default_is_sqlite_in_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri() == "http://mlflow:5000"


def test_resume_finds_the_same_run_by_name(client, exp, store_dir):
    first = tracking.start_or_resume_run(exp, "alexnet-a", tags={"pipelines.arch": "alexnet2012"})
    run = client.get_run(first)
    assert run.info.run_name == "alexnet-a" and run.info.status == "RUNNING"
    assert run.data.tags["pipelines.arch"] == "alexnet2012"
    # Local store: artifacts go to an absolute folder next to the database, whatever the cwd.
    location = client.get_experiment(run.info.experiment_id).artifact_location
    assert location == (store_dir / "mlartifacts" / exp).as_uri()

    tracking.end_run(first, "FAILED")
    again = tracking.start_or_resume_run(exp, "alexnet-a")
    assert again == first
    assert client.get_run(first).info.status == "RUNNING"
    assert tracking.start_or_resume_run(exp, "alexnet-b") != first
    assert tracking.start_or_resume_run(exp, "it's") == tracking.start_or_resume_run(exp, "it's")
    with pytest.raises(ValueError, match="Expected one of"):
        tracking.end_run(first, "DONE")


def test_log_metrics_once_never_duplicates_a_step(client, exp):
    run_id = tracking.start_or_resume_run(exp, "metrics")
    for epoch in (0, 1):
        tracking.log_metrics_once(run_id, {"loss": 2.0 - epoch, "top1": 0.1 * epoch}, step=epoch)
    # A restarted worker replays epoch 1 (with different numbers) and goes on to epoch 2.
    replay = [tracking.log_metrics_once(run_id, {"loss": 9.0 - epoch, "note": "x"}, step=epoch) for epoch in (1, 2)]
    assert replay == [{}, {"loss": 7.0}]
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert {m.step: m.value for m in history} == {0: 2.0, 1: 1.0, 2: 7.0}
    assert tracking.logged_steps(run_id, "loss") == [0, 1, 2]
    assert tracking.logged_steps(run_id, "top1") == [0, 1]
    assert tracking.logged_steps(run_id, "note") == []


def test_param_conflicts_are_reported_not_raised(client, exp):
    run_id = tracking.start_or_resume_run(exp, "params")
    assert tracking.log_params(run_id, {"lr": 0.01, "optim": {"momentum": 0.9}, "long": "y" * 7000}) == []
    assert tracking.log_params(run_id, {"lr": 0.01, "long": "y" * 7000}) == []  # same again: no error
    assert tracking.log_params(run_id, {"lr": 0.02, "weight_decay": 5e-4}) == ["lr"]
    params = client.get_run(run_id).data.params
    assert params["lr"] == "0.01" and params["optim.momentum"] == "0.9"
    assert params["weight_decay"] == "0.0005"
    assert len(params["long"]) == tracking.MAX_PARAM_VALUE


def test_log_dataset_records_digest_and_source(client, exp, tmp_path):
    run_id = tracking.start_or_resume_run(exp, "lineage")
    digest = "ab" * 32  # a sha256: longer than MLflow's dataset digest column
    source = str(tmp_path / "shards" / "train.json")
    lineage.log_dataset(run_id, "imagenet-train", digest, source, profile={"samples": 32})
    lineage.log_dataset(run_id, "imagenet-train", digest, source)  # a resumed run logs it again
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "imagenet-train" and digest.startswith(ds.digest)
    assert json.loads(ds.source) == {"uri": source}
    assert json.loads(ds.profile) == {"samples": 32, "digest": digest}
    tags = {t.key: t.value for t in inputs[0].tags}
    assert tags == {"mlflow.data.context": "training", "pipelines.digest": digest}


@dataclasses.dataclass(frozen=True)
class FakeConfig:
    data: str
    resize: int = 256
    keep_aspect: bool = False
    aws_secret_access_key: str | None = None
    endpoint: str = "https://minio:9000"


def test_track_stage_records_the_run(client, exp, store_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # like a Ray worker: another cwd, the same artifact folder
    cfg = FakeConfig(data=str(tmp_path / "root"))

    def fake_shard(c):
        return {
            "stage": "shard",
            "data": c.data,
            "images": 40,
            "seconds": 2.0,
            "images_per_second": 20.0,
            "counts": {"train": 32, "val": 8},
            "skipped": False,
            "input_digest": {"train": "i1", "val": "i2"},
            "output_digest": {"train": "train-digest-1", "val": "val-digest-1"},
        }

    summary = tracking.track_stage("shard", cfg, fake_shard, experiment=exp)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "shard"
    assert run.data.params["resize"] == "256" and run.data.params["keep_aspect"] == "False"
    assert run.data.params["git_sha"] == tracking.environment()["git_sha"]
    assert run.data.params["versions.torch"].startswith("2.")
    assert run.data.metrics == {
        "images": 40,
        "seconds": 2.0,
        "images_per_second": 20.0,
        "counts.train": 32,
        "counts.val": 8,
        "skipped": 0,
    }
    tags = run.data.tags
    assert tags["pipelines.stage"] == "shard" and tags["pipelines.data"] == cfg.data
    # The UI's User, Source and Version columns
    import getpass

    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.name"] == "python -m pipelines shard"
    assert (
        tags["mlflow.source.git.commit"] == tracking.environment()["git_sha"] and tags["mlflow.source.type"] == "LOCAL"
    )
    resumed = client.get_run(tracking.start_or_resume_run(exp, "a-training-run", tags={"pipelines.stage": "train"}))
    assert resumed.data.tags["mlflow.source.name"] == "python -m pipelines train"
    assert tags["pipelines.input_digest.val"] == "i2"
    assert tags["pipelines.output_digest.train"] == "train-digest-1"
    on_disk = store_dir / "mlartifacts" / exp / run.info.run_id / "artifacts" / "summary.json"
    assert json.loads(on_disk.read_text())["counts"] == {"train": 32, "val": 8}

    assert lineage.find_stage_runs("val-digest-1", experiment=exp) == [
        {
            "run_id": run.info.run_id,
            "stage": "shard",
            "status": "FINISHED",
            "experiment_id": run.info.experiment_id,
            "input_digest": {"train": "i1", "val": "i2"},
        }
    ]
    assert [r["run_id"] for r in lineage.find_stage_runs("val-digest-1", experiment=None)] == [run.info.run_id]
    assert lineage.find_stage_runs("val-digest", experiment=exp) == []  # exact, not a substring
    assert lineage.find_stage_runs("val-digest-1", experiment="no-such-experiment") == []


def test_track_stage_marks_failures(client, exp, tmp_path):
    cfg = FakeConfig(data=str(tmp_path))

    def broken(c):
        raise StageError("'x': not a dataset ROOT")

    with pytest.raises(StageError, match="not a dataset ROOT"):
        tracking.track_stage("index", cfg, broken, experiment=exp)
    (run,) = client.search_runs([tracking.experiment_id(exp)])
    assert run.info.status == "FAILED"
    assert "not a dataset ROOT" in run.data.tags["pipelines.error"]

    def strict(c):
        raise StrictFailure(
            "--strict: 2 inputs were rejected", {"stage": "index", "rejected": 2, "output_digest": "out-strict"}
        )

    parent = tracking.start_or_resume_run(exp, "demo")
    with pytest.raises(StrictFailure):
        tracking.track_stage("index", cfg, strict, experiment=exp, parent_run_id=parent)
    (found,) = lineage.find_stage_runs("out-strict", experiment=exp)
    run = client.get_run(found["run_id"])
    assert found["status"] == "FAILED" and run.data.metrics["rejected"] == 2
    assert run.data.tags["mlflow.parentRunId"] == parent


@pytest.mark.fault
def test_a_run_that_cannot_be_opened_stops_the_stage_at_its_next_progress_report(client, exp, tmp_path):
    """The stage's run opens on a thread while the stage works; when it cannot (here the
    experiment is deleted), the stage stops at its next progress report with the fix, and work
    it finished stays. A stage that finishes first gets the same error at its end."""
    from pipelines.common import Progress

    client.delete_experiment(tracking.experiment_id(exp))
    reports = []

    def long_stage(c):
        progress = Progress("shard", 3000, every=0.0)
        for _ in range(3000):  # five minutes of work, reporting every 0.1 s
            time.sleep(0.1)
            progress.update(1, images=250)
            reports.append(time.monotonic())
        return {"stage": "shard"}

    with pytest.raises(StageError, match=f"MLflow experiment '{exp}' is deleted. Restore it"):
        tracking.track_stage("shard", FakeConfig(data=str(tmp_path)), long_stage, experiment=exp)
    assert len(reports) < 3000  # stopped mid-work, not at its end

    with pytest.raises(StageError, match="is deleted"):
        tracking.track_stage("shard", FakeConfig(data=str(tmp_path)), lambda c: {"stage": "shard"}, experiment=exp)


def test_secrets_never_reach_params_or_tags(client, exp, tmp_path):
    secret, password = "wJalrXUtnFEMI-s3cr3t", "hunter2pw"
    cfg = FakeConfig(data=str(tmp_path), aws_secret_access_key=secret, endpoint=f"https://admin:{password}@minio:9000")
    summary = tracking.track_stage("stats", cfg, lambda c: {"stage": "stats", "hf_token": secret}, experiment=exp)
    run_id = summary["mlflow_run_id"]
    tracking.log_params(
        run_id,
        {"storage": {"AWS_SECRET_ACCESS_KEY": secret, "db_password": password, "aws_access_key_id": "AKIAEXAMPLE"}},
    )
    resumed = tracking.start_or_resume_run(exp, "secrets", tags={"api_token": secret})
    for rid in (run_id, resumed):
        text = all_text(client, rid)
        assert secret not in text and password not in text and "AKIAEXAMPLE" not in text
    params = client.get_run(run_id).data.params
    assert params["aws_secret_access_key"] == tracking.MASK
    assert params["storage.AWS_SECRET_ACCESS_KEY"] == tracking.MASK
    assert params["keep_aspect"] == "False"  # "key"-ish words are not secrets
    assert params["endpoint"] == "https://***@minio:9000"
    artifact = client.download_artifacts(run_id, "summary.json", str(tmp_path))
    assert secret not in open(artifact).read()


def test_check_reachable(client, monkeypatch):
    tracking.check_reachable()  # SQLite: nothing to check
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on discard
    t0 = time.monotonic()
    with pytest.raises(StageError, match=r"http://127\.0\.0\.1:9 is not reachable.*unset MLFLOW_TRACKING_URI"):
        tracking.check_reachable()
    assert time.monotonic() - t0 < 10


def test_tags_round_trip(client, exp):
    run_id = tracking.start_or_resume_run(exp, "tags")
    tracking.set_tags(run_id, {"pipelines.checkpoint": "/runs/x/checkpoint_000003", "shard": {"runs": "a,b"}})
    tags = tracking.get_tags(run_id)
    assert tags["pipelines.checkpoint"] == "/runs/x/checkpoint_000003" and tags["shard.runs"] == "a,b"
    assert tags[tracking.RUN_NAME_TAG] == "tags"


def test_environment_and_yaml(client, exp, tmp_path):
    import subprocess

    env = tracking.environment()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tracking.PROJECT_DIR, capture_output=True, text=True
    ).stdout.strip()
    assert env["git_sha"] == (head or "unknown")
    assert isinstance(env["git_dirty"], bool) or env["git_sha"] == "unknown"
    assert set(env["versions"]) == set(tracking.PACKAGES) and env["versions"]["mlflow"].startswith("3.")

    run_id = tracking.start_or_resume_run(exp, "files")
    tracking.log_yaml(run_id, {"lr": np.float32(0.5), "epochs": 90}, "config.yaml")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracking.log_file(run_id, note, "notes")
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "notes"}
    import yaml

    assert yaml.safe_load(open(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))) == {
        "lr": 0.5,
        "epochs": 90,
    }


@pytest.mark.fault
def test_only_an_unreachable_server_is_waited_for(tmp_path, monkeypatch):
    """A refused connection is an outage, retried until the patience runs out; an error from
    the store itself (a run that does not exist) fails at once with its own message."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines import train

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = MlflowClient(tracking_uri="http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(MlflowException) as refused:
        down.log_metric("run", "m", 1.0)
    assert tracking.is_outage(refused.value)
    with pytest.raises(StageError, match="stayed unreachable for 3 s while logging"):
        train._when_tracking_is_back("logging", lambda: down.log_metric("run", "m", 1.0), patience_s=3)

    local = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    calls = []

    def log_to_a_missing_run():
        calls.append(1)
        local.log_metric("0" * 32, "m", 1.0)

    with pytest.raises(MlflowException, match="(?i)run .*not found|no run"):
        train._when_tracking_is_back("logging", log_to_a_missing_run, patience_s=60)
    assert len(calls) == 1  # not retried for the patience's 60 s
    assert not tracking.is_outage(FileNotFoundError("model.pt"))
