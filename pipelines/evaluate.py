"""Evaluation: a checkpoint + the val shards -> top-1 / top-5 accuracy.

    python -m pipelines evaluate --data /data/alexnet --run-id 3f2a... [--ten-crop]

Centre crop by default; ``--ten-crop`` is the paper's test procedure (section 4.1): the four
corner patches and the centre patch, each with its reflection, softmax outputs averaged.
With --run-id it evaluates the run's best checkpoint (the one its model was made from) and logs
the metrics back into that training run (eval_top1, eval_top5, or eval_10crop_top1 /
eval_10crop_top5).
"""

from __future__ import annotations

import dataclasses
import time

from . import checkpoint, contract, registry, tracking
from .cluster import on_cluster
from .common import Progress
from .config import EvaluateConfig
from .errors import StageError


def evaluate(
    state: dict,
    shards: list[tuple[str, int]],
    ten_crop: bool,
    batch_size: int,
    loader_workers: int,
    gpu: bool,
    amp: bool | None = None,
    channels_last: bool | None = None,
) -> dict:
    """(top-1 hits, top-5 hits, images) of the checkpoint's model over the val shards. ``amp``
    (bf16 autocast) and ``channels_last`` follow ``gpu`` unless set (a CPU test sets both)."""
    import torch

    import model

    from . import data

    device = torch.device("cuda" if gpu else "cpu")
    amp = gpu if amp is None else amp
    nhwc = gpu if channels_last is None else channels_last
    layout = torch.channels_last if nhwc else torch.contiguous_format
    net = checkpoint.model_from_state(state).to(device).eval().to(memory_format=layout)
    transform = model.EvalTransform.from_stats(state["stats"], crop=state["config"]["crop"], ten_crop=ten_crop)
    hits1 = hits5 = images = 0
    predicted, labels, keys = [], [], []  # per image: the top class, the label, the key
    progress = Progress("evaluate", sum(n for _, n in shards), unit="images")  # every 2 s, on stderr
    with torch.inference_mode():
        loader = data.eval_loader(shards, transform, batch_size=batch_size, num_workers=loader_workers, pin_memory=gpu)
        for x, y, batch_keys in data.on_device(loader, device):
            x = transform.photometric(x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                probs = (
                    model.ten_crop_predict(net, x, layout)
                    if ten_crop
                    else net(x.contiguous(memory_format=layout)).float().softmax(-1)
                )
            top1, top5 = model.topk_hits(probs, y)
            hits1, hits5, images = hits1 + int(top1), hits5 + int(top5), images + len(y)
            predicted += probs.argmax(1).tolist()
            labels += y.tolist()
            keys += list(batch_keys)
            progress.update(len(y), len(y))
    return {"hits1": hits1, "hits5": hits5, "images": images, "predicted": predicted, "labels": labels, "keys": keys}


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def _checkpoint_dir(cfg: EvaluateConfig) -> str:
    if cfg.checkpoint:
        return cfg.checkpoint
    tags = tracking.get_tags(cfg.run_id)
    if "pipelines.checkpoint" not in tags:
        raise StageError(
            f"Run {cfg.run_id} has no checkpoint recorded (tag pipelines.checkpoint): is it "
            "a finished training run? Pass --checkpoint PATH instead."
        )
    # The run's model is its best epoch's: evaluate that one (runs from before it was recorded: the last).
    return tags.get("pipelines.best_checkpoint", tags["pipelines.checkpoint"])


def _of_model(cfg: EvaluateConfig) -> tuple[EvaluateConfig, str | None]:
    """--model URI as the run and checkpoint it stands for (as --run-id and --checkpoint would
    give them), and its LoggedModel's id."""
    found = registry.with_checkpoint(cfg.model)
    return dataclasses.replace(cfg, run_id=found.get("run_id"), checkpoint=found["checkpoint"]), found.get("model_id")


def _val_shards(cfg: EvaluateConfig, state: dict) -> tuple[dict, list[str]]:
    """The val manifest, once the shards are complete and current, the model's classes are
    ROOT's, and the shards were made as the model's training shards were (or --allow-stale:
    then what differs comes back, for the evaluation to record)."""
    m = contract.complete_shards(cfg.data, "val")
    contract.require_classes(cfg.data, state["config"], state.get("wnids"), "Evaluate")
    stale = contract.require_current(cfg.data, ["shard val"], "evaluate", cfg.allow_stale)
    made, here = state["config"].get("resize"), m["params"]["resize"]
    kept, keeps = state["config"].get("keep_aspect"), m["params"]["keep_aspect"]
    if made is not None and (made, kept) != (here, keeps):  # models from before it was recorded: unknown
        differ = (
            f"the model was trained on shards made with resize {made} (keep_aspect {kept}), the val "
            f"shards in '{cfg.data}' were made with resize {here} (keep_aspect {keeps})"
        )
        if not cfg.allow_stale:
            raise StageError(
                f"{differ[0].upper()}{differ[1:]}: rerun python -m pipelines shard --data {cfg.data} "
                f"--split val --resize {made}{' --keep-aspect' if kept else ''}, or pass "
                "--allow-stale to evaluate on them as they are."
            )
        stale.append(differ)
    return m, stale


def run(cfg: EvaluateConfig) -> dict:
    from .cluster import ensure_ray

    t0 = time.monotonic()
    if sum(map(bool, (cfg.run_id, cfg.checkpoint, cfg.model))) != 1:
        raise StageError("Give exactly one of --run-id ID, --checkpoint PATH or --model URI.")
    if cfg.run_id or cfg.model:
        tracking.check_reachable()
    cfg, model_id = _of_model(cfg) if cfg.model else (cfg, None)
    ckpt_dir = _checkpoint_dir(cfg)
    state = checkpoint.load(ckpt_dir)
    m, stale = _val_shards(cfg, state)
    urls = contract.shard_urls(cfg.data, "val", m)
    import torch

    args = (state, urls, cfg.ten_crop, cfg.batch_size, cfg.loader_workers)
    local_gpu = torch.cuda.is_available() and cfg.gpu is not False
    counts = None
    if not local_gpu and cfg.gpu is not False and (on_cluster() or _ray_running()):
        # A driver on a CPU head node: 50,000 images x 10 crops belong on a GPU worker.
        ray = ensure_ray()
        if ray.cluster_resources().get("GPU", 0) >= 1:
            counts = ray.get(ray.remote(num_gpus=1)(evaluate).remote(*args, True))
    if counts is None:
        if cfg.gpu and not local_gpu:
            raise StageError("--gpu: no GPU in this process or the Ray cluster; leave --gpu out to use the CPU.")
        counts = evaluate(*args, local_gpu)
    if counts["images"] == 0:
        raise StageError(f"The val shards in '{cfg.data}' hold no images.")
    top1, top5 = counts["hits1"] / counts["images"], counts["hits5"] / counts["images"]
    prefix = "eval_10crop" if cfg.ten_crop else "eval"
    eval_run = None
    if cfg.run_id:  # the run's, and the model's when one was named
        metrics, val = {f"{prefix}_top1": top1, f"{prefix}_top5": top5}, (contract.dataset_name("val"), m["digest"])
        tracking.log_metrics_once(cfg.run_id, metrics, step=state["epoch"], model_id=model_id, dataset=val)
        eval_run = _record(cfg, ckpt_dir, state, counts, top1, top5, time.monotonic() - t0, stale)
    seconds = time.monotonic() - t0
    return {
        "stage": "evaluate",
        "data": cfg.data,
        "run_id": cfg.run_id,
        **({"model": cfg.model, "model_id": model_id} if model_id else {}),
        "epoch": state["epoch"],
        "top1": top1,
        "top5": top5,
        "images": counts["images"],
        "crops": 10 if cfg.ten_crop else 1,
        "seconds": round(seconds, 2),
        "images_per_second": round(counts["images"] / max(seconds, 1e-9), 1),
        "input_digest": m["digest"],
        "evaluation_run_id": eval_run,
        **({"allowed_stale": stale} if stale else {}),
    }


def _record(
    cfg: EvaluateConfig,
    ckpt_dir: str,
    state: dict,
    counts: dict,
    top1: float,
    top5: float,
    seconds: float,
    stale: list[str],
) -> str:
    """This evaluation as a run of its own, nested under the training run: its metrics, the
    per-class accuracy, the confusion matrix and the most confused pairs with example keys."""
    classes = contract.read_classes(cfg.data)
    name = "evaluate-10crop" if cfg.ten_crop else "evaluate"
    tags = {"pipelines.evaluates": cfg.run_id, "pipelines.checkpoint": ckpt_dir, "pipelines.data": cfg.data}
    run_id = tracking.start_child_run(cfg.run_id, name, "evaluate", tags={**tags, **tracking.allowed_stale_tag(stale)})
    try:
        params = {"ten_crop": cfg.ten_crop, "epoch": state["epoch"], "images": counts["images"]}
        tracking.log_params(run_id, {**params, "checkpoint": ckpt_dir, "data": cfg.data})
        tracking.log_metrics_once(run_id, {"top1": top1, "top5": top5, "seconds": seconds}, step=state["epoch"])
        tracking.log_table(run_id, _per_class(classes, counts), "per_class_accuracy.json")
        tracking.log_table(run_id, _most_confused(classes, counts), "most_confused.json")
        figure = _confusion_figure(counts["labels"], counts["predicted"], classes)
        tracking.log_figure(run_id, figure, "confusion_matrix.png")
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    return run_id


def _per_class(classes: list[dict], counts: dict) -> list[dict]:
    """Each class's val images and top-1 accuracy (None for a class with no val image)."""
    from collections import Counter

    seen = Counter(counts["labels"])
    right = Counter(y for y, p in zip(counts["labels"], counts["predicted"]) if y == p)
    return [
        {
            "class_id": c,
            "wnid": classes[c]["wnid"],
            "name": classes[c]["name"],
            "images": seen[c],
            "top1": right[c] / seen[c] if seen[c] else None,
        }
        for c in range(len(classes))
    ]


def _most_confused(classes: list[dict], counts: dict, top: int = 50, examples_each: int = 5) -> list[dict]:
    """The ``top`` (true, predicted) pairs by images, each with up to ``examples_each`` keys."""
    from collections import Counter

    pairs = Counter((y, p) for y, p in zip(counts["labels"], counts["predicted"]) if y != p)
    examples: dict = {}
    for key, y, p in zip(counts["keys"], counts["labels"], counts["predicted"]):
        if y != p and len(examples.setdefault((y, p), [])) < examples_each:
            examples[(y, p)].append(key)
    return [
        {
            "true": classes[y]["name"],
            "true_wnid": classes[y]["wnid"],
            "predicted": classes[p]["name"],
            "predicted_wnid": classes[p]["wnid"],
            "images": k,
            "examples": " ".join(examples[(y, p)]),
        }
        for (y, p), k in pairs.most_common(top)
    ]


def _confusion_figure(labels: list[int], predicted: list[int], classes: list[dict]):
    """Rows: true class, columns: predicted, each row normalised to 1 (1,000 classes: a heat map
    without tick labels; up to 30: with their names)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(classes)
    m = np.zeros((n, n))
    np.add.at(m, (np.asarray(labels), np.asarray(predicted)), 1)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = 6 if n > 30 else max(4.0, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        names = [c["name"].split(",")[0][:18] for c in classes]
        ax.set_xticks(range(n), names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
    ax.set_title(f"{len(labels)} val images, each row sums to 1", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig
