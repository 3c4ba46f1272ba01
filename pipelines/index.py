"""Stage 1, index: ImageNet as the user holds it -> ROOT/classes.json + ROOT/index/{train,val}.parquet.

    python -m pipelines index --source /data/imagenet --data /data/alexnet [--classes 100 --limit 50]

One row per image: key, wnid, label, where its bytes are (path + offset + size: tar members are
read in place), their sha256 (or, for a loose S3 object, its listed ETag), its position in a
seeded shuffle and the shard it goes to.

Shards are made of *runs*: up to 64 images that sit next to each other in the source (in a tar,
consecutive members; loose files, consecutive keys). The runs are shuffled by hashing (seed,
first key) and dealt to shards, and inside a shard the images are ordered by hashing (seed,
key). So the shard stage reads a run with one large ranged GET instead of one request per image,
while each shard still mixes many classes (a 4,096-image shard holds 64 runs) and the training
loader mixes shards. Nothing depends on the order the source lists its files, and when a tar's
members are in key order (as ImageNet's are) the three layouts give the same shards.
Unusable inputs go to ROOT/index/rejected.jsonl with their reason.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import defaultdict, deque

from . import lease, storage
from .common import StageError, StrictFailure, counted_task, digest, ensure_ray, now_iso, on_cluster
from .config import SPLITS, IndexConfig
from .sources import Item, Unit, expand, open_source, read_unit

# A run of 64 ImageNet images is ~7 MB of source: one GET that size costs about what one small
# GET does in latency, and 64 runs per 4,096-image shard still mix 64 classes in every shard.
RUN = 64
MIN_RUNS_PER_SHARD = 16
ASSIGNMENT = 2  # bump when the way images are dealt to shards changes: an old index is redone

COLUMNS = ["key", "wnid", "label", "path", "member", "offset", "size", "sha256", "etag", "position", "shard"]
REJECTED = "index/rejected.jsonl"


def paths(data: str) -> dict[str, str]:
    """Where this stage's outputs live under ROOT (the data contract)."""
    return {
        "classes": storage.join(data, "classes.json"),
        "record": storage.join(data, "index", "index.json"),
        "rejected": storage.join(data, REJECTED),
        **{split: storage.join(data, "index", f"{split}.parquet") for split in SPLITS},
    }


def content_id(row: dict) -> str:
    """What identifies an image's bytes: their sha256, or for a loose S3 object the ETag its
    listing gave (S3 derives it from the content, so a changed image gets a new one)."""
    return row["sha256"] or f"etag:{row['etag']}"


def split_digest(rows: list[dict]) -> str:
    """What later stages depend on: which image (by content) goes where with which label.
    Paths are left out on purpose, so moving the source does not redo any shard."""
    return digest([(r["key"], r["label"], content_id(r), r["shard"]) for r in rows])


