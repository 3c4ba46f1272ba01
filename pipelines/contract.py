"""The data contract between the stages: where each document lives under a dataset ROOT, how it
reads, and whether it is current for the inputs it was made from.

    ROOT/classes.json                        index   [{index, wnid, name}, ...] in label order
    ROOT/index/index.json                    index   its record: params, a digest per split, counts
    ROOT/index/{train,val}.parquet           index   one row per image (where its bytes are, its shard)
    ROOT/index/rejected.jsonl                index, shard   quarantined inputs, each with its reason
    ROOT/shards/{split}/{split}-NNNNNN.tar   shard   webdataset shards (+ .idx.json sample indexes)
    ROOT/shards/{split}.json                 shard   the manifest: params, shards, digest, index_digest
    ROOT/stats.json                          stats   mean, std, RGB eigen-decomposition, input_digest
    ROOT/runs/NAME/                          train   a training run's checkpoints, heartbeats, cost clocks
    ROOT/runs/NAME/{sweep,progress}.json     sweep   a sweep's summary once it ended; its counts until then

Each document names the digest of what it was made from, so "is it current?" is a comparison:
shards against the index record, stats against the train manifest. Every stage imports this
module, never another stage, and the consumers ask ``require_current`` before any work, the
same question ``status`` answers for people.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os

from . import storage
from .common import digest
from .config import SPLITS
from .errors import StageError

ASSIGNMENT = 2  # bump when the way images are dealt to shards changes: an old index is redone
BATCH = 8192  # index rows turned into Python objects at once when read, written or hashed
REJECTED = "index/rejected.jsonl"


SWEEP_SUMMARY, SWEEP_PROGRESS = "sweep.json", "progress.json"  # in a sweep's folder, ROOT/runs/NAME


# --- where things are ---------------------------------------------------------------------------
def index_paths(data: str) -> dict[str, str]:
    """The index stage's outputs under ROOT."""
    return {
        "classes": classes_url(data),
        "record": storage.join(data, "index", "index.json"),
        "rejected": storage.join(data, REJECTED),
        **{split: storage.join(data, "index", f"{split}.parquet") for split in SPLITS},
    }


def classes_url(data: str) -> str:
    return storage.join(data, "classes.json")


def shard_dir(data: str, split: str) -> str:
    return storage.join(data, "shards", split)


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def dataset_name(split: str) -> str:
    """The name a split's shards go by in MLflow (a run's inputs, its models' metrics)."""
    return f"imagenet-{split}-shards"


def manifest_url(data: str, split: str) -> str:
    return storage.join(data, "shards", f"{split}.json")


def stats_url(data: str) -> str:
    return storage.join(data, "stats.json")


# --- reading and writing the documents ----------------------------------------------------------
def _json_or_none(url: str):
    return storage.read_json(url) if storage.exists(url) else None


def read_index_record(data: str) -> dict | None:
    return _json_or_none(index_paths(data)["record"])


def read_manifest(data: str, split: str) -> dict | None:
    return _json_or_none(manifest_url(data, split))


def read_stats(data: str) -> dict | None:
    return _json_or_none(stats_url(data))


def read_classes(data: str) -> list[dict]:
    url = classes_url(data)
    if not storage.exists(url):
        raise StageError(
            f"'{url}' is missing: run the index stage first (python -m pipelines index --source SRC --data {data})."
        )
    return storage.read_json(url)


def classes_digest(classes: list) -> str:
    """What a model's outputs mean: its classes' WNIDs in label order (names may be reworded)."""
    return digest([c["wnid"] if isinstance(c, dict) else c for c in classes])


def content_id(sha256: str | None, etag: str | None) -> str:
    """What identifies an image's bytes: their sha256, or for a loose S3 object the ETag its
    listing gave (S3 derives it from the content, so a changed image gets a new one)."""
    return sha256 or f"etag:{etag}"


def manifest_digest(params: dict, shards: list[dict]) -> str:
    """Identifies the shards' content (not when they were made): later stages key on it."""
    return digest([params, [(s["name"], s["samples"], s["checksum"]) for s in shards]])


