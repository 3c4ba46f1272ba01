"""Sweeps end to end: Ray Tune over the training stage on the tests' local Ray, tracked on a real
MLflow server that only the submitting shell names, killed mid-trial and rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import sweep
from pipelines.config import SweepConfig
from pipelines.errors import StageError

from . import services as sv
from .helpers import RECOVERY

# A 2-D grid of 4 trials, 2 at a time, 2 epochs each, on 1 CPU worker each. Tune deals the grid
# with --lr fastest: 0.01, 0.02, 0.01, 0.02. lr 0.02 collapses to one class here (val_top1 0.25
# after an epoch) while lr 0.01 learns (0.46, then 0.96), so ASHA (keep the better half at each
# rung of epochs, here epoch 1) stops a 0.02 trial whichever of the first two reaches epoch 1
# first: the second to arrive trails the first, or else the later 0.02 trial trails the two
# recorded before it. A 0.01 trial is never stopped: nothing recorded beats it. The kill loses
# ASHA's records; the rerun holds because a resumed trial reports its finished epochs again.
EPOCHS = 2
GRID = ["--lr", "0.01,0.02", "--weight-decay", "0.0005,0", "--max-concurrent", "2"]
TRAIN = [
    "--epochs",
    str(EPOCHS),
    "--workers",
    "1",
    "--batch-size",
    "16",
    "--crop",
    "64",
    "--init",
    "kaiming",
    "--no-gpu",
]
NAME, EXPERIMENT, MODEL = "grid", "sweeps", "sweep-best"


def _cmd(dataset: str, runs: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines",
        "sweep",
        "--data",
        dataset,
        "--name",
        NAME,
        *GRID,
        *TRAIN,
        "--experiment",
        EXPERIMENT,
        "--storage",
        str(runs),
        "--register",
        MODEL,
        "--price-per-hour",
        "3.0",
    ]


def _wait(check, what: str, timeout: float = 600):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _epoch_one_checkpointed(runs: Path):
    """Trial 00 (lr 0.01, which ASHA never stops, so the rerun must resume it) once its latest
    registered checkpoint is its first epoch's end."""
    snap = runs / f"{NAME}-trial-00" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"] or {}
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return snap.parent.name if latest.get("epoch") == 1 else None


def _ended(runs: Path, trial: str) -> bool:
    """The killed trial's training driver has exited (its lease names its process), or let go of
    its lease on its way out (the file is gone)."""
    try:
        held = json.loads((runs / trial / ".lease.json").read_text())
    except FileNotFoundError:
        return True
    return not Path(f"/proc/{held['pid']}").exists()


