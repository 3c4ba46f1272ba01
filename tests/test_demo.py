"""`make demo` as a new user sees it: the terminal, and the commands it prints."""

from __future__ import annotations

import io
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
OURS = re.compile(
    r"^(== |sample: |index |shard: |stats: |train: |evaluate: |dataset |stage |index  |shard (train|val) |"
    r"stats  |val top-1 |   on \d+ val |shards: |checkpoint: |MLflow (run|UI): |took \d+ s$|"
    r"\(RayTrainWorker pid=\d+\) (rank 0 on |epoch \d+/\d+|checkpoint at epoch ))"
)


@pytest.fixture(scope="module")
def demo(module_runs):
    tmp = module_runs / "demo"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    p = subprocess.run(
        [sys.executable, "-m", "pipelines", "demo", "--out", str(tmp / "out")],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return {
        "tmp": tmp,
        "stdout": p.stdout,
        "stderr": p.stderr,
        "summary": json.loads(p.stdout.strip().splitlines()[-1]),
    }


def test_the_demo_terminal_is_the_projects_own(demo):
    lines = [l for l in demo["stderr"].splitlines() if l.strip()]
    noise = [l for l in lines if not OURS.match(l)]
    assert not noise, "\n".join(noise)
    assert not any("\x1b[" in l for l in demo["stderr"].splitlines() + demo["stdout"].splitlines())
    assert "Traceback" not in demo["stderr"]
    # Progress inside each epoch, from rank 0 only: step/steps, images/s, ETA for the epoch and run.
    progress = [
        l for l in lines if re.search(r"epoch \d+/8 step \d+/\d+: \d+ images/s, epoch ETA \S+, run ETA \S+$", l)
    ]
    assert len({re.search(r"epoch (\d+)/8", l)[1] for l in progress}) == 8, "\n".join(lines)
    assert len({re.search(r"pid=(\d+)", l)[1] for l in progress}) == 1


def test_the_printed_evaluate_command_works_from_another_folder(demo):
    line = next(l for l in demo["stderr"].splitlines() if l.startswith("evaluate:    "))
    command = line[len("evaluate:    ") :]
    elsewhere = demo["tmp"] / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH")}
    p = subprocess.run(command, shell=True, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["run_id"] == demo["summary"]["run_id"] and got["top1"] == demo["summary"]["top1_10crop"]
    assert os.listdir(elsewhere) == []  # no store made where the user stood


def test_the_registered_model_classifies_images_as_evaluate_does(demo):
    """models:/alexnet-demo@champion, loaded as any MLflow user would, fed the val images' JPEG
    bytes, gets the top-1 that `evaluate` (centre crop) reported; `predict` prints a top 5."""
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    from pipelines import tarindex

    data = demo["summary"]["data"]
    manifest = json.loads(Path(data, "shards", "val.json").read_text())
    jpgs, labels = [], []
    for s in manifest["shards"]:
        url = str(Path(data, "shards", "val", s["name"]))
        for _, jpg, label in tarindex.parse_run(Path(url).read_bytes(), url):
            jpgs.append(jpg)
            labels.append(label)
    session_uri = os.environ["MLFLOW_TRACKING_URI"]  # set_tracking_uri sets the variable too
    mlflow.set_tracking_uri(demo["summary"]["tracking_uri"])
    try:
        model = mlflow.pyfunc.load_model("models:/alexnet-demo@champion")
        out = model.predict(pd.DataFrame({"image": jpgs}))
        # Decoded pixels too: RGB uint8 arrays of H x W x 3, as PIL gives them, classify as their bytes do.
        import numpy as np
        from PIL import Image

        arrays = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpgs[:20]]
        from_arrays = model.predict(pd.DataFrame({"image": arrays}))
        # An input that is no image is an error for that row; the others are answered.
        mixed = model.predict(pd.DataFrame({"image": [arrays[0].astype(np.float32), jpgs[0], b"not an image"]}))
    finally:
        mlflow.set_tracking_uri(session_uri)
    assert "RGB uint8 array of shape H x W x 3" in mixed["error"][0] and mixed["class_id"][0] == -1
    assert mixed["error"][1] == "" and mixed["class_id"][1] == out["class_id"][0]
    assert mixed["error"][2].startswith("not an image") and mixed["top5_class_ids"][2] == []
    assert list(from_arrays["class_id"]) == list(out["class_id"][:20])
    assert np.allclose(from_arrays["probability"], out["probability"][:20], atol=1e-5)
    hits = sum(int(c) == y for c, y in zip(out["class_id"], labels))
    assert len(jpgs) == 99 and hits / len(jpgs) == demo["summary"]["top1"]
    classes = json.loads(Path(data, "classes.json").read_text())
    assert [classes[int(c)]["wnid"] for c in out["class_id"]] == list(out["wnid"])
    # The CLI, from another folder, on an image file, a text file and a JPEG cut short.
    image, text, cut = demo["tmp"] / "val.jpg", demo["tmp"] / "hostname", demo["tmp"] / "cut.jpg"
    image.write_bytes(jpgs[0])
    text.write_text("a-host-name\n")
    cut.write_bytes(jpgs[1][: len(jpgs[1]) // 3])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(MLFLOW_TRACKING_URI=demo["summary"]["tracking_uri"], PYTHONPATH=str(PROJECT))
    p = subprocess.run(
        [sys.executable, "-m", "pipelines", "predict", "--model", "models:/alexnet-demo@champion", image, text, cut],
        cwd=demo["tmp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    top5 = result["predictions"][0]["top5"]
    assert len(top5) == 5 and top5[0]["class_id"] == int(out["class_id"][0])
    assert result["errors"] == 2 and [x.get("error", "")[:12] for x in result["predictions"]] == [
        "",
        "not an image",
        "truncated im",
    ], result["predictions"]
    assert f"{text}: not an image" in p.stderr and f"{cut}: truncated image" in p.stderr
    assert [l.strip()[:2] for l in p.stderr.splitlines() if l.startswith("  ")] == ["1.", "2.", "3.", "4.", "5."]


def test_the_mlflow_record_is_worth_browsing(demo):
    """Standard tags on every run, each evaluation a run of its own nested under the training
    run with its per-class table, most-confused pairs and confusion matrix, system metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(demo["summary"]["tracking_uri"])
    train_run = client.get_run(demo["summary"]["run_id"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 7  # the pipeline, index, shard, stats, train, two evaluations
    for r in runs:
        assert r.data.tags["mlflow.user"] and r.data.tags["mlflow.source.name"].startswith("python -m pipelines ")
        assert len(r.data.tags["mlflow.source.git.commit"]) == 40
    evaluations = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == train_run.info.run_id]
    # the demo's two, and one more for each time a test ran the printed command again
    assert {r.info.run_name for r in evaluations} == {"evaluate", "evaluate-10crop"} and len(evaluations) >= 2
    for r in evaluations:
        assert r.info.status == "FINISHED" and r.info.experiment_id == train_run.info.experiment_id
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {
            "per_class_accuracy.json",
            "most_confused.json",
            "confusion_matrix.png",
        }
        table = json.loads(Path(client.download_artifacts(r.info.run_id, "per_class_accuracy.json")).read_text())
        assert len(table["data"]) == 10 and sum(row[3] for row in table["data"]) == 99  # images per class
    centre = next(r for r in evaluations if r.info.run_name == "evaluate")
    assert centre.data.metrics["top1"] == demo["summary"]["top1"]
    png = Path(client.download_artifacts(centre.info.run_id, "confusion_matrix.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "system/cpu_utilization_percentage" in train_run.data.metrics
    # One tree: the pipeline run, with the stage runs and the training run under it.
    pipeline = client.get_run(train_run.data.tags["mlflow.parentRunId"])
    assert pipeline.info.run_name == "pipeline" and pipeline.info.status == "FINISHED"
    under = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id}
    assert set(under) == {"index", "shard", "stats", train_run.info.run_name}
    assert all(r.info.experiment_id == pipeline.info.experiment_id for r in under.values())
    # The training run links each stage run (tags, and links in the description the UI shows).
    for stage in ("index", "shard", "stats"):
        linked = train_run.data.tags[f"pipelines.{stage}_run"]
        assert linked == under[stage].info.run_id
        assert (
            f"(#/experiments/{pipeline.info.experiment_id}/runs/{linked})" in train_run.data.tags["mlflow.note.content"]
        )
    # Its inputs: the train shards, and the val shards its val_top1 and best checkpoint come from.
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in train_run.inputs.dataset_inputs}
    assert inputs["imagenet-train-shards"]["mlflow.data.context"] == "training"
    assert inputs["imagenet-val-shards"]["mlflow.data.context"] == "validation"