def file_checksum(url: str) -> str:
    sha = hashlib.sha256()
    with storage.open_read(url) as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return f"sha256:{sha.hexdigest()}"


def codec_versions() -> dict:
    """The libraries that make a shard's bytes (decode, resize, JPEG encode). An upgrade may
    change those bytes, so the versions are part of every shard's digest: a rerun after one
    remakes the shards instead of mixing two encoders' output in one dataset."""
    from importlib.metadata import version

    return {lib: version(lib) for lib in ("torch", "torchvision", "pillow")}


def parquet_file(data: str, split: str):
    """The split's index file as a pyarrow ParquetFile, to read in parts (a row group holds BATCH rows)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(_index_source(data, split))


def _index_source(data: str, split: str):
    url = index_paths(data)[split]
    if not storage.exists(url):
        raise StageError(
            f"'{url}' is missing: run the index stage first (python -m pipelines index --source SRC --data {data})."
        )
    return url if not storage.is_s3(url) else io.BytesIO(storage.read_bytes(url))  # a local file: no copy


def read_index(data: str, split: str, columns: list[str] | None = None):
    """The split's index as a pyarrow Table (columnar: ~100 bytes an image, where a list of dicts
    takes ~1 KB). Paths repeat (a class tar holds ~1,300 images) and are dictionary-encoded."""
    import pyarrow.parquet as pq

    return pq.read_table(
        _index_source(data, split),
        columns=columns,
        read_dictionary=[c for c in ("path", "wnid") if columns is None or c in columns],
    )


def iter_index(data: str, split: str, columns: list[str]):
    """The split's index, ``columns`` only, a record batch (BATCH rows) at a time, in file order."""
    yield from parquet_file(data, split).iter_batches(batch_size=BATCH, columns=columns, use_threads=False)


def read_rejects(data: str) -> list[dict]:
    url = index_paths(data)["rejected"]
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


def rejects_url(data: str) -> str:
    return index_paths(data)["rejected"]


def rejects_with(data: str, stage: str, entries: list[dict], splits=SPLITS) -> bytes:
    """rejected.jsonl with ``stage``'s lines for ``splits`` replaced by ``entries``, every other
    line kept: the bytes for the stage to write."""
    kept = [r for r in read_rejects(data) if not (r["stage"] == stage and r["split"] in splits)]
    lines = kept + [dict(e, stage=stage) for e in entries]
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines).encode()


# --- is it current? -----------------------------------------------------------------------------
# Each answer: {"stage", "state": done | stale | missing, "reason", "doc": the document read}.
# `status` prints them; the stages that read a document refuse a stale one (require_current).
def _state(stage: str, doc, state: str = "done", reason: str = "") -> dict:
    return {
        "stage": stage,
        "state": state if doc is not None else "missing",
        "reason": reason if doc is not None else "never ran",
        "doc": doc,
    }


def index_state(data: str) -> dict:
    rec = read_index_record(data)
    if rec is None:
        return _state("index", None)
    lost = [s for s in (*SPLITS, "classes") if not storage.exists(index_paths(data)[s])]
    if lost:
        return _state("index", rec, "stale", f"output missing: {', '.join(lost)}")
    if rec["params"].get("assignment") != ASSIGNMENT:
        return _state(
            "index",
            rec,
            "stale",
            "made by an older version that dealt images to shards one by "
            "one: rerun the index stage (then shard) to read the source in runs",
        )
    return _state("index", rec)


