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

import functools
import hashlib
import json
import sys
import time
from collections import deque

from . import lease, storage
from .cluster import check_parallel, counted_task, ensure_ray, on_cluster
from .common import digest, now_iso, raise_if_background_failed
from .config import SPLITS, IndexConfig
from .contract import ASSIGNMENT, BATCH, content_id, index_paths, rejects_with
from .errors import StageError, StrictFailure
from .sources import Item, Unit, expand, open_source, read_unit, where

# A run of 64 ImageNet images is ~7 MB of source: one GET that size costs about what one small
# GET does in latency, and 64 runs per 4,096-image shard still mix 64 classes in every shard.
RUN = 64
MIN_RUNS_PER_SHARD = 16

COLUMNS = ["key", "wnid", "label", "path", "member", "offset", "size", "sha256", "etag", "position", "shard"]


def split_digest(table) -> str:
    """What later stages depend on: which image (by content) goes where with which label.
    Paths are left out on purpose, so moving the source does not redo any shard.

    ``digest([(key, label, content id, shard), ...])`` of the rows in order (a table or a list
    of dicts), hashed a batch at a time: the same bytes without the whole list in memory."""
    import pyarrow as pa

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pylist(table) if table else None
    h, first = hashlib.sha256(b"["), True
    for start in range(0, table.num_rows if table is not None else 0, BATCH):
        first = _hash_rows(h, table.slice(start, BATCH), first)
    h.update(b"]")
    return h.hexdigest()


def _hash_rows(h, batch, first: bool) -> bool:
    c = batch.select(["key", "label", "sha256", "etag", "shard"]).to_pydict()
    for k, lab, sha, etag, sh in zip(c["key"], c["label"], c["sha256"], c["etag"], c["shard"]):
        h.update(
            (b"" if first else b",") + json.dumps([k, lab, content_id(sha, etag), sh], separators=(",", ":")).encode()
        )
        first = False
    return first


def _write_rows(url: str, table, order, samples_per_shard: int) -> str:
    """Write ``table``'s rows in ``order`` (row i gets position i) to the split's parquet file, a
    batch at a time: neither a sorted copy of the table nor the file is ever whole in memory.
    Returns the split digest, hashed over the same batches."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    h, first = hashlib.sha256(b"["), True
    with storage.atomic_write(url) as f, pq.ParquetWriter(f, _schema()) as writer:
        for start in range(0, max(len(order), 1), BATCH):
            positions = np.arange(start, min(start + BATCH, len(order)), dtype=np.int64)
            batch = (
                take_rows(table, order[start : start + BATCH])
                .append_column("position", pa.array(positions))
                .append_column("shard", pa.array((positions // samples_per_shard).astype(np.int32)))
            )
            writer.write_table(batch.select(COLUMNS).cast(_schema()))
            first = _hash_rows(h, batch, first)
    h.update(b"]")
    return h.hexdigest()


def take_rows(table, rows):
    """``table.take(rows)`` chunk by chunk: pyarrow's take joins a table's chunks into a copy of
    the whole table first, on every call."""
    import numpy as np
    import pyarrow as pa

    batches = table.to_batches()
    if len(batches) <= 1:
        return table.take(pa.array(rows, type=pa.int64()))
    bounds = np.cumsum([0] + [b.num_rows for b in batches])
    chunk = np.searchsorted(bounds, rows, side="right") - 1
    by_chunk = np.argsort(chunk, kind="stable")
    pieces = [
        batches[c].take(pa.array(rows[by_chunk][chunk[by_chunk] == c] - bounds[c], type=pa.int64()))
        for c in np.unique(chunk)
    ]
    back = np.empty(len(rows), dtype=np.int64)
    back[by_chunk] = np.arange(len(rows))  # row i of the result is row back[i] of the pieces
    return pa.Table.from_batches(pieces, schema=table.schema).take(pa.array(back))


def run_length(samples_per_shard: int) -> int:
    """Images per run: 64 (one ranged GET per 64 images), but at least 16 runs per shard so small
    shards still mix classes; 1 (every image on its own) for shards under 32 images."""
    return max(1, min(RUN, samples_per_shard // MIN_RUNS_PER_SHARD))


class _Rows:
    """A split's accepted images as they are read, columnar: Python objects for at most BATCH
    rows at a time, pyarrow arrays (~170 bytes an image) for the rest. A dict per image (~1 KB)
    made the driver's memory grow by gigabytes on ImageNet."""

    FIELDS = ("key", "wnid", "label", "path", "member", "offset", "size", "sha256", "etag", "seq")

    def __init__(self):
        self.batches, self.n = [], 0
        self._cols = {f: [] for f in self.FIELDS}

    def append(self, item: Item, label: int, seq: int) -> None:
        for f, v in zip(
            self.FIELDS,
            (item.key, item.wnid, label, item.path, item.member, item.offset, item.size, item.sha256, item.etag, seq),
        ):
            self._cols[f].append(v)
        self.n += 1
        if len(self._cols["key"]) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._cols["key"]:
            types = {"label": pa.int32(), "offset": pa.int64(), "size": pa.int64(), "seq": pa.int64()}
            arrays = [pa.array(self._cols[f], types.get(f, pa.string())) for f in self.FIELDS]
            # A class's images share their wnid and (tars) their path: stored once per batch.
            arrays = [a.dictionary_encode() if f in ("wnid", "path") else a for f, a in zip(self.FIELDS, arrays)]
            self.batches.append(pa.table(arrays, names=list(self.FIELDS)).cast(_memory_schema()))
            self._cols = {f: [] for f in self.FIELDS}

    def table(self):
        """The rows, a chunk per batch (joining them would copy every row once more)."""
        import pyarrow as pa

        self._flush()
        batches, self.batches = self.batches, []
        return pa.concat_tables(batches) if batches else _memory_schema().empty_table()


@functools.cache
def _schema():
    """The index file's columns (the data contract)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("wnid", pa.string()),
            ("label", pa.int32()),
            ("path", pa.string()),
            ("member", pa.string()),
            ("offset", pa.int64()),
            ("size", pa.int64()),
            ("sha256", pa.string()),
            ("etag", pa.string()),
            ("position", pa.int64()),
            ("shard", pa.int32()),
        ]
    )


@functools.cache
def _memory_schema():
    import pyarrow as pa

    d = pa.dictionary(pa.int32(), pa.string())
    return pa.schema(
        [
            ("key", pa.string()),
            ("wnid", d),
            ("label", pa.int32()),
            ("path", d),
            ("member", pa.string()),
            ("offset", pa.int64()),
            ("size", pa.int64()),
            ("sha256", pa.string()),
            ("etag", pa.string()),
            ("seq", pa.int64()),
        ]
    )


def _seeded_hashes(keys, seed: int):
    """sha256(f"{seed}:{key}") of every key, as a numpy array of 32-byte strings."""
    import numpy as np

    out = np.empty(len(keys), dtype="S32")
    i = 0
    for chunk in keys.chunks if hasattr(keys, "chunks") else [keys]:
        for k in chunk.to_pylist():
            out[i] = hashlib.sha256(f"{seed}:{k}".encode()).digest()
            i += 1
    return out


def _position_order(table, seed: int, samples_per_shard: int):
    """Give each row its place: runs of neighbouring images in a seeded order, cut into shards,
    each shard's images in a seeded order of their own. Depends only on (seed, keys, locality).
    Returns the rows' order: ``table``'s row numbers, position 0 first."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    # Where an image sits in the source: tar members by their offset, loose files by key (each
    # is its own object, so any order reads the same; key order matches the tars' member order).
    # Paths as their rank among the distinct paths (-1: not a tar), not as a string per row.
    path = table["path"].combine_chunks()
    if not pa.types.is_dictionary(path.type):
        path = path.dictionary_encode()
    names = path.dictionary.cast(pa.string())
    rank = np.empty(len(names), dtype=np.int64)
    rank[pc.sort_indices(names).to_numpy()] = np.arange(len(names))
    rank[~pc.ends_with(names, ".tar").to_numpy(zero_copy_only=False)] = -1
    p = rank[path.indices.to_numpy(zero_copy_only=False)] if n else np.empty(0, dtype=np.int64)
    located = pc.sort_indices(
        pa.table({"p": p, "o": np.where(p >= 0, table["offset"].to_numpy(), 0), "k": table["key"]}),
        sort_keys=[("p", "ascending"), ("o", "ascending"), ("k", "ascending")],
    ).to_numpy()
    del path, p
    h = _seeded_hashes(table["key"], seed)
    run = run_length(samples_per_shard)
    firsts = located[0::run]
    runs = np.argsort(h[firsts], kind="stable")  # stable, as sorted() is: equal hashes keep their order
    ordered = np.concatenate([located[r * run : (r + 1) * run] for r in runs]) if n else located
    final = np.empty(n, dtype=np.int64)
    for start in range(0, n, samples_per_shard):
        part = ordered[start : start + samples_per_shard]
        final[start : start + len(part)] = part[np.argsort(h[part], kind="stable")]
    return final