def read_rows(data: str, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    url = paths(data)[split]
    if not storage.exists(url):
        raise StageError(f"'{url}' is missing: run the index stage first "
                         f"(python -m pipelines index --source SRC --data {data}).")
    return pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pylist()


def _write_rows(url: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("key", pa.string()), ("wnid", pa.string()), ("label", pa.int32()), ("path", pa.string()),
        ("member", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),
        ("sha256", pa.string()), ("etag", pa.string()), ("position", pa.int64()), ("shard", pa.int32())]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(url, buf.getvalue())


def read_rejects(data: str) -> list[dict]:
    url = paths(data)["rejected"]
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


def write_rejects(data: str, stage: str, entries: list[dict], splits=SPLITS) -> None:
    """Replace ``stage``'s lines for ``splits`` in rejected.jsonl, keeping every other line."""
    kept = [r for r in read_rejects(data) if not (r["stage"] == stage and r["split"] in splits)]
    lines = kept + [dict(e, stage=stage) for e in entries]
    storage.write_if_changed(paths(data)["rejected"],
                        "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines).encode())


def run_length(samples_per_shard: int) -> int:
    """Images per run: 64 (one ranged GET per 64 images), but at least 16 runs per shard so small
    shards still mix classes; 1 (every image on its own) for shards under 32 images."""
    return max(1, min(RUN, samples_per_shard // MIN_RUNS_PER_SHARD))


def _locality(row: dict) -> tuple:
    """Where an image sits in the source: tar members by their offset, loose files by key (each
    is its own object, so any order reads the same; key order matches the tars' member order)."""
    return (row["path"], row["offset"], row["key"]) if row["path"].endswith(".tar") else ("", 0, row["key"])


def _position_order(rows: list[dict], seed: int, samples_per_shard: int) -> None:
    """Give each row its place: runs of neighbouring images in a seeded order, cut into shards,
    each shard's images in a seeded order of their own. Depends only on (seed, keys, locality)."""
    def h(key: str) -> bytes:
        return hashlib.sha256(f"{seed}:{key}".encode()).digest()

    run = run_length(samples_per_shard)
    located = sorted(rows, key=_locality)
    runs = sorted((located[i:i + run] for i in range(0, len(located), run)), key=lambda r: h(r[0]["key"]))
    ordered = [row for r in runs for row in r]
    for start in range(0, len(ordered), samples_per_shard):
        shard = sorted(ordered[start:start + samples_per_shard], key=lambda row: h(row["key"]))
        for pos, row in enumerate(shard, start):
            row["position"] = pos


def _collect(items, label: dict[str, int], progress_label: str):
    rows, rejects, seen = [], [], {}
    started = last = time.monotonic()
    nbytes = 0
    for item in items:
        item: Item
        if item.reject is None and item.size == 0:
            item.reject = "empty file (0 bytes)"
        if item.reject is None and item.key in seen:
            item.reject = f"duplicate key: also at {seen[item.key]}"
        if item.reject:
            rejects.append({"split": item.split, "key": item.key, "reason": item.reject,
                            "source": item.where})
            continue
        seen[item.key] = item.member
        nbytes += item.size
        row = item.as_row()
        del row["split"], row["reject"]
        row["label"] = label[item.wnid]
        rows.append(row)
        now = time.monotonic()
        if now - last > 2:
            last = now
            print(f"{progress_label}: {len(rows)} images, {nbytes / 1e6 / (now - started):.0f} MB/s, "
                  f"{len(rejects)} rejected", file=sys.stderr, flush=True)
    return rows, rejects


def _use_ray(cfg: IndexConfig, units: list[Unit]) -> bool:
    """Ray tasks on a cluster (RAY_ADDRESS: the driver may sit on a head with no CPUs to spare)
    or for a source large enough to repay starting a local Ray; else this process."""
    if cfg.parallel != "auto":
        return cfg.parallel == "ray" and bool(units)
    if not units:
        return False
    return on_cluster() or (len(units) > 1 and sum(u.nbytes for u in units) >= cfg.ray_min_bytes)


def _on_ray(parts: list, threads: int, gets: list[int], nodes: dict):
    """The items of ``parts`` in order, each unit read by a Ray task, a bounded number at once;
    adds the tasks' S3 GETs to ``gets[0]`` and counts their units per node in ``nodes``."""
    ray = ensure_ray()
    remote = ray.remote(num_cpus=1)(counted_task)
    window = max(32, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    in_flight = 0

    def take():
        nonlocal in_flight
        part = pending.popleft()
        if isinstance(part, Item):
            return [part]
        in_flight -= 1
        try:
            done = ray.get(part)
            gets[0] += done["gets"]
            nodes[done["node"]] = nodes.get(done["node"], 0) + 1
            return done["result"]
        except Exception as e:  # noqa: BLE001 - a StageError inside the task is the user's error
            if isinstance(getattr(e, "cause", None), StageError):
                raise e.cause from None
            raise

    for part in parts:
        if isinstance(part, Unit):
            pending.append(remote.remote(read_unit, (part, threads)))
            in_flight += 1
        else:
            pending.append(part)
        while in_flight > window:
            yield from take()
    while pending:
        yield from take()


def _limit(rows: list[dict], per_class: int) -> list[dict]:
    by_class = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["key"]):
        by_class[r["wnid"]].append(r)
    return [r for group in by_class.values() for r in group[:per_class]]


def run(cfg: IndexConfig) -> dict:
    """The stage, holding ROOT's lease (pipelines/lease.py): one writer per dataset root."""
    with lease.hold(cfg.data, "index"):
        return _run(cfg)


def check(cfg: IndexConfig):
    """Every flag and path, before any work or MLflow run; returns the opened source."""
    if cfg.samples_per_shard < 1:
        raise StageError(f"--samples-per-shard {cfg.samples_per_shard}: must be at least 1.")
    for name in ("classes", "limit"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise StageError(f"--{name} {value}: must be at least 1 (or leave it out for all).")
    if cfg.read_threads < 1:
        raise StageError(f"--read-threads {cfg.read_threads}: must be at least 1.")
    if cfg.parallel not in ("auto", "ray", "local"):
        raise StageError(f"--parallel {cfg.parallel!r}: expected auto, ray or local.")
    storage.check_url(cfg.data)
    return open_source(cfg.source, cfg.layout, cfg.read_threads)


def _run(cfg: IndexConfig) -> dict:
    t0 = time.monotonic()
    src = check(cfg)
    out = paths(cfg.data)
    params = {"source": cfg.source, "layout": src.layout, "classes": cfg.classes, "limit": cfg.limit,
              "seed": cfg.seed, "samples_per_shard": cfg.samples_per_shard, "assignment": ASSIGNMENT}
    fingerprint = src.fingerprint()

    if not cfg.force and storage.exists(out["record"]):
        record = storage.read_json(out["record"])
        if (record.get("params") == params and record.get("source_fingerprint") == fingerprint
                and all(storage.exists(out[s]) for s in SPLITS)):
            summary = dict(record["summary"], skipped=True, seconds=round(time.monotonic() - t0, 2))
            _maybe_strict(cfg.strict, summary)
            return summary

    classes = src.classes()
    if cfg.classes:
        if cfg.classes > len(classes):
            raise StageError(f"--classes {cfg.classes}: the source has only {len(classes)} classes.")
        classes = classes[: cfg.classes]
    label = {c["wnid"]: i for i, c in enumerate(classes)}
    wanted = set(label)

    counts, digests, all_rejects, tasks, gets, nodes = {}, {}, [], 0, [0], {}
    gets_before = storage.request_counts().get("GetObject", 0)
    for split in SPLITS:
        parts = list(src.plan(split, wanted))
        units = [p for p in parts if isinstance(p, Unit)]
        on_ray = _use_ray(cfg, units)
        tasks += len(units) if on_ray else 0
        items = _on_ray(parts, cfg.read_threads, gets, nodes) if on_ray else expand(parts, cfg.read_threads)
        rows, rejects = _collect(items, label, f"index {split}")
        if cfg.limit:
            rows = _limit(rows, cfg.limit)
        _position_order(rows, cfg.seed, cfg.samples_per_shard)
        rows.sort(key=lambda r: r["position"])
        for r in rows:
            r["shard"] = r["position"] // cfg.samples_per_shard
        _write_rows(out[split], rows)
        counts[split] = len(rows)
        counts[f"{split}_rejected"] = len(rejects)
        digests[split] = split_digest(rows)
        all_rejects += rejects
        missing = wanted - {r["wnid"] for r in rows}
        if rows and missing:
            print(f"index {split}: warning: {len(missing)} classes have no images "
                  f"(e.g. {sorted(missing)[:3]})", file=sys.stderr)

    storage.write_json(out["classes"], [{"index": i, **c} for i, c in enumerate(classes)])
    write_rejects(cfg.data, "index", all_rejects)
    seconds = time.monotonic() - t0
    images = counts["train"] + counts["val"]
    summary = {
        "stage": "index", "data": cfg.data, "layout": src.layout, "classes": len(classes),
        **counts, "rejected": len(all_rejects), "skipped": False, "seconds": round(seconds, 2),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        "ray_tasks": tasks,  # class tars / val tar / chunks of files read as Ray tasks (0: in this process)
        "nodes": [{"node": k, "units": v} for k, v in sorted(nodes.items(), key=lambda kv: -kv[1])],
        # S3 GET requests to read the source (this process and the tasks; listings not counted)
        "source_gets": gets[0] + storage.request_counts().get("GetObject", 0) - gets_before,
        "input_digest": fingerprint, "output_digest": digest(digests),
    }
    storage.write_json(out["record"], {
        "stage": "index", "params": params, "source_fingerprint": fingerprint,
        "digests": digests, "classes_digest": digest(classes), "ran_at": now_iso(), "summary": summary})
    _maybe_strict(cfg.strict, summary)
    return summary


def _maybe_strict(strict: bool, summary: dict) -> None:
    if strict and summary["rejected"]:
        raise StrictFailure(
            f"--strict: {summary['rejected']} inputs were rejected; their reasons are in "
            f"{paths(summary['data'])['rejected']}. The index itself was written.", summary)