@pytest.fixture(scope="module")
def swept(dataset, ray_local, tmp_path_factory, module_runs):
    """The sweep, SIGKILLed once a trial has checkpointed its first epoch, then rerun to its end,
    then rerun again; MLflow is a server that only the sweep's own environment names."""
    import ray

    runs = module_runs / "runs"
    with sv.mlflow_server(tmp_path_factory.mktemp("sweep-mlflow")) as server:
        # The tests' local Ray (its nodes' environment names the session's SQLite store) is the
        # cluster; only this command's shell names the server.
        env = dict(os.environ, MLFLOW_TRACKING_URI=server["uri"], RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        first = subprocess.Popen(
            _cmd(dataset, runs), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            killed = _wait(lambda: _epoch_one_checkpointed(runs), "trial 00's first epoch checkpointed")
            first.send_signal(signal.SIGKILL)
            first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
        _wait(lambda: _ended(runs, killed), f"{killed}'s training driver to end with the sweep")
        before = MlflowClient(server["uri"]).search_runs(
            [MlflowClient(server["uri"]).get_experiment_by_name(EXPERIMENT).experiment_id],
            f"attributes.run_name = '{killed}'",
        )
        import time

        t = time.monotonic()
        rerun = subprocess.run(_cmd(dataset, runs), env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-4000:]
        again = subprocess.run(_cmd(dataset, runs), env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-4000:]
        other = [x if x != "0.01,0.02" else "0.01,0.03" for x in _cmd(dataset, runs)]
        another = subprocess.run(other, env=env, capture_output=True, text=True, timeout=300)
        yield {
            "server": server["uri"],
            "killed": killed,
            "killed_run": before[0].info.run_id,
            "rerun": rerun,
            "rerun_s": time.monotonic() - t,
            "summary": json.loads(rerun.stdout.strip().splitlines()[-1]),
            "again": json.loads(again.stdout.strip().splitlines()[-1]),
            "another": another,
            "runs": runs,
        }


def _tree(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    every = client.search_runs([experiment])
    [parent] = [r for r in every if r.info.run_name == NAME]
    return client, parent, [r for r in every if r is not parent]


def test_a_sweep_is_one_parent_run_with_a_nested_run_per_trial_and_asha_stops_one(swept):
    """One parent, four trials nested under it with the grid's values as params, each a FINISHED
    run with its decision; at least one stopped by ASHA before the last epoch; nothing else in
    the experiment, and nothing in the store the cluster's own environment names."""
    client, parent, trials = _tree(swept["server"])
    assert parent.info.status == "FINISHED" and parent.data.tags["pipelines.stage"] == "sweep"
    assert sorted(r.info.run_name for r in trials) == [f"{NAME}-trial-{i:02d}" for i in range(4)]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert sorted((r.data.params["lr"], r.data.params["weight_decay"]) for r in trials) == [
        ("0.01", "0.0"),
        ("0.01", "0.0005"),
        ("0.02", "0.0"),
        ("0.02", "0.0005"),
    ]
    assert all(r.info.status == "FINISHED" for r in trials), [(r.info.run_name, r.info.status) for r in trials]
    decisions = {r.info.run_name: r.data.tags[sweep.DECISION] for r in trials}
    stopped = [d for d in decisions.values() if d.startswith("stopped at epoch") and d.endswith("by ASHA")]
    assert stopped and all(int(d.split()[3]) < EPOCHS for d in stopped), decisions
    assert any(d == f"finished at epoch {EPOCHS}" for d in decisions.values()), decisions
    # The cluster's nodes name the session's own store: no run of the sweep went there.
    local = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_experiment_by_name(EXPERIMENT)
    assert local is None
    summary = swept["summary"]
    assert summary["run_id"] == parent.info.run_id and summary["trials_stopped"] == len(stopped)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.json", "val_top1_by_epoch.png", "search_space.json"} <= artifacts
    assert parent.data.params["search.lr"] == "0.01,0.02" and parent.data.params["trials"] == "4"


def test_the_best_finished_trial_is_registered_with_its_lineage_to_the_sweep(swept):
    client, parent, trials = _tree(swept["server"])
    finished = [r for r in trials if r.data.tags[sweep.DECISION].startswith("finished")]
    best = {r.info.run_id: max(m.value for m in client.get_metric_history(r.info.run_id, "val_top1")) for r in finished}
    version = client.get_model_version_by_alias(MODEL, "champion")
    # the finished trial with the best val_top1 (of equals, the first trial)
    assert best[version.run_id] == max(best.values()), (version.run_id, best)
    assert version.tags["pipelines.sweep_run_id"] == parent.info.run_id and version.tags["pipelines.sweep"] == NAME
    assert swept["summary"]["model_uri"] == f"models:/{MODEL}@champion"
    assert parent.data.tags["pipelines.sweep.best_run_id"] == version.run_id == swept["summary"]["best"]["run_id"]


def test_a_sweep_killed_mid_trial_resumes_that_trial_from_its_checkpoint(swept, record_property):
    """The trial whose first epoch was checkpointed when the sweep was SIGKILLed resumes after
    epoch 1 in the rerun, in the same MLflow run, every epoch logged once; it reports epoch 1
    again, for the rerun's ASHA scheduler, which starts knowing nothing."""
    record_property(RECOVERY + "sweep SIGKILLed mid-trial: the rerun, to the sweep's end", round(swept["rerun_s"], 1))
    client, _, trials = _tree(swept["server"])
    [run] = [r for r in trials if r.info.run_name == swept["killed"]]
    assert run.info.run_id == swept["killed_run"]
    err = swept["rerun"].stderr
    assert f"sweep {NAME}: resuming its trials" in err
    resumed = [line for line in err.splitlines() if "resumed after epoch 1" in line]
    assert resumed, err[-4000:]
    # its epoch 1 heard again by the restarted ASHA scheduler, which ranks it at that rung
    assert f"trial {swept['killed'][-2:]} epoch 1/{EPOCHS} (before the restart): val_top1" in err, err[-4000:]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
    assert steps == sorted(set(steps)) and steps[0] == 1, steps


def test_rerunning_a_finished_sweep_runs_nothing_and_another_space_under_its_name_is_refused(swept):
    again = swept["again"]
    assert again["skipped"] is True and again["run_id"] == swept["summary"]["run_id"]
    assert again["trials"] == swept["summary"]["trials"]
    another = swept["another"]
    assert another.returncode == 2 and "Traceback" not in another.stderr, another.stderr[-3000:]
    assert f"error: Sweep '{NAME}' was started with other search.lr" in another.stderr
    _, parent, trials = _tree(swept["server"])
    assert len(trials) == 4 and parent.info.status == "FINISHED" and parent.data.params["search.lr"] == "0.01,0.02"


def test_cost_is_on_every_trial_and_summed_on_the_parent(swept):
    """cost/worker_hours (and cost/usd at the given price) on every trial run, stopped ones too,
    and their sum on the sweep's run; the killed trial counts the time of both its drivers."""
    client, parent, trials = _tree(swept["server"])
    hours = {r.info.run_name: r.data.metrics["cost/worker_hours"] for r in trials}
    assert all(h > 0 for h in hours.values()), hours
    assert all(r.data.metrics["cost/usd"] == pytest.approx(3.0 * r.data.metrics["cost/worker_hours"]) for r in trials)
    assert parent.data.metrics["cost/worker_hours"] == pytest.approx(sum(hours.values()), rel=1e-9)
    assert parent.data.metrics["cost/gpu_hours"] == 0
    clocks = list((swept["runs"] / swept["killed"] / "meter").glob("*.json"))
    assert len(clocks) >= 2, clocks  # the worker killed with the sweep, and the one that finished


# --- before any work ---------------------------------------------------------------------------
def test_parse_space_reads_grids_and_draws_and_names_the_flag_of_a_bad_one():
    assert sweep.parse_space("lr", "0.005,0.01", float) == ("grid", [0.005, 0.01])
    assert sweep.parse_space("lr", "log:0.001:0.05", float) == ("log", 0.001, 0.05)
    assert sweep.parse_space("batch-size", "uniform:64:256", int) == ("uniform", 64, 256)
    assert sweep.parse_space("schedule", "plateau,cosine", str) == ("grid", ["plateau", "cosine"])
    for flag, text, kind in (("lr", "log:0.05:0.001", float), ("lr", "fast", float), ("schedule", "log:1:2", str)):
        with pytest.raises(StageError, match=f"--{flag} {text}"):
            sweep.parse_space(flag, text, kind)


@pytest.mark.parametrize(
    "flags, said",
    [
        ({}, "Nothing to search"),
        ({"lr": "log:0.001:0.05"}, "say how many trials with --trials N"),
        ({"lr": "0.01,0.02", "trials": 3}, "use a multiple of 2"),
        ({"crop": "64,96"}, "--crop 96 is larger than the 72 px shards"),
        ({"lr": "0.01,0.02", "grace_epochs": 5}, "--grace-epochs 5: from 1 to --epochs"),
        ({"batch_size": "8,16", "train": {"batch_per_worker": 8}}, "leave out --batch-per-worker"),
    ],
)
def test_a_bad_sweep_is_refused_before_any_work(dataset, flags, said):
    train = {"epochs": 2, "crop": 64, "batch_size": 16, **flags.pop("train", {})}
    with pytest.raises(StageError, match=said):
        sweep._check(SweepConfig(data=dataset, name="refused", train=train, **flags))


def test_status_names_the_sweep_its_trials_and_the_best(swept):
    """What `status` lists for a ROOT whose runs/ holds the sweep (here the tests' --storage)."""
    from pipelines import contract, status

    [found] = contract.sweep_states(str(swept["runs"].parent))
    summary = swept["summary"]
    assert found["sweep"] == NAME and found["state"] == "done" and found["trials"] == 4
    assert (found["finished"], found["stopped"], found["failed"]) == (
        summary["trials_finished"],
        summary["trials_stopped"],
        0,
    )
    assert found["best_trial"] == summary["best"]["name"] and found["finished"] + found["stopped"] == 4
    line = status.format_table({"data": "ROOT", "stages": [], "sweeps": [found]}).splitlines()[-1]
    assert line.startswith(f"sweep {NAME}") and "4 trials:" in line and summary["best"]["name"] in line
