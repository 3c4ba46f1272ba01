"""`make demo` as a new user sees it: the terminal, the commands it prints, and what comes next
with its model: predict (one image, a folder or a bucket in bulk, any epoch's checkpoint), serve."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from . import services as sv

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


def test_the_registered_model_serves_over_http_as_predict_answers(demo):
    """`mlflow models serve -m models:/alexnet-demo@champion` (MLflow's own scoring server, no
    code of ours) answers a JSON POST of base64 JPEG bytes with the top 5 that `predict` prints
    for the same files, and a non-image in the same request with an error row of its own."""
    jpgs = _val_jpgs(demo)
    inputs = [jpgs[0], jpgs[-1], b"not an image"]
    files = [demo["tmp"] / name for name in ("serve-a.jpg", "serve-b.jpg", "serve-c.txt")]
    for f, content in zip(files, inputs):
        f.write_bytes(content)
    # uvicorn, which `mlflow models serve` starts through bash, is found on PATH: the venv's bin.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        MLFLOW_TRACKING_URI=demo["summary"]["tracking_uri"],
        PYTHONPATH=str(PROJECT),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    p = subprocess.run(
        [sys.executable, "-m", "pipelines", "predict", "--model", "models:/alexnet-demo@champion", *files],
        cwd=demo["tmp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout.strip().splitlines()[-1])["predictions"]
    port = sv.free_port()
    log = demo["tmp"] / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/alexnet-demo@champion"]
            + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=demo["tmp"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn runs in this process group: stopped with it
        )
    try:
        _wait_until_healthy(f"http://127.0.0.1:{port}/health", server, log)
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in inputs]}}
        answer = _post_json(f"http://127.0.0.1:{port}/invocations", body)
    finally:
        sv._kill(server, grace=30)  # its process group: mlflow and its uvicorn
    assert list(answer) == ["predictions"] and len(answer["predictions"]) == 3, answer
    rows = answer["predictions"]  # one record per image, the model's output columns as keys
    for row, said in zip(rows[:2], printed[:2]):
        assert row["error"] == "" and row["top5_class_ids"] == [t["class_id"] for t in said["top5"]], (row, said)
        assert row["class_id"] == said["top5"][0]["class_id"] and row["wnid"] == said["top5"][0]["wnid"]
        assert all(abs(a - t["probability"]) <= 1e-5 for a, t in zip(row["top5_probabilities"], said["top5"]))
    assert rows[2]["class_id"] == -1 and rows[2]["top5_class_ids"] == []
    assert rows[2]["error"].startswith("not an image") and rows[2]["error"] == printed[2]["error"]


def _wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    """Until the server answers 200 (once the model is loaded); failing with its log if it exits."""

    def healthy() -> bool:
        if server.poll() is not None:  # pytest.fail is no Exception: wait_for does not swallow it
            pytest.fail(f"the server exited ({server.returncode}):\n{log.read_text()[-4000:]}")
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200

    sv.wait_for(healthy, f"mlflow models serve ({url})", 180, log)


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        pytest.fail(f"{url} answered {e.code}: {e.read().decode()[:3000]}")


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


# --- predict in bulk, on Ray Data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(demo) -> dict:
    """A folder as ImageNet's train split lays it out (a folder per WNID): the demo's 99 val
    images three times each, so 297 images, and 3 files that are not: a text file, an empty
    file, a JPEG cut short."""
    from pipelines import tarindex

    data = Path(demo["summary"]["data"])
    classes = json.loads((data / "classes.json").read_text())
    folder = demo["tmp"] / "photos"
    for s in json.loads((data / "shards" / "val.json").read_text())["shards"]:
        url = data / "shards" / "val" / s["name"]
        for key, jpg, label in tarindex.parse_run(url.read_bytes(), str(url)):
            (folder / classes[label]["wnid"]).mkdir(parents=True, exist_ok=True)
            for copy in range(3):
                (folder / classes[label]["wnid"] / f"{key}-{copy}.jpg").write_bytes(jpg)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / classes[0]["wnid"] / "cut.jpg").write_bytes(jpg[: len(jpg) // 3])
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return {"folder": folder, "files": files, "cut": f"{classes[0]['wnid']}/cut.jpg"}


def _predict_env(demo) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, as a user's
    env.update(MLFLOW_TRACKING_URI=demo["summary"]["tracking_uri"], PYTHONPATH=str(PROJECT))
    return env


def _bulk(demo, source, out, env=None, **popen) -> subprocess.Popen:
    """``predict --source SOURCE --out OUT`` of the demo's registered model, 30 images a chunk."""
    command = [sys.executable, "-m", "pipelines", "predict", "--model", "models:/alexnet-demo@champion"]
    return subprocess.Popen(
        [*command, "--source", str(source), "--out", str(out), "--chunk-images", "30"],
        cwd=demo["tmp"],
        env=env or _predict_env(demo),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _finished(p: subprocess.Popen) -> tuple[dict, str]:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "Traceback" not in err, err[-4000:]
    return json.loads(out.strip().splitlines()[-1]), err


def _rows(out) -> list[dict]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(out).to_pylist(), key=lambda r: r["key"])