def shard_state(data: str, split: str, index_record: dict | None, verify: bool = False) -> dict:
    """The split's shards against the index record they were made from, and against the files:
    sizes from one listing (a missing or truncated shard); with ``verify`` each sha256 too,
    which also finds bytes changed in place."""
    name, m = f"shard {split}", read_manifest(data, split)
    if m is None:
        return _state(name, None)
    if index_record is None or index_record["digests"].get(split) != m["index_digest"]:
        return _state(name, m, "stale", "the index changed since the shards were made")
    if not m["complete"]:
        return _state(name, m, "stale", f"incomplete: {len(m['shards'])} of {m['shards_expected']} shards")
    folder = shard_dir(data, split)
    sizes = {path: size for path, size, _ in storage.walk_files(folder)}
    damaged = [
        s["name"]
        for s in m["shards"]
        if sizes.get(s["name"]) != s["bytes"]
        or (verify and file_checksum(storage.join(folder, s["name"])) != s["checksum"])
    ]
    if damaged:
        return _state(
            name,
            m,
            "stale",
            f"{len(damaged)} of {len(m['shards'])} shards missing or changed on disk (e.g. {damaged[0]})",
        )
    made, here = m["params"].get("codecs") or {}, codec_versions()
    if made != here:
        diff = ", ".join(f"{k} {made.get(k, '?')} (here {v})" for k, v in here.items() if made.get(k) != v)
        return _state(name, m, "stale", f"made with {diff}: a shard rerun remakes them with this machine's")
    return _state(name, m)


def stats_state(data: str) -> dict:
    st, m = read_stats(data), read_manifest(data, "train")
    if st is not None and (m is None or m["digest"] != st["input_digest"]):
        return _state("stats", st, "stale", "the training shards changed since the stats were computed")
    return _state("stats", st)


def states(data: str, verify: bool = False) -> dict[str, dict]:
    """Every stage's state, by name: index, shard train, shard val, stats."""
    rec = read_index_record(data)
    found = [index_state(data), *(shard_state(data, s, rec, verify) for s in SPLITS), stats_state(data)]
    return {s["stage"]: s for s in found}


def state_of(data: str, stage: str, verify: bool = False) -> dict:
    """One stage's state by its name in ``states``."""
    if stage in ("index", "stats"):
        return index_state(data) if stage == "index" else stats_state(data)
    return shard_state(data, stage.removeprefix("shard "), read_index_record(data), verify)


RERUN = {
    "index": "python -m pipelines index --source SRC --data {data}",
    **{f"shard {s}": f"python -m pipelines shard --data {{data}} --split {s}" for s in SPLITS},
    "stats": "python -m pipelines stats --data {data}",
}


def require_current(data: str, reads: list[str], reader: str, allow_stale: bool) -> list[str]:
    """Before any work: the documents ``reader`` reads (stage names as ``states`` gives them)
    are current. A stale one stops it (a StageError, exit 2) naming the stage to rerun; with
    ``allow_stale`` it goes on, and the reasons come back for the run to record. Missing
    documents are left to the reader, whose own message says what to run first."""
    stale = [s for s in map(functools.partial(state_of, data), reads) if s["state"] == "stale"]
    reasons = [f"{s['stage']}: {s['reason']}" for s in stale]
    if stale and not allow_stale:
        first = stale[0]["stage"]
        raise StageError(
            f"{reader} reads stale inputs in '{data}' ({'; '.join(reasons)}): rerun {first.split()[0]} "
            f"first ({RERUN[first].format(data=data)}), or pass --allow-stale to {reader} on them "
            "as they are (the run records that it did)."
        )
    return reasons


def require_classes(data: str, model_config: dict, model_wnids: list[str] | None, reader: str) -> None:
    """A model's outputs mean ROOT's classes: the same WNIDs in the same label order (a model
    from before its classes were recorded: the same count). Otherwise a StageError naming both
    digests and the first labels that differ: an accuracy against other classes means nothing."""
    classes = read_classes(data)
    here, made, count = classes_digest(classes), model_config.get("classes_digest"), model_config["num_classes"]
    if count == len(classes) and made in (None, here):
        return
    ours = [c["wnid"] for c in classes]
    pairs = [
        f"label {i} is {a} in the model, {b} here" for i, (a, b) in enumerate(zip(model_wnids or [], ours)) if a != b
    ][:3]
    raise StageError(
        f"The model was trained on other classes than '{data}' holds: the model has {count} classes (digest "
        f"{made[:12] if made else 'not recorded'}), {classes_url(data)} has {len(classes)} (digest {here[:12]})"
        + (f"; {'; '.join(pairs)}" if pairs else "")
        + f". {reader} it with the dataset ROOT it was trained on."
    )


