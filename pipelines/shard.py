"""Stage 2, shard: ROOT/index/*.parquet -> ROOT/shards/<split>/<split>-NNNNNN.tar + <split>.json.

    python -m pipelines shard --data /data/alexnet [--split train] [--resize 256] [--quality 90]

One Ray task per shard (the local Ray, or the cluster in RAY_ADDRESS). Each task reads its images
in place from the source, in source order, neighbours merged into large ranged reads (one GET
per run of up to 64 tar members on S3) with several in flight; each image is decoded, made RGB,
resized as the paper does (shorter side 256, central 256x256 crop; ``--keep-aspect`` keeps the
whole image) and written as a baseline JPEG with ``__key__``, ``jpg`` and ``cls`` (webdataset's
layout). Shards are written atomically and
byte-for-byte reproducibly. Each shard records a digest of its inputs and parameters: a rerun
skips shards whose digest and file still match, so only missing or changed shards are redone.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
import tarfile
import time
from functools import partial

from . import contract, lease, storage, tarindex
from .cluster import TaskPool, check_parallel, prestart_local_pool, use_ray
from .common import Progress, digest, now_iso
from .config import SPLITS, ShardConfig
from .contract import (
    content_id,
    file_checksum,
    index_paths,
    iter_index,
    manifest_digest,
    manifest_url,
    parquet_file,
    read_index_record,
    read_manifest,
    read_rejects,
    rejects_url,
    rejects_with,
    require_current,
    shard_dir,
    shard_name,
)
from .errors import StageError, StrictFailure
from .images import decode_problem, prepare_image
from .sources import read_item, where

FORMAT_VERSION = 2  # bump when the bytes a shard holds change for the same parameters


# --- one shard --------------------------------------------------------------------------------
class _HashingWriter:
    """Passes writes through while computing the sha256 and the size of what was written."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    # Fixed metadata (mtime 0, root, read-only) so the same inputs give the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o444, 0, 0
    tar.addfile(info, io.BytesIO(payload))


# Reads merge neighbouring images whose gap is at most MERGE_GAP (tar headers and padding are
# 0.5-1.5 KB; an image or two of another shard costs less to read than a second request's
# latency) into ranges of at most MAX_READ, so a run of 64 ImageNet images (~7 MB) is one GET.
MERGE_GAP = 256 * 1024
MAX_READ = 32 * 1024 * 1024


def read_plan(rows: list[tuple]) -> list[tuple[str, int, int, list[int]]]:
    """The rows' byte ranges in source order, neighbours merged: [(path, start, end, row indices)]."""
    reads: list[list] = []
    for i in sorted(range(len(rows)), key=lambda i: (rows[i][2], rows[i][3])):
        path, offset, size = rows[i][2], rows[i][3], rows[i][4]
        last = reads[-1] if reads else None
        if last and last[0] == path and 0 <= offset - last[2] <= MERGE_GAP and offset + size - last[1] <= MAX_READ:
            last[2] = offset + size
            last[3].append(i)
        else:
            reads.append([path, offset, offset + size, [i]])
    return [tuple(r) for r in reads]