def test_bulk_predict_of_a_folder_killed_then_finished_then_skipped(demo, photos):
    """300 files, 3 of them no image: 297 answers with the top-1 `evaluate` reported on these
    images, 3 rows naming their error. The run is SIGKILLed (driver and its Ray) once 2 of its 10
    chunks are written; the same command writes the 8 others, leaving the 2 untouched; a third
    run finds the work done. The MLflow run names the registered model's LoggedModel as its input."""
    from mlflow import MlflowClient

    out = demo["tmp"] / "predictions"
    first = _bulk(demo, photos["folder"], out, start_new_session=True)
    try:
        sv.wait_for(lambda: len(list(out.glob("part-*.parquet"))) >= 2, "2 chunks written", 300)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 2 <= len(kept) < 10 and "summary" not in json.loads((out / "_manifest.json").read_text())

    summary, err = _finished(_bulk(demo, photos["folder"], out))
    # The killed Ray's workers may still land a chunk they were writing (whole: a rename) before
    # they notice their driver is gone: the rerun counts what it finds, at least what was kept.
    before = int(re.search(r"predict: (\d+) of 10 chunks already in " + re.escape(str(out)), err)[1])
    assert len(kept) <= before < 10 and summary["chunks_before"] == before
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in kept} == kept
    rows = _rows(out)
    assert [r["key"] for r in rows] == photos["files"]
    bad = {r["key"]: r["error"] for r in rows if r["error"]}
    assert sorted(bad) == sorted(["notes.txt", "empty.jpg", photos["cut"]])
    assert bad["notes.txt"].startswith("not an image") and bad[photos["cut"]].startswith("truncated image")
    assert all(r["class_id"] == -1 and r["top5_class_ids"] == [] for r in rows if r["error"])
    answered = [r for r in rows if not r["error"]]
    assert len(answered) == 297 and all(len(r["top5_class_ids"]) == 5 and r["label"] >= 0 for r in answered)
    top1 = sum(r["class_id"] == r["label"] for r in answered) / 297
    assert top1 == demo["summary"]["top1"] == summary["top1"], (top1, demo["summary"]["top1"])
    assert (summary["images"], summary["errors"]) == (300, 3)

    again, err = _finished(_bulk(demo, photos["folder"], out))
    assert again["skipped"] and again["images"] == 300 and "nothing to do" in err
    client = MlflowClient(demo["summary"]["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    version = client.get_model_version_by_alias("alexnet-demo", "champion")
    assert [m.model_id for m in run.inputs.model_inputs] == [version.source.removeprefix("models:/")]
    assert run.data.metrics["top1"] == top1 and run.data.params["source"] == str(photos["folder"])
    assert run.data.tags["pipelines.model_version"] == f"alexnet-demo/{version.version}"


def test_bulk_predict_from_s3_answers_as_from_the_folder(demo, photos, tmp_path):
    """The same files in a bucket (SeaweedFS), predicted into the bucket: the same rows."""
    import boto3

    with sv.seaweedfs(tmp_path / "s3") as s3:
        e = s3["env"]
        client = boto3.client(
            "s3",
            endpoint_url=e["AWS_ENDPOINT_URL"],
            aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
            region_name=e["AWS_REGION"],
        )
        for name in photos["files"]:
            client.put_object(Bucket=sv.BUCKET, Key=f"photos/{name}", Body=(photos["folder"] / name).read_bytes())
        env = {**_predict_env(demo), **s3["env"]}
        src, out = f"s3://{sv.BUCKET}/photos", f"s3://{sv.BUCKET}/predictions"
        summary, _ = _finished(_bulk(demo, src, out, env=env))
        local = demo["tmp"] / "from-s3"
        for obj in client.list_objects_v2(Bucket=sv.BUCKET, Prefix="predictions/")["Contents"]:
            (local / obj["Key"]).parent.mkdir(parents=True, exist_ok=True)
            (local / obj["Key"]).write_bytes(client.get_object(Bucket=sv.BUCKET, Key=obj["Key"])["Body"].read())
    assert (summary["images"], summary["errors"], summary["top1"]) == (300, 3, demo["summary"]["top1"])
    assert _rows(local / "predictions") == _rows(demo["tmp"] / "predictions")


def _pipelines(demo, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines", *map(str, args)],
        cwd=demo["tmp"],
        env=_predict_env(demo),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_epochs_checkpoint_is_a_model_that_evaluate_and_predict_take(demo):
    """Each epoch's checkpoint is a LoggedModel of the training run, with that epoch's metrics
    (val ones on the val shards' digest), so MLflow's model view ranks them by val_top1. The
    registered version names its run, shards and commit. `evaluate --model` of the best epoch's
    model gives the demo's top-1 and logs it onto that model; `predict --model` of it answers as
    the registered model; a model whose checkpoint the run removed (it keeps the 2 best) gets one
    line saying so."""
    from mlflow import MlflowClient

    client = MlflowClient(demo["summary"]["tracking_uri"])
    run = client.get_run(demo["summary"]["run_id"])
    ranked = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        order_by=[{"field_name": "metrics.val_top1", "ascending": False}],
    )
    epochs = {m.name: m for m in ranked if m.name.startswith("epoch-")}
    assert sorted(epochs) == [f"epoch-{e}" for e in range(1, 9)]
    val = json.loads(Path(demo["summary"]["data"], "shards", "val.json").read_text())
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top1")}
    for name, model in epochs.items():
        got = {m.key: m for m in model.metrics}
        assert got["val_top1"].value == history[int(name[6:])] and got["val_top1"].step == int(name[6:])
        assert (got["val_top1"].dataset_name, got["val_top1"].dataset_digest) == ("imagenet-val-shards", val["digest"])
    scores = [next(x.value for x in m.metrics if x.key == "val_top1") for m in ranked if m.name in epochs]
    assert scores == sorted(scores, reverse=True)

    version = client.get_model_version_by_alias("alexnet-demo", "champion")
    train = json.loads(Path(demo["summary"]["data"], "shards", "train.json").read_text())
    assert version.tags["pipelines.run_id"] == run.info.run_id
    assert version.tags["pipelines.train_shards_digest"] == train["digest"]
    assert re.fullmatch(r"[0-9a-f]{40}", version.tags["pipelines.git_commit"])
    best = next(m for m in epochs.values() if m.tags["pipelines.checkpoint"] == version.tags["pipelines.checkpoint"])

    p = _pipelines(demo, "evaluate", "--data", demo["summary"]["data"], "--model", f"models:/{best.model_id}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["top1"] == demo["summary"]["top1"]
    assert {m.key for m in client.get_logged_model(best.model_id).metrics} >= {"eval_top1", "eval_top5"}

    photo = demo["tmp"] / "epoch.jpg"
    photo.write_bytes(_val_jpgs(demo)[0])
    answers = [
        _pipelines(demo, "predict", "--model", uri, photo)
        for uri in (f"models:/{best.model_id}", "models:/alexnet-demo@champion")
    ]
    assert all(a.returncode == 0 for a in answers), answers[0].stderr[-3000:]
    tops = [json.loads(a.stdout.strip().splitlines()[-1])["predictions"][0]["top5"] for a in answers]
    assert tops[0] == tops[1]

    gone = [m for m in epochs.values() if not Path(m.tags["pipelines.checkpoint"]).exists()]
    assert len(gone) >= 5
    p = _pipelines(demo, "predict", "--model", f"models:/{gone[0].model_id}", photo)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"{gone[0].tags['pipelines.checkpoint']} is gone" in p.stderr, p.stderr


def _val_jpgs(demo) -> list[bytes]:
    from pipelines import tarindex

    data = demo["summary"]["data"]
    manifest = json.loads(Path(data, "shards", "val.json").read_text())
    url = str(Path(data, "shards", "val", manifest["shards"][0]["name"]))
    return [jpg for _, jpg, _ in tarindex.parse_run(Path(url).read_bytes(), url)]
