"""Rerunning one stage on its own: every stage that reads a document refuses it when `status`
calls it stale, before any work or MLflow run, and names the stage to rerun; --allow-stale goes
on and the run records it. Local processes, no Ray: each stage runs in seconds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from pipelines import contract, evaluate, index, shard, stats, status, train
from pipelines.config import EvaluateConfig, IndexConfig, ShardConfig, StatsConfig, StatusConfig, TrainConfig
from pipelines.errors import StageError

LOCAL = dict(parallel="local")
# Each stage and the documents it reads, by their names in `status`.
READS = {
    "shard": ["index"],
    "stats": ["shard train"],
    "train": ["shard train", "shard val", "stats"],
    "evaluate": ["shard val"],
}


def _model_state(root: Path) -> dict:
    """What evaluate checks of a checkpoint: a model trained on ROOT's classes and its shards' geometry."""
    classes = contract.read_classes(str(root))
    params = contract.read_manifest(str(root), "val")["params"]
    return {
        "config": {
            "num_classes": len(classes),
            "classes_digest": contract.classes_digest(classes),
            "resize": params["resize"],
            "keep_aspect": params["keep_aspect"],
        },
        "wnids": [c["wnid"] for c in classes],
    }


def _consumers(root: Path, allow_stale: bool = False) -> dict:
    data = str(root)
    return {
        "shard": lambda: shard.check(ShardConfig(data=data, allow_stale=allow_stale, **LOCAL)),
        "stats": lambda: stats.check(StatsConfig(data=data, allow_stale=allow_stale, **LOCAL)),
        "train": lambda: train._inputs(TrainConfig(data=data, crop=32, allow_stale=allow_stale)),
        "evaluate": lambda: evaluate._val_shards(
            EvaluateConfig(data=data, checkpoint="-", allow_stale=allow_stale), _model_state(root)
        ),
    }


def _assert_stages_agree_with_status(root: Path, expect_stale: set[str]) -> None:
    """`status` finds exactly ``expect_stale``, and each stage refuses exactly when one of the
    documents it reads is among them: its error names each one's reason and the stage to rerun.
    With --allow-stale each goes on."""
    found = status.run(StatusConfig(data=str(root)))
    assert {s["stage"] for s in found["stages"] if s["state"] == "stale"} == expect_stale, found["stages"]
    reasons = {s["stage"]: s["reason"] for s in found["stages"]}
    for stage, check in _consumers(root).items():
        stale = [d for d in READS[stage] if d in expect_stale]
        if not stale:
            check()
            continue
        with pytest.raises(StageError) as e:
            check()
        message = str(e.value)
        assert f"rerun {stale[0].split()[0]} first (python -m pipelines {stale[0].split()[0]} " in message, (
            stage,
            message,
        )
        assert all(reasons[d] in message for d in stale), (stage, message)
    for check in _consumers(root, allow_stale=True).values():
        check()


def test_every_stage_refuses_what_status_calls_stale_and_names_the_stage_to_rerun(sample_src, tmp_path, monkeypatch):
    src, root = tmp_path / "src", tmp_path / "root"
    shutil.copytree(sample_src / "folders", src)
    index.run(IndexConfig(source=str(src), data=str(root), samples_per_shard=10))
    shard.run(ShardConfig(data=str(root), resize=64, **LOCAL))
    stats.run(StatsConfig(data=str(root), **LOCAL))
    _assert_stages_agree_with_status(root, set())

    # Resharded with another --resize: the stats describe images that are gone.
    shard.run(ShardConfig(data=str(root), resize=48, **LOCAL))
    _assert_stages_agree_with_status(root, {"stats"})
    stats.run(StatsConfig(data=str(root), **LOCAL))

    # A new source image, reindexed: the train shards no longer match the index.
    wnid = sorted(p.name for p in (src / "train").iterdir())[0]
    Image.new("RGB", (80, 60), (200, 30, 90)).save(src / "train" / wnid / f"{wnid}_999999.JPEG")
    index.run(IndexConfig(source=str(src), data=str(root), samples_per_shard=10))
    _assert_stages_agree_with_status(root, {"shard train"})
    shard.run(ShardConfig(data=str(root), resize=48, **LOCAL))
    _assert_stages_agree_with_status(root, {"stats"})
    stats.run(StatsConfig(data=str(root), **LOCAL))

    # A val shard lost on disk.
    victim = root / "shards" / "val" / "val-000001.tar"
    kept = victim.read_bytes()
    victim.unlink()
    _assert_stages_agree_with_status(root, {"shard val"})
    victim.write_bytes(kept)

    # An index made by an older version of the index stage.
    record = root / "index" / "index.json"
    good = record.read_text()
    rec = json.loads(good)
    rec["params"]["assignment"] = contract.ASSIGNMENT - 1
    record.write_text(json.dumps(rec))
    _assert_stages_agree_with_status(root, {"index"})
    record.write_text(good)

    # Shards made by another version of the image libraries.
    real = contract.codec_versions()
    monkeypatch.setattr(contract, "codec_versions", lambda: {**real, "pillow": real["pillow"] + ".post1"})
    _assert_stages_agree_with_status(root, {"shard train", "shard val"})


def test_train_on_stale_stats_exits_2_before_any_mlflow_run_and_stats_records_allow_stale(sample_src, tmp_path):
    root = tmp_path / "root"
    index.run(IndexConfig(source=str(sample_src / "folders"), data=str(root), samples_per_shard=10))
    shard.run(ShardConfig(data=str(root), resize=96, **LOCAL))
    stats.run(StatsConfig(data=str(root), **LOCAL))
    shard.run(ShardConfig(data=str(root), resize=72, **LOCAL))

    cli = [sys.executable, "-m", "pipelines"]
    p = subprocess.run(
        [
            *cli,
            "train",
            "--data",
            str(root),
            "--no-gpu",
            "--epochs",
            "1",
            "--crop",
            "64",
            "--experiment",
            "stale-inputs",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert "rerun stats first (python -m pipelines stats --data" in p.stderr and "Traceback" not in p.stderr
    assert MlflowClient().get_experiment_by_name("stale-inputs") is None  # no run, not even an experiment

    # The shards go stale under the stats' feet once more (the index changed): stats refuses, then
    # with --allow-stale computes them and its MLflow run says what it read.
    rec = json.loads((root / "index" / "index.json").read_text())
    rec["digests"]["train"] = "0" * 64
    (root / "index" / "index.json").write_text(json.dumps(rec))
    p = subprocess.run(
        [*cli, "stats", "--data", str(root), "--parallel", "local"], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2 and "rerun shard first" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = subprocess.run(
        [*cli, "stats", "--data", str(root), "--parallel", "local", "--allow-stale"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    run_id = json.loads(p.stdout.strip().splitlines()[-1])["mlflow_run_id"]
    tag = MlflowClient().get_run(run_id).data.tags["pipelines.allowed_stale"]
    assert tag == "shard train: the index changed since the shards were made"