def _collect(items, label: dict[str, int], progress_label: str):
    """Accepted images (a table, duplicates of an earlier key left out) and the rejects, in the
    order the items came."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rows, rejects = _Rows(), []
    started = last = time.monotonic()
    nbytes, seq = 0, 0
    for item in items:
        item: Item
        seq += 1
        if item.reject is None and item.size == 0:
            item.reject = "empty file (0 bytes)"
        if item.reject:
            rejects.append((seq, {"split": item.split, "key": item.key, "reason": item.reject, "source": item.where}))
            continue
        nbytes += item.size
        rows.append(item, label[item.wnid], seq)
        now = time.monotonic()
        if now - last > 2:
            last = now
            raise_if_background_failed()  # (the stage's MLflow run could not be opened)
            print(
                f"{progress_label}: {rows.n} images, {nbytes / 1e6 / (now - started):.0f} MB/s, "
                f"{len(rejects)} rejected",
                file=sys.stderr,
                flush=True,
            )
    table = rows.table()
    # A key seen before is a duplicate: the first wins, the others are rejected naming it.
    by_key = pc.sort_indices(table, sort_keys=[("key", "ascending"), ("seq", "ascending")]).to_numpy()
    keys = table["key"].take(pa.array(by_key))
    same = np.zeros(len(by_key), dtype=bool)
    if len(by_key) > 1:
        same[1:] = pc.equal(keys.slice(1), keys.slice(0, len(by_key) - 1)).to_numpy(zero_copy_only=False)
    if same.any():
        first = by_key[np.maximum.accumulate(np.where(same, 0, np.arange(len(by_key))))]
        for dup, orig in zip(by_key[same], first[same]):
            d, o = table.slice(int(dup), 1).to_pylist()[0], table.slice(int(orig), 1).to_pylist()[0]
            rejects.append(
                (
                    d["seq"],
                    {
                        "split": None,
                        "key": d["key"],  # the caller names the split
                        "reason": f"duplicate key: also at {o['member']}",
                        "source": where(d["path"], d["member"]),
                    },
                )
            )
        table = table.filter(pa.array(~np.isin(np.arange(table.num_rows), by_key[same])))
    rejects.sort(key=lambda r: r[0])
    return table, [r for _, r in rejects]


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

    def take() -> tuple[list, int]:
        """The next part's items, and 1 if they came from a task (0: listed, read here)."""
        part = pending.popleft()
        if isinstance(part, Item):
            return [part], 0
        try:
            done = ray.get(part)
        except Exception as e:  # noqa: BLE001 - a StageError inside the task is the user's error
            if isinstance(getattr(e, "cause", None), StageError):
                raise e.cause from None
            raise
        gets[0] += done["gets"]
        nodes[done["node"]] = nodes.get(done["node"], 0) + 1
        return done["result"], 1

    for part in parts:
        if isinstance(part, Unit):
            pending.append(remote.remote(read_unit, (part, threads)))
            in_flight += 1
        else:
            pending.append(part)
        while in_flight > window:
            items, finished = take()
            in_flight -= finished
            yield from items
    while pending:
        yield from take()[0]


