"""predict: images -> their top 5 classes, with a logged or registered model.

    python -m pipelines predict --model models:/alexnet-demo@champion photo1.jpg photo2.png
    python -m pipelines predict --run-id 3f2a... photo.jpg

Loads the model as any MLflow user would (``mlflow.pyfunc.load_model``: the image classifier a
training run logs, pipelines/classifier.py), prints each image's top 5 on stderr and ends with
one JSON line on stdout.
"""

from __future__ import annotations

import sys
import time

from . import storage, tracking
from .config import PredictConfig
from .errors import StageError


def check(cfg: PredictConfig) -> None:
    if bool(cfg.model) == bool(cfg.run_id):
        raise StageError("Give exactly one of --model URI (models:/NAME@ALIAS) or --run-id ID.")
    missing = [p for p in cfg.images if not storage.exists(p)]
    if missing:
        raise StageError(
            f"No such image: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def run(cfg: PredictConfig) -> dict:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    t0 = time.monotonic()
    check(cfg)
    uri = cfg.model
    if cfg.run_id:
        tags = tracking.get_tags(cfg.run_id)
        if "pipelines.model_uri" not in tags:
            raise StageError(
                f"Run {cfg.run_id} has logged no model (tag pipelines.model_uri): is it a finished training run?"
            )
        uri = tags["pipelines.model_uri"]
    tracking.configure()
    try:
        model = mlflow.pyfunc.load_model(uri)
    except MlflowException as e:
        raise StageError(
            f"Cannot load the model {uri} from the MLflow store {tracking.tracking_uri()}: "
            f"{str(e).splitlines()[0][:300]} (set MLFLOW_TRACKING_URI to the store that holds it)."
        ) from None
    out = model.predict(pd.DataFrame({"image": [storage.read_bytes(p) for p in cfg.images]}))
    predictions = []
    for path, row in zip(cfg.images, out.to_dict("records")):
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
