"""Stage 3, stats: the training shards -> ROOT/stats.json.

    python -m pipelines stats --data /data/alexnet

Per-channel mean and std (subtracted before training, paper section 2) and the eigen-
decomposition of the 3x3 RGB covariance (the paper's PCA colour augmentation, section 4.1),
with pixel values scaled to 0..1 and eigenvectors as columns, largest eigenvalue first.
One Ray task per shard returns sums; the driver reduces them in float64.
"""

from __future__ import annotations

import io
import tarfile
import time

import numpy as np

from . import lease, storage
from .cluster import TaskPool, check_parallel, prestart_local_pool, use_ray
from .common import Progress, digest, now_iso
from .config import StatsConfig
from .contract import read_manifest, require_current, shard_dir, stats_url
from .errors import StageError


def shard_sums(url: str) -> tuple[int, int, list, list]:
    """(images, pixels, per-channel sum, 3x3 sum of outer products) over one shard's JPEGs."""
    from PIL import Image

    images, pixels = 0, 0
    s = np.zeros(3)
    ss = np.zeros((3, 3))
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if not m.name.endswith(".jpg"):
                continue
            x = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")).reshape(-1, 3)
            images += 1
            pixels += len(x)
            # In pixel units (0..255), scaled once at the end: the sums are exact integers, and
            # skipping a float division per pixel doubles the stage's speed.
            s += x.sum(0, dtype=np.int64)
            f = x.astype(np.float64)
            ss += f.T @ f
    return images, pixels, (s / 255.0).tolist(), (ss / 255.0**2).tolist()


def reduce_sums(parts) -> dict:
    """Combine shard sums into mean, std and the covariance's eigen-decomposition."""
    images = sum(p[0] for p in parts)
    pixels = sum(p[1] for p in parts)
    if pixels == 0:
        raise StageError("The training shards hold no images: nothing to compute stats from.")
    s = np.sum([p[2] for p in parts], axis=0)
    ss = np.sum([p[3] for p in parts], axis=0)
    mean = s / pixels
    cov = ss / pixels - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending; columns are eigenvectors
    order = np.argsort(eigval)[::-1]  # the paper lists the principal component first
    eigval, eigvec = eigval[order], eigvec[:, order]
    eigvec = eigvec * np.sign(eigvec[0:1, :] + 1e-30)  # fix each sign so reruns are comparable
    return {
        "mean": mean.tolist(),
        "std": np.sqrt(np.diag(cov)).tolist(),
        "eigval": eigval.tolist(),
        "eigvec": eigvec.tolist(),
        "images": images,
        "pixels": pixels,
    }


def run(cfg: StatsConfig) -> dict:
    """The stage, holding ROOT's lease (pipelines/lease.py): one writer per dataset root."""
    with lease.hold(cfg.data, "stats"):
        return _run(cfg)


def check(cfg: StatsConfig) -> dict:
    """The training shards are there and complete, before any work or MLflow run; their manifest."""
    check_parallel(cfg.parallel)
    storage.check_url(cfg.data)
    manifest = read_manifest(cfg.data, "train")
    if manifest is None or not manifest["complete"]:
        state = "missing" if manifest is None else "incomplete"
        raise StageError(
            f"The training shards in '{cfg.data}' are {state}: run the shard stage first "
            f"(python -m pipelines shard --data {cfg.data} --split train)."
        )
    require_current(cfg.data, ["shard train"], "stats", cfg.allow_stale)
    return manifest


def _made_before(cfg: StatsConfig, manifest: dict) -> dict | None:
    """The stats an earlier run wrote from these same shards (None with --force)."""
    out = stats_url(cfg.data)
    if cfg.force or not storage.exists(out):
        return None
    old = storage.read_json(out)
    return old if old.get("input_digest") == manifest["digest"] else None


def warm_start(cfg: StatsConfig) -> None:
    """Start the local workers before the MLflow run, when this run will read shards in them."""
    manifest = check(cfg)
    if _made_before(cfg, manifest) is None:
        prestart_local_pool(cfg.parallel, lambda: manifest["bytes"], cfg.ray_min_bytes, cfg.num_cpus, __name__)


def _run(cfg: StatsConfig) -> dict:
    t0 = time.monotonic()
    manifest = check(cfg)
    out = stats_url(cfg.data)
    lease.remember(cfg.data, out)
    old = _made_before(cfg, manifest)
    if old is not None:
        return dict(old["summary"], skipped=True, seconds=round(time.monotonic() - t0, 2))

    urls = [storage.join(shard_dir(cfg.data, "train"), s["name"]) for s in manifest["shards"]]
    progress = Progress("stats", len(urls))
    parts = [None] * len(urls)  # in the shards' order, whatever order they finish in: float sums
    with TaskPool(use_ray(cfg.parallel, manifest["bytes"], cfg.ray_min_bytes), cfg.num_cpus, warm=__name__) as pool:
        # in another order round differently, and a rerun must write the same bytes
        pending = {pool.submit(shard_sums, (u,)): i for i, u in enumerate(urls)}  # a shard's sums are a few numbers
        while pending:
            for handle in pool.done(pending):
                part = parts[pending.pop(handle)] = pool.result(handle)["result"]
                progress.update(1, part[0])
    result = reduce_sums(parts)
    seconds = time.monotonic() - t0
    summary = {
        "stage": "stats",
        "data": cfg.data,
        "images": result["images"],
        "shards": len(urls),
        "skipped": False,
        "seconds": round(seconds, 2),
        "images_per_second": round(result["images"] / max(seconds, 1e-9), 1),
        "input_digest": manifest["digest"],
        "output_digest": digest(result),
    }
    if cfg.allow_stale:  # check() let them through: the run says which
        summary["allowed_stale"] = require_current(cfg.data, ["shard train"], "stats", True)
    doc = {**result, "input_digest": manifest["digest"], "ran_at": now_iso(), "summary": summary}
    lease.write(cfg.data, out, storage.json_bytes(doc))  # only if still the stats.json this run found at its start
    return summary