def _limit(table, per_class: int):
    """The first ``per_class`` images of each class, by key."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    by_key = pc.sort_indices(table, sort_keys=[("key", "ascending")]).to_numpy()
    classes = table["label"].to_numpy()[by_key]
    order = np.argsort(classes, kind="stable")  # by class, each class by key
    sorted_classes = classes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_classes)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)])) if len(order) else order
    keep = np.sort(by_key[order[rank < per_class]])
    return table.take(pa.array(keep))


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
    check_parallel(cfg.parallel)
    storage.check_url(cfg.data)
    return open_source(cfg.source, cfg.layout, cfg.read_threads)


def _run(cfg: IndexConfig) -> dict:
    t0 = time.monotonic()
    src = check(cfg)
    out = index_paths(cfg.data)
    lease.remember(cfg.data, out["classes"], out["rejected"], out["record"])
    params = {
        "source": cfg.source,
        "layout": src.layout,
        "classes": cfg.classes,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "samples_per_shard": cfg.samples_per_shard,
        "assignment": ASSIGNMENT,
    }
    fingerprint = src.fingerprint()
    done = _made_before(cfg, out, params, fingerprint)
    if done is not None:
        summary = dict(done, skipped=True, seconds=round(time.monotonic() - t0, 2))
        _maybe_strict(cfg.strict, summary)
        return summary

    classes = _chosen_classes(cfg, src)
    reads = {"tasks": 0, "gets": [0], "nodes": {}, "gets_before": storage.request_counts().get("GetObject", 0)}
    counts, digests, all_rejects = {}, {}, []
    for split in SPLITS:
        rows, rejects, digests[split] = _index_split(cfg, src, split, classes, out[split], reads)
        counts.update({split: rows, f"{split}_rejected": len(rejects)})
        all_rejects += rejects
    # The summary first: its count of GETs is the reading's, not the documents' below
    summary = _summary(cfg, src, classes, counts, all_rejects, reads, fingerprint, digests, t0)
    # Each written only if still the version this run found at its start (pipelines/lease.py)
    lease.write(cfg.data, out["classes"], storage.json_bytes([{"index": i, **c} for i, c in enumerate(classes)]))
    lease.write(cfg.data, out["rejected"], rejects_with(cfg.data, "index", all_rejects))
    record = {
        "stage": "index",
        "params": params,
        "source_fingerprint": fingerprint,
        "digests": digests,
        "classes_digest": digest(classes),
        "ran_at": now_iso(),
        "summary": summary,
    }
    lease.write(cfg.data, out["record"], storage.json_bytes(record))
    _maybe_strict(cfg.strict, summary)
    return summary


def _made_before(cfg: IndexConfig, out: dict, params: dict, fingerprint: str) -> dict | None:
    """The summary of an earlier run with these parameters over this same source (None with --force)."""
    if cfg.force or not storage.exists(out["record"]):
        return None
    record = storage.read_json(out["record"])
    same = record.get("params") == params and record.get("source_fingerprint") == fingerprint
    return record["summary"] if same and all(storage.exists(out[s]) for s in SPLITS) else None


def _chosen_classes(cfg: IndexConfig, src) -> list[dict]:
    classes = src.classes()
    if cfg.classes:
        if cfg.classes > len(classes):
            raise StageError(f"--classes {cfg.classes}: the source has only {len(classes)} classes.")
        classes = classes[: cfg.classes]
    return classes


def _index_split(cfg: IndexConfig, src, split: str, classes: list[dict], url: str, reads: dict) -> tuple:
    """Read one split's images (Ray tasks or this process), order them, and write its parquet
    file: (images indexed, their rejects, the split's digest). ``reads`` counts tasks and GETs."""
    import pyarrow as pa
    import pyarrow.compute as pc

    label = {c["wnid"]: i for i, c in enumerate(classes)}
    wanted = set(label)
    parts = list(src.plan(split, wanted))
    units = [p for p in parts if isinstance(p, Unit)]
    on_ray = _use_ray(cfg, units)
    reads["tasks"] += len(units) if on_ray else 0
    items = (
        _on_ray(parts, cfg.read_threads, reads["gets"], reads["nodes"]) if on_ray else expand(parts, cfg.read_threads)
    )
    rows, rejects = _collect(items, label, f"index {split}")
    for r in rejects:
        r["split"] = split
    if cfg.limit:
        rows = _limit(rows, cfg.limit)
    order = _position_order(rows, cfg.seed, cfg.samples_per_shard)
    pa.default_memory_pool().release_unused()  # the sort's temporaries, before the write's
    lease.check(cfg.data)
    split_digest = _write_rows(url, rows, order, cfg.samples_per_shard)
    count = rows.num_rows
    missing = wanted - set(pc.unique(pc.cast(rows["wnid"], "string")).to_pylist())
    del rows, order
    # pyarrow's allocator keeps freed memory for reuse; the next split's Python objects
    # cannot use it, so give it back before reading that split.
    pa.default_memory_pool().release_unused()
    if count and missing:
        print(
            f"index {split}: warning: {len(missing)} classes have no images (e.g. {sorted(missing)[:3]})",
            file=sys.stderr,
        )
    return count, rejects, split_digest


def _summary(cfg, src, classes, counts, rejects, reads, fingerprint, digests, t0) -> dict:
    seconds = time.monotonic() - t0
    images = counts["train"] + counts["val"]
    nodes = sorted(reads["nodes"].items(), key=lambda kv: -kv[1])
    return {
        "stage": "index",
        "data": cfg.data,
        "layout": src.layout,
        "classes": len(classes),
        **counts,
        "rejected": len(rejects),
        "skipped": False,
        "seconds": round(seconds, 2),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        "ray_tasks": reads["tasks"],  # class tars / val tar / chunks of files read as Ray tasks (0: in this process)
        "nodes": [{"node": k, "units": v} for k, v in nodes],
        # S3 GET requests to read the source (this process and the tasks; listings not counted)
        "source_gets": reads["gets"][0] + storage.request_counts().get("GetObject", 0) - reads["gets_before"],
        "input_digest": fingerprint,
        "output_digest": digest(digests),
    }


def _maybe_strict(strict: bool, summary: dict) -> None:
    if strict and summary["rejected"]:
        raise StrictFailure(
            f"--strict: {summary['rejected']} inputs were rejected; their reasons are in "
            f"{index_paths(summary['data'])['rejected']}. The index itself was written.",
            summary,
        )
