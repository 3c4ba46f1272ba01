"""Training on 2 Ray Train CPU workers, tracked in MLflow, resumed by name.

One dataset and a first run that the tests share, resumed by one of them: each Ray Train start
costs ~15 s here, and each checkpoint (~0.5 GB on a disk of ~100 MB/s) ~4.5 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipelines import checkpoint, contract, train
from pipelines.config import TrainConfig

from .helpers import epoch_keys, read_ledger

pytestmark = pytest.mark.slow
FIT = dict(workers=2, batch_size=16, crop=64, init="kaiming", gpu=False, lr=0.01, experiment="test")
METRICS = (
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "images_per_second",
    "data_wait_fraction",
)


@pytest.fixture(scope="module")
def first_run(dataset, tracking_store, tmp_path_factory):
    ledger = str(tmp_path_factory.mktemp("ledger"))
    return {**train.run(TrainConfig(data=dataset, epochs=3, name="resumable", ledger=ledger, **FIT)), "ledger": ledger}


def _best_checkpoint(run: dict) -> str:
    """The run's best checkpoint now (a rerun of the name keeps its best few, not the first run's)."""
    return MlflowClient().get_run(run["run_id"]).data.tags["pipelines.best_checkpoint"]


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_three_uneven_shards_are_read_once_per_epoch(first_run, dataset):
    """Shards of 50/50/20 samples over 2 ranks of 8 and 1 loader worker each: the ledger shows
    every sample once per epoch but the stated remainder (120 = 7 * 16 + 8)."""
    ledger = read_ledger(first_run["ledger"])
    assert first_run["left_out_per_epoch"] == 8
    for epoch in (1, 2, 3):
        keys = epoch_keys(ledger, epoch)
        assert sorted(ledger[epoch]) == list(range(7)) and all(len(r) == 2 for r in ledger[epoch].values())
        assert len(keys) == len(set(keys)) == 112
    assert len(set(epoch_keys(ledger, 1)) | set(epoch_keys(ledger, 2)) | set(epoch_keys(ledger, 3))) == 120


def test_training_learns_and_tracks_every_epoch_once(first_run, dataset):
    client = MlflowClient()
    run = client.get_run(first_run["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "resumable"
    for key in METRICS:
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [1, 2, 3], key
    losses = [v for _, v in _history(client, run.info.run_id, "train_loss")]
    assert losses[-1] < losses[0], losses
    assert all(0 <= v <= 1 for _, v in _history(client, run.info.run_id, "data_wait_fraction"))
    params = run.data.params
    for key in (
        "lr",
        "batch_size",
        "workers",
        "git_sha",
        "versions.torch",
        "versions.ray",
        "versions.mlflow",
        "num_classes",
    ):
        assert key in params, key
    assert params["num_classes"] == "4" and params["gpu"] == "False"
    # Lineage: the shards' manifest digest is the run's dataset input.
    manifest = json.loads(open(f"{dataset}/shards/train.json").read())
    digests = [d.dataset.digest for d in run.inputs.dataset_inputs]
    assert any(manifest["digest"].startswith(d) for d in digests), digests
    makers = run.data.tags["pipelines.shard_runs"].split(",")
    assert [client.get_run(r).data.tags["pipelines.stage"] for r in makers] == ["shard"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "classes.json", "stats.json"} <= artifacts
    # The logged model classifies images: JPEG bytes in, classes out (the best epoch's weights).
    import mlflow.pyfunc
    import pandas as pd

    from pipelines import tarindex

    url = f"{dataset}/shards/val/val-000000.tar"
    doc = tarindex.read(url)
    jpgs = [jpg for _, jpg, _ in tarindex.parse_run(open(url, "rb").read(), url)][:3]
    out = mlflow.pyfunc.load_model(first_run["model_uri"]).predict(pd.DataFrame({"image": jpgs}))
    classes = json.loads(open(f"{dataset}/classes.json").read())
    assert len(out) == 3 and set(out["wnid"]) <= {c["wnid"] for c in classes}
    assert all(0 < p <= 1 for p in out["probability"]) and all(len(t) == 4 for t in out["top5_class_ids"])
    assert first_run["best_epoch"] in (1, 2, 3) and doc["samples"] >= 3
    assert [n["ranks"] for n in first_run["nodes"]] == [[0, 1]]  # both ranks on this one node
    # System metrics of rank 0's node, every 10 s of the run
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system, system


def test_rerunning_the_name_resumes_at_the_next_epoch(first_run, dataset, tmp_path):
    # The newest checkpoint (epoch 3's) truncated on disk (a disk or copy fault), its size halved:
    # loading it names it, and the same command again resumes from the newest intact one (epoch
    # 2's), says so on the run, and trains epoch 3 again to the same bits as the first time: the
    # checkpoint holds the data position and every random draw of an epoch is seeded by (seed,
    # epoch, rank).
    newest = Path(first_run["checkpoint"]) / checkpoint.STATE_FILE
    shutil.copytree(first_run["checkpoint"], tmp_path / "intact")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.raises(checkpoint.Damaged, match=f"'{newest}' is damaged"):
        checkpoint.load(first_run["checkpoint"])
    again = train.run(TrainConfig(data=dataset, epochs=3, name="resumable", **FIT))
    assert again["run_id"] == first_run["run_id"] and not again["skipped"]
    client = MlflowClient()
    said = client.get_run(again["run_id"]).data.tags["pipelines.resumed_past_damaged"]
    assert f"'{newest}' is damaged" in said and "resumed from the newest intact one, checkpoint_" in said, said
    redone, first = checkpoint.load(again["checkpoint"]), checkpoint.load(str(tmp_path / "intact"))
    assert redone["position"] == first["position"] == {"epoch": 4, "segments": [], "sums": None}
    for name, tensor in first["model"].items():
        assert torch.equal(redone["model"][name], tensor), name
    for i, state in first["optimizer"]["state"].items():  # SGD's momentum
        assert torch.equal(redone["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"]), i
    # One more epoch asked for: the run goes on at epoch 4, one MLflow run with each epoch once.
    more = train.run(TrainConfig(data=dataset, epochs=4, name="resumable", **FIT))
    assert more["run_id"] == first_run["run_id"] and more["epochs"] == 4
    for key in METRICS:
        assert [s for s, _ in _history(client, more["run_id"], key)] == [1, 2, 3, 4], key
    assert client.get_run(more["run_id"]).info.status == "FINISHED"
    assert [h["samples"] for h in checkpoint.load(more["checkpoint"])["history"]] == [112] * 4
    # A finished run asked for the same epochs trains nothing and logs nothing new.
    third = train.run(TrainConfig(data=dataset, epochs=4, name="resumable", **FIT))
    assert third["skipped"] and third["run_id"] == more["run_id"] and third["model_uri"] == more["model_uri"]
    assert [s for s, _ in _history(client, more["run_id"], "val_top1")] == [1, 2, 3, 4]


def test_evaluate_cli_reports_and_logs_ten_crop(first_run, dataset):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "evaluate",
            "--data",
            dataset,
            "--run-id",
            first_run["run_id"],
            "--ten-crop",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["crops"] == 10 and out["images"] == 24 and 0 <= out["top1"] <= out["top5"] <= 1
    logged = MlflowClient().get_run(first_run["run_id"]).data.metrics
    assert logged["eval_10crop_top1"] == pytest.approx(out["top1"])


def test_a_second_training_run_of_one_name_is_refused_while_the_first_runs(dataset, tmp_path):
    """A run of a name holds a lease on its checkpoint folder (as the first run's process holds it
    here): a second run of that name stops before any MLflow run, naming the first."""
    from pipelines import lease
    from pipelines.errors import StageError

    runs = tmp_path / "runs"
    with lease.hold(str(runs / "busy"), "train"):
        with pytest.raises(StageError, match=r"Another 'train' run holds .*busy.* process \d+.*wait for it to finish"):
            train.run(TrainConfig(data=dataset, epochs=1, name="busy", storage=str(runs), **FIT))
    client = MlflowClient()
    exp = client.get_experiment_by_name("test")
    assert exp is None or not client.search_runs([exp.experiment_id], "attributes.run_name = 'busy'")


def test_more_workers_than_the_local_ray_has_cpus_is_refused_before_any_run(dataset):
    """Nothing can add nodes to a Ray started for the run: Ray Train would wait forever."""
    from pipelines.errors import StageError

    with pytest.raises(StageError, match=r"--workers 3 needs 3 CPUs .* has 2: use --workers 2 or fewer"):
        train.run(TrainConfig(data=dataset, epochs=1, name="too-many", **{**FIT, "workers": 3}))
    client = MlflowClient()
    exp = client.get_experiment_by_name("test")
    assert not exp or not client.search_runs([exp.experiment_id], "attributes.run_name = 'too-many'")


def test_a_run_whose_loss_is_not_finite_stops_naming_the_epoch_and_the_fix_and_logs_no_model(dataset):
    """lr 1e6 blows the weights up within the first steps: both workers stop at the epoch's end
    without saving it, the error names the epoch and the fix, and the MLflow run is FAILED with no
    model (a NaN model used to be logged and registered as if trained)."""
    import glob
    import os

    from pipelines.errors import StageError

    with pytest.raises(
        StageError,
        match=r"Training 'diverges' diverged: its training loss was (nan|inf|-inf) in "
        r"epoch 1 \(lr 1000000.0, .*a new --name with a lower --lr",
    ):
        train.run(TrainConfig(data=dataset, epochs=2, name="diverges", **{**FIT, "lr": 1e6}))
    exp = MlflowClient().get_experiment_by_name("test")
    [run] = MlflowClient().search_runs([exp.experiment_id], "attributes.run_name = 'diverges'")
    assert run.info.status == "FAILED"
    assert "pipelines.model_uri" not in run.data.tags and "train_loss" not in run.data.metrics
    assert glob.glob(os.path.join(dataset, "runs", "diverges", "checkpoint_*")) == []


def test_gpu_style_evaluation_bf16_and_channels_last_scores_as_the_plain_cpu_path(first_run, dataset):
    """evaluate()'s GPU settings (bf16 autocast, channels_last) on the CPU: the trained model's
    ten-crop predictions agree with float32's on the val images (a GPU run changes only the device)."""
    from pipelines import evaluate, storage

    state = checkpoint.load(_best_checkpoint(first_run))
    m = contract.read_manifest(dataset, "val")
    urls = [(storage.join(contract.shard_dir(dataset, "val"), s["name"]), s["samples"]) for s in m["shards"]]
    plain = evaluate.evaluate(state, urls, True, 8, 1, gpu=False)
    gpu_style = evaluate.evaluate(state, urls, True, 8, 1, gpu=False, amp=True, channels_last=True)
    assert plain["images"] == gpu_style["images"] == 24 and plain["labels"] == gpu_style["labels"]
    agree = sum(a == b for a, b in zip(plain["predicted"], gpu_style["predicted"]))
    assert agree >= 22, (plain["predicted"], gpu_style["predicted"])  # bf16 may flip a near-tie or two
    assert abs(plain["hits1"] - gpu_style["hits1"]) <= 2