def _fetched(reads, threads: int):
    """Yield (read, bytes) in order while up to ``threads`` reads are in flight (S3 latency and
    disk waits overlap the decoding; only a few ranges are held in memory at once)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for r in reads:
            pending.append((r, pool.submit(read_item, r[0], r[1], r[2] - r[1])))
            if len(pending) >= threads:
                r0, f = pending.popleft()
                yield r0, f.result()  # an I/O error fails the task: not the images' fault
        while pending:
            r0, f = pending.popleft()
            yield r0, f.result()


def write_shard(url: str, rows: list[tuple], params: dict, input_digest: str, read_threads: int = 8) -> dict:
    """Make one shard and its sample index from (key, label, path, offset, size, member) rows;
    returns its manifest entry. The source is read in merged ranges in source order
    (:func:`read_plan`), the images are written in the rows' order: the bytes do not depend on
    how they were read."""
    out_jpg: list[bytes | None] = [None] * len(rows)
    problems: dict[int, str] = {}
    for (_, start, _, members), data in _fetched(read_plan(rows), read_threads):
        for i in members:
            offset, size = rows[i][3], rows[i][4]
            try:
                out_jpg[i] = prepare_image(
                    data[offset - start : offset - start + size],
                    params["resize"],
                    params["keep_aspect"],
                    params["quality"],
                )
            except Exception as e:  # noqa: BLE001 - any decode failure quarantines that image only
                problems[i] = decode_problem(e)
    rejected, samples = [], tarindex.Builder()
    with storage.atomic_write(url) as f:
        out = _HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (key, label, path, _, _, member) in enumerate(rows):
                if i in problems:
                    rejected.append({"key": key, "reason": problems[i], "source": where(path, member)})
                    continue
                start = tar.offset
                add_member(tar, f"{key}.jpg", out_jpg[i])
                add_member(tar, f"{key}.cls", str(label).encode())
                samples.add(key, label, start, tar.offset)
                out_jpg[i] = None  # written: let it go
    checksum = f"sha256:{out.sha.hexdigest()}"
    # After the tar: an index never describes a tar that is not there under its name.
    tarindex.write(url, samples.document(storage.basename(url), checksum))
    return {
        "name": storage.basename(url),
        "samples": len(samples.keys),
        "bytes": out.n,
        "checksum": checksum,
        "index": storage.basename(tarindex.index_url(url)),
        "input_digest": input_digest,
        "rejected": rejected,
    }


def add_index(url: str, entry: dict, remake: tuple) -> dict:
    """Give a shard made before sample indexes existed (or whose index was lost) its index, from
    its tar headers, re-encoding nothing; returns its manifest entry with the index named. The
    scan hashes the tar it reads: a tar whose bytes are not the manifest's (damaged in place,
    its size kept) is remade from the source by ``write_shard(*remake)`` instead, never indexed."""
    try:
        doc = tarindex.scan(url)
    except (tarfile.TarError, ValueError, UnicodeDecodeError) as e:
        doc = {"checksum": f"unreadable: {e}"}
    if doc["checksum"] != entry["checksum"] or doc["samples"] != entry["samples"]:
        return {**write_shard(*remake), "remade": True}
    tarindex.write(url, doc)
    return {**entry, "index": storage.basename(tarindex.index_url(url))}


# --- the stage --------------------------------------------------------------------------------
ROW_COLUMNS = ["key", "label", "path", "offset", "size", "member"]  # what a shard task reads by


def _plan(cfg: ShardConfig, split: str, params: dict):
    """Group the index rows into shards; sort them into those to keep and those to make.

    The index file holds its rows in position order, so a shard is a run of consecutive rows.
    The plan streams the file a batch at a time (the content hashes are never all in memory);
    a shard to make carries a ``rows()`` that reads its task's rows (what the task reads by)
    from the file when the task is sent. On S3 the index file itself is held in memory (~100
    bytes an image), as pyarrow reads it from there."""
    import numpy as np
    import pyarrow as pa

    old = {s["name"]: s for s in (read_manifest(cfg.data, split) or {}).get("shards", [])}
    keep, make, reindex, names = {}, [], [], []
    for i, first, end, d in _shard_digests(cfg, split, params):
        name = shard_name(split, i)
        names.append(name)
        url = storage.join(shard_dir(cfg.data, split), name)
        entry = old.get(name)
        # The image content (sha256), not its location, decides whether a shard is still right.
        if entry and entry["input_digest"] == d and _intact(url, entry, cfg.verify):
            if _indexed(url, entry, cfg.verify):
                keep[name] = entry
            else:  # a shard from before sample indexes, or its index lost: scan it, keep the tar
                reindex.append((name, url, entry, (first, end), d))
        else:
            make.append((name, url, (first, end), d))
    pa.default_memory_pool().release_unused()  # the first pass's buffers, before the second read
    source_bytes = 0
    if make or reindex:  # what the tasks read by (a reindex, to remake a damaged tar), read as they are sent
        located = _Located(cfg.data, split)
        ends = np.concatenate([[0], np.cumsum(located.sizes())])
        source_bytes = sum(int(ends[e] - ends[f]) for _, _, (f, e), _ in make)
        make = [(name, url, partial(located.rows, f, e), d) for name, url, (f, e), d in make]
        reindex = [(name, url, e, partial(located.rows, f, end), d) for name, url, e, (f, end), d in reindex]
    return keep, make, reindex, names, source_bytes


def _shard_digests(cfg: ShardConfig, split: str, params: dict):
    """(shard number, its first row, its end row, its input digest) for each shard, in order,
    reading the index file a batch at a time. Shard numbers are the index's own, or position //
    --samples-per-shard when that is given."""
    group_by = "position" if cfg.samples_per_shard is not None else "shard"
    current, first, row, rows = None, 0, 0, []
    for batch in iter_index(cfg.data, split, ["key", "label", "sha256", "etag", group_by]):
        c = batch.to_pydict()
        groups = c[group_by] if cfg.samples_per_shard is None else [p // cfg.samples_per_shard for p in c[group_by]]
        for k, lab, sha, etag, g in zip(c["key"], c["label"], c["sha256"], c["etag"], groups):
            if g != current:
                if current is not None:
                    if g < current:
                        raise StageError(
                            f"The index of '{cfg.data}' ({split}) is not in position order: rerun "
                            f"the index stage with --force."
                        )
                    yield current, first, row, digest([params, rows])
                current, first, rows = g, row, []
            rows.append((k, lab, content_id(sha, etag)))
            row += 1
    if current is not None:
        yield current, first, row, digest([params, rows])


class _Located:
    """Where each image of a split is (ROW_COLUMNS), read from the index file a row group at a
    time when a task needs its rows: the driver never holds them all. Tasks are sent in shard
    order, so the last group read is kept for the next shard, which mostly lies in it too."""

    def __init__(self, data: str, split: str):
        import numpy as np

        self.file = parquet_file(data, split)
        meta = self.file.metadata
        self.bounds = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._group = (None, None)

    def sizes(self):
        return self.file.read(columns=["size"], use_threads=False)["size"].to_numpy()

    def rows(self, first: int, end: int) -> list[tuple]:
        import numpy as np

        out = []
        for g in range(
            int(np.searchsorted(self.bounds, first, "right")) - 1, int(np.searchsorted(self.bounds, end - 1, "right"))
        ):
            if self._group[0] != g:
                self._group = (g, self.file.read_row_group(g, columns=ROW_COLUMNS, use_threads=False))
            lo, hi = max(first, self.bounds[g]) - self.bounds[g], min(end, self.bounds[g + 1]) - self.bounds[g]
            c = self._group[1].slice(int(lo), int(hi - lo)).to_pydict()
            out += zip(*(c[k] for k in ROW_COLUMNS))
        return out


def _args(url, rows, params, d, threads) -> tuple:
    return url, rows(), params, d, threads


def _reindex_args(url, entry, rows, params, d, threads) -> tuple:
    return url, entry, _args(url, rows, params, d, threads)


class _Tally:
    """What the shard tasks did: failures, images encoded, S3 GETs, {node: counts}, tars remade
    on rescan; and the progress line."""

    def __init__(self, tasks: int):
        self.failures, self.images, self.gets, self.nodes, self.remade = [], 0, 0, {}, []
        self.done, self.progress = 0, Progress("shard", tasks)

    def take(self, pool, handle, task: tuple, entries: dict) -> bool:
        """A finished task's result into ``entries`` (True), or its failure, named (False)."""
        split, name, encodes = task
        self.done += 1
        try:
            done_task = pool.result(handle)
        except Exception as e:  # noqa: BLE001 - reported at the end with the shard's name
            self.failures.append(f"{split}/{name}: {type(e).__name__}: {(str(e).splitlines() or [''])[-1][:300]}")
            self.progress.update(1, 0)
            return False
        entry = entries[split][name] = done_task["result"]
        if entry.pop("remade", False):  # a tar found damaged on rescan, remade from the source
            self.remade.append(f"{split}/{name}")
            encodes = True
        self.gets += done_task["gets"]
        node = self.nodes.setdefault(
            done_task["node"], {"node": done_task["node"], "ip": done_task["ip"], "shards": 0, "images": 0}
        )
        images = entry["samples"] + len(entry["rejected"]) if encodes else 0
        self.images += images
        node["shards"] += 1
        node["images"] += images
        self.progress.update(1, images)
        return True

    def result(self) -> dict:
        return {
            "failures": self.failures,
            "images": self.images,
            "gets": self.gets,
            "nodes": self.nodes,
            "remade": self.remade,
        }


