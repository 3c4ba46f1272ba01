"""predict: images -> their top 5 classes, with a logged or registered model.

    python -m pipelines predict --model models:/alexnet-demo@champion photo1.jpg photo2.png
    python -m pipelines predict --run-id 3f2a... photo.jpg

URI is any model train logged: the run's model (registered or not: models:/NAME@ALIAS,
models:/NAME/VERSION, models:/MODEL_ID) or one epoch's checkpoint (models:/MODEL_ID of a
LoggedModel named epoch-N). It reads what the model carries (weights, classes, normalisation,
geometry), classifies as the logged MLflow model does (pipelines/classifier.py), prints each
image's top 5 on stderr and ends with one JSON line on stdout.

In bulk, on Ray Data (pipelines/inference.py): every image of a folder, an s3:// prefix, a list
file or a dataset ROOT's val shards, into a Parquet dataset, recorded as an MLflow run whose
input is the model it used:

    python -m pipelines predict --model models:/alexnet@champion --source s3://photos/2026/ --out s3://out/2026/
"""

from __future__ import annotations

import contextlib
import sys
import time

from . import answer, checkpoint, classifier, contract, inference, registry, storage, tracking
from .common import Progress
from .config import PredictConfig
from .errors import StageError


def check(cfg: PredictConfig) -> None:
    if bool(cfg.model) == bool(cfg.run_id):
        raise StageError("Give exactly one of --model URI (models:/NAME@ALIAS) or --run-id ID.")
    if cfg.source or cfg.out:
        return _check_bulk(cfg)
    if not cfg.images:
        raise StageError("Give image files, or --source SRC --out OUT to predict a folder, a bucket or a list in bulk.")
    missing = [p for p in cfg.images if not storage.exists(p)]
    if missing:
        raise StageError(
            f"No such image: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def _check_bulk(cfg: PredictConfig) -> None:
    if cfg.images:
        raise StageError("Give image files or --source SRC --out OUT, not both.")
    if not (cfg.source and cfg.out):
        raise StageError("--source SRC and --out OUT go together: what to predict, and where the Parquet goes.")
    for name in ("chunk_images", "cpus_per_worker", "workers"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise StageError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: give a whole number of at least 1.")
    src, out = cfg.source.rstrip("/") + "/", cfg.out.rstrip("/") + "/"
    if out.startswith(src):
        raise StageError(
            f"--out {cfg.out} is inside --source {cfg.source}: the output would be read as input. Put it elsewhere."
        )


def _model_uri(cfg: PredictConfig) -> str:
    if not cfg.run_id:
        return cfg.model
    tags = tracking.get_tags(cfg.run_id)
    if "pipelines.model_uri" not in tags:
        raise StageError(
            f"Run {cfg.run_id} has logged no model (tag pipelines.model_uri): is it a finished training run?"
        )
    return tags["pipelines.model_uri"]


@contextlib.contextmanager
def _loading(uri: str):
    """MLflow's errors while loading ``uri``, as one line that names the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise StageError(
            f"Cannot load the model {uri} from the MLflow store {tracking.tracking_uri()}: "
            f"{str(e).splitlines()[0][:300]} (set MLFLOW_TRACKING_URI to the store that holds it)."
        ) from None


def run(cfg: PredictConfig) -> dict:
    import io

    import torch

    t0 = time.monotonic()
    check(cfg)
    if cfg.source:
        return _bulk(cfg)
    uri = _model_uri(cfg)
    model, _ = _model(uri)
    state = torch.load(io.BytesIO(model["weights"]), map_location="cpu", weights_only=True)
    net = checkpoint.model_from_state(state).eval()
    images = [storage.read_bytes(p) for p in cfg.images]
    rows = answer.classify(net, images, model["geometry"], model["classes"], model["stats"])
    predictions = []
    for path, row in zip(cfg.images, rows):
        if row.get("error"):  # not an image: said for it, and the others answered
            predictions.append({"image": path, "error": row["error"]})
            print(f"{path}: {row['error']}", file=sys.stderr)
            continue
        top = [
            {"class_id": int(i), "wnid": w, "name": n, "probability": round(float(p), 6)}
            for i, w, n, p in zip(
                row["top5_class_ids"], row["top5_wnids"], row["top5_names"], row["top5_probabilities"]
            )
        ]
        predictions.append({"image": path, "top5": top})
        print(f"{path}", file=sys.stderr)
        for rank, t in enumerate(top, 1):
            print(f"  {rank}. {t['probability']:6.1%}  {t['wnid']}  {t['name']}", file=sys.stderr)
    return {
        "stage": "predict",
        "model": uri,
        "images": len(cfg.images),
        "errors": sum("error" in p for p in predictions),
        "predictions": predictions,
        "seconds": round(time.monotonic() - t0, 2),
    }


# --- in bulk ----------------------------------------------------------------------------------


def _bulk(cfg: PredictConfig) -> dict:
    """The source's images through the model on Ray Data, as an MLflow run of its own."""
    summary = tracking.track_stage("predict", cfg, _predict_bulk, experiment=cfg.experiment)
    run_id = summary["mlflow_run_id"]
    if summary.get("model_id"):  # the run page lists the model it used as an input
        registry.link_model(run_id, summary["model_id"])
    version = f"{summary['model_name']}/{summary['model_version']}" if "model_version" in summary else None
    tags = {
        "pipelines.model_uri": summary["model"],
        "pipelines.model_id": summary.get("model_id"),
        "pipelines.model_version": version,
        "pipelines.out": cfg.out,
    }
    tracking.set_tags(run_id, {k: v for k, v in tags.items() if v})
    return summary


def _predict_bulk(cfg: PredictConfig) -> dict:
    from .cluster import ensure_ray

    t0 = time.monotonic()
    uri = _model_uri(cfg)
    model, version = _model(uri)
    kind, source_digest, chunks = inference.list_source(
        cfg.source, [c["wnid"] for c in model["classes"]], cfg.chunk_images
    )
    if not chunks:
        raise StageError(f"--source {cfg.source} holds no files to predict.")
    manifest = {
        "format": inference.FORMAT,
        "source": cfg.source,
        "source_kind": kind,
        "source_digest": source_digest,
        "model": uri,
        "model_digest": model["digest"],
        **{("model_id" if k == "model_id" else f"model_{k}"): version[k] for k in MODEL_KEYS if k in version},
        "chunk_images": cfg.chunk_images,
        "chunks": len(chunks),
    }
    before = _begin(cfg, manifest)
    if before is not None:
        print(
            f"predict: {cfg.out} already holds these predictions (same source, same model): nothing to do.",
            file=sys.stderr,
        )
        return {**before, "skipped": True, "seconds": round(time.monotonic() - t0, 2)}
    done = inference.written(cfg.out)
    todo = [c for c in chunks if c["chunk"] not in done]
    totals = inference.counts_of(cfg.out, sorted(done))
    if done:
        print(
            f"predict: {len(done)} of {len(chunks)} chunks already in {cfg.out} (a run before this one): going on.",
            file=sys.stderr,
        )
    ray = ensure_ray()
    gpu, workers = _placement(cfg, ray.cluster_resources())
    progress = Progress("predict", len(todo), unit="chunks")
    for counts in inference.run_chunks(todo, model, cfg.out, workers, gpu, cfg.cpus_per_worker):
        totals = {k: totals[k] + counts[k] for k in totals}
        progress.update(1, counts["images"])
    summary = _summary(cfg, manifest, totals, len(done), gpu, workers, time.monotonic() - t0)
    inference.write_manifest(cfg.out, {**manifest, "summary": summary})
    return summary


def _begin(cfg: PredictConfig, manifest: dict) -> dict | None:
    """The summary of a finished run over the same source and model, if OUT holds one; else
    None, with OUT's manifest written (a new OUT) or matched (a killed run's, to go on with)."""
    before = inference.read_manifest(cfg.out)
    if before is None:
        if storage.list_dir(cfg.out):
            raise StageError(
                f"--out {cfg.out} holds files but no {inference.MANIFEST}: it is not an output of predict. "
                "Give an empty or new folder."
            )
        inference.write_manifest(cfg.out, manifest)
        return None
    differs = [k for k in ("source_digest", "model_digest", "chunk_images") if before.get(k) != manifest[k]]
    if differs:
        what = {"source_digest": "the source's files", "model_digest": "the model", "chunk_images": "--chunk-images"}
        raise StageError(
            f"--out {cfg.out} holds predictions of {before['model']} over {before['source']}; this "
            f"command's {' and '.join(what[k] for k in differs)} differ: give another --out (or delete that one)."
        )
    return before.get("summary")


def _placement(cfg: PredictConfig, resources: dict) -> tuple[bool, int]:
    """(on GPUs?, model actors), checked against the cluster before any work."""
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
    gpu = gpus >= 1 if cfg.gpu is None else cfg.gpu
    if gpu and gpus < 1:
        raise StageError("--gpu: the Ray cluster has no GPU; leave --gpu out to predict on CPUs.")
    workers = cfg.workers or (gpus if gpu else 1)
    if gpu and workers > gpus:
        raise StageError(f"--workers {workers} --gpu: the Ray cluster has {gpus} GPUs; give --workers {gpus} or fewer.")
    held, _ = inference.actor_cpus(workers, gpu, cfg.cpus_per_worker)
    need = (0 if gpu else workers * held) + 1  # and one CPU to decode
    if cpus < need:
        raise StageError(
            f"{workers} model actor(s) of {held} CPU(s) and a decode task need {need} CPUs; "
            f"the Ray cluster has {cpus:g}. Give fewer --workers or --cpus-per-worker."
        )
    return gpu, workers


def _summary(cfg, manifest: dict, totals: dict, resumed: int, gpu: bool, workers: int, seconds: float) -> dict:
    labeled = totals["labeled"]
    return {
        "stage": "predict",
        "model": manifest["model"],
        **{k: manifest[k] for k in ("model_id", "model_name") if k in manifest},
        **(
            {"model_version": str(manifest["model_version"])} if "model_version" in manifest else {}
        ),  # a name, not a metric
        "source": cfg.source,
        "out": cfg.out,
        "images": totals["images"],
        "errors": totals["errors"],
        "labeled": labeled,
        **({"top1": totals["hits1"] / labeled, "top5": totals["hits5"] / labeled} if labeled else {}),
        "chunks": manifest["chunks"],
        "chunks_before": resumed,
        "gpu": gpu,
        "workers": workers,
        "seconds": round(seconds, 2),
        "images_per_second": round(totals["images"] / max(seconds, 1e-9), 1),
    }


MODEL_KEYS = ("model_id", "name", "version", "run_id", "epoch")  # of registry.describe, kept in the manifest


def _model(uri: str) -> tuple[dict, dict]:
    """(what the model carries, what MLflow records of it): the weights' bytes, classes, stats,
    geometry and a digest of them (what a rerun compares); a LoggedModel of an epoch's
    checkpoint is read from the checkpoint, any other from its MLflow model files."""
    with _loading(uri):
        found = registry.describe(uri)
        if found.get("kind") == "checkpoint":
            return _packed(*_checkpoint_files(uri)), found
        return _packed(*_model_files(uri)), found


def _packed(raw: dict, geometry: dict) -> dict:
    import hashlib
    import json

    return {
        "weights": raw["weights"],
        "classes": json.loads(raw["classes"]),
        "stats": json.loads(raw["stats"]),
        "geometry": geometry,
        "digest": hashlib.sha256(b"".join(hashlib.sha256(raw[k]).digest() for k in sorted(raw))).hexdigest(),
    }


def _model_files(uri: str) -> tuple[dict[str, bytes], dict]:
    """The image classifier's files (pipelines/classifier.py) as MLflow stores them, and the
    geometry its weights file records."""
    import tempfile
    from pathlib import Path

    import mlflow.artifacts
    import torch
    import yaml

    tracking.configure()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"].get("python_function", {})
        files = {k: local / a["path"] for k, a in flavor.get("artifacts", {}).items()}
        if not {"weights", "classes", "stats"} <= set(files):
            raise StageError(
                f"{uri} is not an image classifier logged by train (it has no weights, classes and stats)."
            )
        # mapped, not read: only the geometry's few bytes are touched, not the weights' hundreds of MB
        geometry = torch.load(files["weights"], map_location="cpu", weights_only=True, mmap=True)["geometry"]
        return {k: files[k].read_bytes() for k in ("weights", "classes", "stats")}, geometry


def _checkpoint_files(uri: str) -> tuple[dict[str, bytes], dict]:
    """The same files, made from an epoch's checkpoint as train makes them for its model: the
    class names from the run's dataset ROOT where it is still there, else the WNIDs alone."""
    import json
    import tempfile
    from pathlib import Path

    found = registry.with_checkpoint(uri)
    state = checkpoint.load(found["checkpoint"])
    c = state["config"]
    if c.get("resize") is None:
        raise StageError(
            f"{uri}: its checkpoint does not record the shards' resize (an older one); predict with the run's model."
        )
    data = tracking.get_tags(found["run_id"]).get("pipelines.data") if "run_id" in found else None
    named = (
        {k["wnid"]: k for k in contract.read_classes(data)}
        if data and storage.exists(contract.classes_url(data))
        else {}
    )
    classes = [named.get(w, {"wnid": w, "name": w}) for w in state["wnids"]]
    geometry = {"resize": c["resize"], "keep_aspect": c.get("keep_aspect", False), "crop": c["crop"]}
    with tempfile.TemporaryDirectory() as tmp:
        stats = json.dumps(state["stats"]).encode()
        files = classifier.artifacts(state, geometry, json.dumps(classes).encode(), stats, tmp)
        return {k: Path(files[k]).read_bytes() for k in ("weights", "classes", "stats")}, geometry