# --- what a reader of shards gets ---------------------------------------------------------------
def complete_shards(data: str, split: str, whole_root: bool = False) -> dict:
    """The split's manifest, once its shards are all made and each has its sample index (the
    loaders read samples through them); else a StageError naming the command that makes them
    (``whole_root``: shard every split, for a reader of both)."""
    fix = f"python -m pipelines shard --data {data}" + ("" if whole_root else f" --split {split}")
    m = read_manifest(data, split)
    if m is None or not m["complete"]:
        raise StageError(f"The {split} shards in '{data}' are missing or incomplete: run {fix}")
    unindexed = [s["name"] for s in m["shards"] if "index" not in s]
    if unindexed:  # shards from before sample indexes
        raise StageError(
            f"{len(unindexed)} {split} shard(s) in '{data}' have no sample index (first: {unindexed[0]}): "
            f"run {fix}, which adds the indexes without re-encoding any image."
        )
    return m


def shard_urls(data: str, split: str, manifest: dict) -> list[tuple[str, int]]:
    """(url, samples) of each of the split's shards, in the manifest's order; local paths absolute
    (Ray workers run in folders of their own)."""
    folder = shard_dir(data, split)
    if not storage.is_s3(folder):
        folder = os.path.abspath(folder)
    return [(storage.join(folder, s["name"]), s["samples"]) for s in manifest["shards"]]


def read_training_inputs(data: str, allow_stale: bool) -> dict:
    """What training reads from ROOT, checked before any worker starts: both splits' complete
    shards and the stats, all current (``allow_stale``: the reasons they are not come back as
    ``allowed_stale``), and the classes."""
    manifests = {split: complete_shards(data, split, whole_root=True) for split in SPLITS}
    stats = read_stats(data)
    if stats is None:
        raise StageError(f"'{stats_url(data)}' is missing: run python -m pipelines stats --data {data}")
    stale = require_current(data, ["shard train", "shard val", "stats"], "train", allow_stale)
    classes = read_classes(data)
    return {
        "train_shards": shard_urls(data, "train", manifests["train"]),
        "val_shards": shard_urls(data, "val", manifests["val"]),
        "stats": {k: stats[k] for k in ("mean", "std", "eigval", "eigvec")},
        "num_classes": len(classes),
        "classes_digest": classes_digest(classes),
        "wnids": [c["wnid"] for c in classes],
        "resize": manifests["train"]["params"]["resize"],
        "keep_aspect": manifests["train"]["params"]["keep_aspect"],
        "train_manifest": manifests["train"],
        "val_manifest": manifests["val"],
        "allowed_stale": stale,
        "classes_url": classes_url(data),
        "stats_url": stats_url(data),
    }


def sweep_states(data: str) -> list[dict]:
    """Each sweep whose folder is under ROOT/runs: ``done`` with its summary's counts and best
    trial, or ``started`` (running, or interrupted: a rerun resumes it) with its counts so far."""
    runs, found = storage.join(data, "runs"), []
    for name in storage.list_dir(runs):
        done, progress = (storage.join(runs, name, f) for f in (SWEEP_SUMMARY, SWEEP_PROGRESS))
        if storage.exists(done):
            doc = storage.read_json(done)
            best = doc.get("best") or {}
            counts = {k: doc[f"trials_{k}"] for k in ("finished", "stopped", "failed")}
            found.append(
                {
                    "sweep": name,
                    "state": "done",
                    "trials": len(doc["trials"]),
                    **counts,
                    "best_trial": best.get("name"),
                    "best_val_top1": best.get("best_val_top1"),
                }
            )
        elif storage.exists(progress):
            found.append({"sweep": name, "state": "started", **storage.read_json(progress)})
    return found