def _shard_all(cfg, pool, todo, splits, plans, entries, params, index_digests, started) -> dict:
    """Run the shard tasks, at most ``pool.window`` in flight (the queue holds each shard's row
    list only once its task is sent); record each finished shard in the manifest within about a
    second. Ctrl-C (or SIGTERM) sends no more tasks, records the ones in flight as they finish,
    then raises KeyboardInterrupt saying how far it got; a second Ctrl-C stops at once."""
    tally = _Tally(len(todo))
    pending, queue, last_save, unsaved, stopping = {}, list(todo), 0.0, False, False

    def save() -> None:
        for split in splits:
            _save_manifest(cfg, split, params, index_digests[split], entries[split], plans[split][3], started)

    while queue or pending:
        try:
            while queue and len(pending) < pool.window:
                split, name, fn, args, encodes = queue.pop(0)
                pending[pool.submit(fn, args() if callable(args) else args)] = (split, name, encodes)
            # Wakes at least once a second, so a finished shard is recorded within about a second
            # even while the next one takes minutes.
            for handle in pool.done(pending):
                unsaved = tally.take(pool, handle, pending.pop(handle), entries) or unsaved
            # Record finished shards as they come (at most once a second), so a killed driver
            # loses about a second of work: the rerun redoes only shards not in the manifest.
            if unsaved and time.monotonic() - last_save >= 1:
                save()
                last_save, unsaved = time.monotonic(), False
        except KeyboardInterrupt:
            if stopping:
                raise
            stopping, queue = True, []
            print(
                f"\nshard: stopping: the {len(pending)} shard(s) in flight finish and are recorded "
                "(Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
    if stopping:
        save()
        raise KeyboardInterrupt(f"{tally.done - len(tally.failures)} of {len(todo)} shard tasks done and recorded")
    return tally.result()


def _indexed(url: str, entry: dict, verify: bool) -> bool:
    if "index" not in entry or not storage.exists(tarindex.index_url(url)):
        return False
    return not verify or (tarindex.read(url) or {}).get("checksum") == entry["checksum"]


def _intact(url: str, entry: dict, verify: bool) -> bool:
    st = storage.stat(url)
    if st is None or st[0] != entry["bytes"]:
        return False
    return not verify or file_checksum(url) == entry["checksum"]


def _save_manifest(cfg, split, params, index_digest, entries: dict, names: list[str], started) -> dict:
    """Write <split>.json; untouched when this run changed nothing in the split."""
    lease.check(cfg.data)  # still this run's ROOT: a run that lost its lease writes nothing more
    shards = [entries[n] for n in names if n in entries]
    old = read_manifest(cfg.data, split)
    if old and old["shards"] == shards and old["params"] == params:
        started = old["ran_at"]  # nothing was remade: the shards date from the earlier run
    complete = len(shards) == len(names)
    manifest = {
        "stage": "shard",
        "split": split,
        "params": params,
        "index_digest": index_digest,
        "complete": complete,
        "shards_expected": len(names),
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "rejected": sum(len(s["rejected"]) for s in shards),
        "digest": manifest_digest(params, shards),
        "ran_at": started,
        "shards": shards,
    }
    lease.write(cfg.data, manifest_url(cfg.data, split), storage.json_bytes(manifest))
    return manifest


def check(cfg: ShardConfig) -> tuple[str, ...]:
    """Every flag, and that the index is there, before any work or MLflow run; the splits."""
    check_flags(cfg)
    if read_index_record(cfg.data) is None:
        raise StageError(
            f"No index in '{cfg.data}': run the index stage first "
            f"(python -m pipelines index --source SRC --data {cfg.data})."
        )
    require_current(cfg.data, ["index"], "shard", cfg.allow_stale)
    return SPLITS if cfg.split == "all" else (cfg.split,)


def check_flags(cfg: ShardConfig) -> None:
    """The flags alone, which need no index yet (prepare checks them before its index)."""
    storage.check_url(cfg.data)
    if cfg.split not in (*SPLITS, "all"):
        raise StageError(f"Unknown split '{cfg.split}'. Expected one of: train, val, all.")
    if cfg.resize < 32:
        raise StageError(f"--resize {cfg.resize}: must be at least 32 px (the paper uses 256).")
    if not 1 <= cfg.quality <= 100:
        raise StageError(f"--quality {cfg.quality}: must be in 1..100 (90 is the default).")
    if cfg.samples_per_shard is not None and cfg.samples_per_shard < 1:
        raise StageError(f"--samples-per-shard {cfg.samples_per_shard}: must be at least 1.")
    if cfg.read_threads < 1:
        raise StageError(f"--read-threads {cfg.read_threads}: must be at least 1.")
    check_parallel(cfg.parallel)


def _params(cfg: ShardConfig) -> dict:
    """What a shard's bytes depend on besides its images."""
    return {
        "resize": cfg.resize,
        "keep_aspect": cfg.keep_aspect,
        "quality": cfg.quality,
        "format": FORMAT_VERSION,
        "codecs": contract.codec_versions(),
    }


def warm_start(cfg: ShardConfig) -> None:
    """Start the local workers before the MLflow run, when this run will encode images in them."""
    params, digests = _params(cfg), read_index_record(cfg.data)["digests"]
    todo = []
    for split in SPLITS if cfg.split == "all" else (cfg.split,):
        m = read_manifest(cfg.data, split)
        if not (m and m["complete"] and m["params"] == params and m["index_digest"] == digests[split]):
            todo.append(split)  # a split already made as asked (a rerun) needs no workers

    def source_bytes() -> int:
        return sum(int(_Located(cfg.data, s).sizes().sum()) for s in todo)

    if todo:
        prestart_local_pool(cfg.parallel, source_bytes, cfg.ray_min_bytes, cfg.num_cpus, __name__)


def run(cfg: ShardConfig) -> dict:
    """The stage, holding ROOT's lease (pipelines/lease.py): one writer per dataset root."""
    with lease.hold(cfg.data, "shard"):
        return _run(cfg)


def _run(cfg: ShardConfig) -> dict:
    t0 = time.monotonic()
    splits = check(cfg)
    started = now_iso()
    params = _params(cfg)
    index_digests = read_index_record(cfg.data)["digests"]
    plans = {}
    # Temp files a killed run left: of the manifests (ROOT/shards) and of the shards. This run
    # holds the root's lease, so no other writer's files are among them.
    lease.check(cfg.data)
    lease.remember(cfg.data, *(manifest_url(cfg.data, split) for split in splits), rejects_url(cfg.data))
    storage.remove_stale_temps(storage.join(cfg.data, "shards"))
    for split in splits:
        storage.remove_stale_temps(shard_dir(cfg.data, split))
        plans[split] = _plan(cfg, split, params)
    todo = _tasks(cfg, splits, plans, params)
    entries = {split: dict(plans[split][0]) for split in splits}
    done = {"failures": [], "images": 0, "gets": 0, "nodes": {}, "remade": []}
    if todo:
        on_ray = use_ray(cfg.parallel, sum(plans[s][4] for s in splits), cfg.ray_min_bytes)
        with TaskPool(on_ray, cfg.num_cpus, warm=__name__) as pool:
            done = _shard_all(cfg, pool, todo, splits, plans, entries, params, index_digests, started)
    manifests = {
        split: _finish_split(cfg, split, params, index_digests[split], entries[split], plans[split][3], started)
        for split in splits
    }
    summary = _summary(cfg, splits, plans, manifests, index_digests, todo, done, t0)
    if done["failures"]:
        raise StageError(
            f"{len(done['failures'])} shard(s) failed; the {summary['written']} finished are kept "
            f"and a rerun redoes only the rest. First: {done['failures'][0]}"
        )
    if cfg.strict and summary["rejected"]:
        raise StrictFailure(
            f"--strict: {summary['rejected']} inputs were rejected; reasons in "
            f"{index_paths(cfg.data)['rejected']}. The shards were written.",
            summary,
        )
    return summary


def _tasks(cfg: ShardConfig, splits, plans: dict, params: dict) -> list[tuple]:
    """One task each (Ray, or this machine's process pool): (split, shard name, the function,
    its arguments, whether it encodes images); the arguments as a function where they are a
    shard's row list: built when its task is sent."""
    todo = [
        (split, name, write_shard, partial(_args, url, rows, params, d, cfg.read_threads), True)
        for split in splits
        for name, url, rows, d in plans[split][1]
    ]
    return todo + [
        (split, name, add_index, partial(_reindex_args, url, entry, rows, params, d, cfg.read_threads), False)
        for split in splits
        for name, url, entry, rows, d in plans[split][2]
    ]


def _finish_split(cfg: ShardConfig, split: str, params, index_digest, entries: dict, names: list[str], started):
    """The split's manifest, written; once complete, shards of an earlier, larger grouping go."""
    m = _save_manifest(cfg, split, params, index_digest, entries, names, started)
    if m["complete"]:
        # Temp files of tasks lost with their node (Ray reran them elsewhere): this run holds
        # the root's lease, so no other writer's files are among them.
        lease.check(cfg.data)
        storage.remove_stale_temps(shard_dir(cfg.data, split))
        for name in storage.list_dir(shard_dir(cfg.data, split)):
            m_ = re.fullmatch(rf"({split}-\d{{6}})\.(tar|idx\.json)", name)
            if m_ and f"{m_.group(1)}.tar" not in names:
                storage.remove(storage.join(shard_dir(cfg.data, split), name))
    return m


def _summary(cfg: ShardConfig, splits, plans: dict, manifests: dict, index_digests: dict, todo, done: dict, t0) -> dict:
    """The run's counts; also records the splits' rejects in ROOT/index/rejected.jsonl."""
    shard_rejects = [
        dict(r, split=split) for split in splits for s in manifests[split]["shards"] for r in s["rejected"]
    ]
    lease.write(cfg.data, rejects_url(cfg.data), rejects_with(cfg.data, "shard", shard_rejects, splits))
    index_rejects = [r for r in read_rejects(cfg.data) if r["stage"] == "index" and r["split"] in splits]
    seconds, images, gets = time.monotonic() - t0, done["images"], done["gets"]
    summary = {
        "stage": "shard",
        "data": cfg.data,
        "splits": list(splits),
        "shards": sum(len(plans[s][3]) for s in splits),
        "written": len(todo) - len(done["failures"]) - sum(len(plans[s][2]) for s in splits) + len(done["remade"]),
        "indexed": sum(len(plans[s][2]) for s in splits) - len(done["remade"]),
        # tars whose bytes were not their manifest's when rescanned for an index: remade from the source
        "remade_damaged": done["remade"],
        "skipped": sum(len(plans[s][0]) for s in splits),
        "failed": len(done["failures"]),
        "samples": sum(m["samples"] for m in manifests.values()),
        "bytes": sum(m["bytes"] for m in manifests.values()),
        "rejected": len(shard_rejects) + len(index_rejects),
        "rejected_here": len(shard_rejects),
        "rejected_by_index": len(index_rejects),
        "seconds": round(seconds, 2),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        # S3 GET requests the shard tasks sent (0 for a local source), per image they encoded
        "source_gets": gets,
        "gets_per_image": round(gets / images, 4) if images else 0.0,
        "nodes": sorted(done["nodes"].values(), key=lambda n: -n["shards"]),  # which Ray nodes did the work
        "input_digest": {s: index_digests[s] for s in splits},
        "output_digest": {s: manifests[s]["digest"] for s in splits},
    }
    if cfg.allow_stale:  # check() let a stale index through: the run says which
        summary["allowed_stale"] = require_current(cfg.data, ["index"], "shard", True)
    return summary
