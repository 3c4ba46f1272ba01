"""The model a training run logs and registers: an image classifier, not a tensor function.

It takes images (a DataFrame column ``image`` of encoded JPEG/PNG bytes, or of decoded RGB
uint8 arrays shaped H x W x 3, as PIL and OpenCV-after-BGR-swap give them) and returns, per
image, the class id, WNID, class name and probability of its top class and its top 5, and an
``error`` column: empty, or why that input is not an image (the others are answered). Inside
it: the weights, the class list (classes.json), the normalisation (stats.json), and the
geometry the run was trained with (the shards' resize, then the centre crop), so that

    mlflow.pyfunc.load_model("models:/alexnet@champion").predict(pd.DataFrame({"image": [jpeg]}))

gives the same top-1 as ``python -m pipelines evaluate`` (centre crop) on those images. The
project's ``pipelines`` and ``model`` code travel with the model (``code_paths``), so it loads
wherever torch, torchvision and Pillow are installed. ``python -m pipelines predict`` wraps it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import pandas as pd

from pipelines import answer

PROJECT = Path(__file__).resolve().parent.parent


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from pipelines import checkpoint

        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.net = checkpoint.model_from_state(state).eval()
        self.geometry = state["geometry"]  # {"resize", "keep_aspect", "crop"}
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text())
        self.stats = json.loads(Path(context.artifacts["stats"]).read_text())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = model_input["image"] if isinstance(model_input, pd.DataFrame) else model_input
        return pd.DataFrame(answer.classify(self.net, list(images), self.geometry, self.classes, self.stats))


def artifacts(state: dict, geometry: dict, classes_json: bytes, stats_json: bytes, folder: str) -> dict:
    """Write what the model carries into ``folder``; returns MLflow's ``artifacts`` mapping. The
    weights file holds tensors and plain values only (loaded with weights_only=True)."""
    import torch

    os.makedirs(folder, exist_ok=True)
    paths = {
        "weights": os.path.join(folder, "weights.pt"),
        "classes": os.path.join(folder, "classes.json"),
        "stats": os.path.join(folder, "stats.json"),
    }
    torch.save(
        {
            "model": state["model"],
            "config": {k: state["config"][k] for k in ("arch", "num_classes", "crop")},
            "geometry": geometry,
        },
        paths["weights"],
    )
    Path(paths["classes"]).write_bytes(classes_json)
    Path(paths["stats"]).write_bytes(stats_json)
    return paths


def code_paths() -> list[str]:
    return [str(PROJECT / "pipelines"), str(PROJECT / "model")]


# MLflow's "models from code": the model is logged as this file, not as a pickled object, so
# loading it runs this project's code and unpickles nothing (the weights load weights_only).
mlflow.models.set_model(ImageClassifier())