def _evaluate_cli(data, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines", "evaluate", "--data", str(data), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_evaluate_refuses_a_model_of_other_classes_and_val_shards_made_unlike_its_own(first_run, dataset, tmp_path):
    """The run's model (4 classes) against ROOTs of 3 classes and of 4 other WNIDs: exit 2 naming
    both digests, no evaluation run. Then its own ROOT with val resharded at another size: exit 2
    naming the size to reshard at; --allow-stale evaluates and says what it read."""
    from pipelines import index, shard
    from pipelines.config import IndexConfig, ShardConfig
    from pipelines.sample import SampleConfig
    from pipelines.sample import run as make_sample

    best = _best_checkpoint(first_run)
    model_digest = checkpoint.load(best)["config"]["classes_digest"]
    assert model_digest == contract.classes_digest(contract.read_classes(dataset))
    client = MlflowClient()
    children = f"tags.`mlflow.parentRunId` = '{first_run['run_id']}'"
    before = len(client.search_runs([client.get_run(first_run["run_id"]).info.experiment_id], children))
    for name, classes, seed in (("three", 3, 0), ("other-wnids", 4, 1)):
        make_sample(
            SampleConfig(
                out=str(tmp_path / name / "src"),
                classes=classes,
                train_per_class=2,
                val_per_class=2,
                seed=seed,
                layouts=("folders",),
            )
        )
        root = tmp_path / name / "root"
        index.run(IndexConfig(source=str(tmp_path / name / "src" / "folders"), data=str(root)))
        shard.run(ShardConfig(data=str(root), split="val", resize=72, parallel="local"))
        p = _evaluate_cli(root, "--run-id", first_run["run_id"])
        here = contract.classes_digest(contract.read_classes(str(root)))
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert f"the model has 4 classes (digest {model_digest[:12]})" in p.stderr, p.stderr
        assert f"has {classes} (digest {here[:12]})" in p.stderr, p.stderr
    assert len(client.search_runs([client.get_run(first_run["run_id"]).info.experiment_id], children)) == before

    copy = tmp_path / "resharded"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("runs"))
    shard.run(ShardConfig(data=str(copy), split="val", resize=64, parallel="local"))
    p = _evaluate_cli(copy, "--checkpoint", best)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "trained on shards made with resize 72" in p.stderr and "--split val --resize 72" in p.stderr, p.stderr
    p = _evaluate_cli(copy, "--checkpoint", best, "--allow-stale")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["images"] == 24 and "were made with resize 64" in out["allowed_stale"][0]
