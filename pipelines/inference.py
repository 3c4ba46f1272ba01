"""Batch prediction on Ray Data: every image of a source -> a Parquet dataset of top-5 answers.

    source, listed here in chunks of --chunk-images
      -> decode:   read, decode, resize and centre-crop a chunk        (Ray Data CPU tasks)
      -> classify: the model on the chunk's crops                      (an actor pool: --workers, --gpu)
      -> write:    the chunk's rows as OUT/part-NNNNN.parquet, whole   (Ray Data CPU tasks)

A source is a folder, an s3:// prefix, a list file (one path or URL a line) or a dataset ROOT
(its val shards). A file that is not an image, or that cannot be read, gets a row with its error
and no class; the others are answered. A file's label is its folder's name when that is one of
the model's WNIDs (ImageNet's train layout); a shard sample's is its own.

Streaming: the driver holds the list of chunks and one small count per chunk written, whatever
the source's size. Each chunk is one Parquet file written whole, so a killed run leaves whole
chunks, and the same command writes only the missing ones. OUT/_manifest.json records the
source's and the model's digests: a rerun over the same pair returns the recorded summary, and
another pair is refused rather than mixed in.
"""

from __future__ import annotations

import io
import json
import re

from . import answer, common, contract, storage, tarindex
from .errors import StageError

MANIFEST = "_manifest.json"  # "_": Parquet readers skip it when reading OUT as one dataset
PART = re.compile(r"part-(\d{5})\.parquet$")
FORMAT = 1


def part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


# --- the source: listed into chunks ---------------------------------------------------------


def is_dataset_root(source: str) -> bool:
    return storage.exists(contract.manifest_url(source, "val"))


def list_source(source: str, wnids: list[str], chunk_images: int) -> tuple[str, str, list[dict]]:
    """(kind, digest, chunks) of ``source``: kind 'shards', 'list' or 'files'; the digest changes
    when what would be read changes; each chunk a dict of what its decode task reads."""
    if is_dataset_root(source):
        return "shards", *_shard_chunks(source, wnids, chunk_images)
    if storage.is_dir(source):
        files = list(storage.walk_files(source))
        urls = [_join(source, rel) for rel, _, _ in files]
        return "files", common.digest(files), _file_chunks(urls, [rel for rel, _, _ in files], wnids, chunk_images)
    if storage.exists(source):
        text = storage.read_bytes(source).decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return "list", common.digest(lines), _file_chunks(lines, lines, wnids, chunk_images)
    raise StageError(f"--source {source}: no such folder, S3 prefix, list file or dataset ROOT.")


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel


def _label(path: str, wnid_ids: dict[str, int]) -> int:
    """The class of a file whose folder is named by a WNID (ImageNet's train layout), else -1."""
    parts = path.replace("\\", "/").split("/")
    return wnid_ids.get(parts[-2], -1) if len(parts) > 1 else -1


def _file_chunks(urls: list[str], keys: list[str], wnids: list[str], n: int) -> list[dict]:
    wnid_ids = {w: i for i, w in enumerate(wnids)}
    return [
        _chunk(
            i // n, urls=urls[i : i + n], keys=keys[i : i + n], labels=[_label(k, wnid_ids) for k in keys[i : i + n]]
        )
        for i in range(0, len(urls), n)
    ]


def _shard_chunks(root: str, wnids: list[str], n: int) -> tuple[str, list[dict]]:
    """The val shards, ``n`` samples a chunk, each chunk one byte range of one shard."""
    m = contract.complete_shards(root, "val")
    if [c["wnid"] for c in contract.read_classes(root)] != list(wnids):
        raise StageError(
            f"The model was trained on other classes than the dataset '{root}' holds: its val "
            "labels would be compared with another class list. Predict with a model trained on it."
        )
    chunks = []
    for url, _ in contract.shard_urls(root, "val", m):
        doc = tarindex.read(url)
        if doc is None:
            raise StageError(f"{url} has no sample index: rerun python -m pipelines shard --data {root} --split val.")
        offsets, sizes = doc["offsets"], doc["sizes"]
        for first in range(0, doc["samples"], n):
            last = min(first + n, doc["samples"]) - 1
            size = offsets[last] - offsets[first] + sizes[last]
            chunks.append(_chunk(len(chunks), shard=url, offset=offsets[first], size=size))
    return m["digest"], chunks


def _chunk(i: int, urls=(), keys=(), labels=(), shard: str = "", offset: int = 0, size: int = 0) -> dict:
    """One row of the chunk dataset (every chunk has every column: Ray Data wants one schema)."""
    return {
        "chunk": i,
        "urls": list(urls),
        "keys": list(keys),
        "labels": list(labels),
        "shard": shard,
        "offset": offset,
        "size": size,
    }


# --- the three steps, one chunk a batch --------------------------------------------------------


def _read(url: str):
    try:
        return storage.read_bytes(url)
    except Exception as e:  # noqa: BLE001 - gone since it was listed, refused: said for this file
        return f"cannot read it: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"


def decode(batch: dict, geometry: dict, stats: dict) -> dict:
    """A chunk's files (or shard range) -> its uint8 crops, and per image None or its error."""
    import numpy as np

    import model

    transform = model.EvalTransform.from_stats(stats, crop=geometry["crop"])
    (chunk,) = _rows(batch)
    if chunk["shard"]:
        samples = tarindex.parse_run(storage.read_range(chunk["shard"], chunk["offset"], chunk["size"]), chunk["shard"])
        keys, labels, data = [k for k, _, _ in samples], [y for _, _, y in samples], [j for _, j, _ in samples]
    else:
        keys, labels, data = chunk["keys"], chunk["labels"], [_read(u) for u in chunk["urls"]]
    found, errors = answer.crops([d for d in data if isinstance(d, bytes)], transform, geometry)
    errors = iter(errors)
    errors = [next(errors) if isinstance(d, bytes) else d for d in data]
    crop = geometry["crop"]
    stacked = np.stack([c.numpy() for c in found]) if found else np.zeros((0, 3, crop, crop), np.uint8)
    return _batch(chunk=chunk["chunk"], keys=keys, labels=labels, errors=[e or "" for e in errors], crops=stacked)


class Classify:
    """The model in one actor: built once from the weights' bytes, then a chunk's crops a call."""

    def __init__(self, weights, stats: dict, crop: int, gpu: bool, threads: int | None):
        import ray
        import torch

        import model

        from . import checkpoint

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        torch.set_num_threads(threads or _node_cpus())
        self.device = torch.device("cuda" if gpu else "cpu")
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        self.net = checkpoint.model_from_state(state).to(self.device).eval()
        self.transform = model.EvalTransform.from_stats(stats, crop=crop)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        (chunk,) = _rows(batch)
        crops = torch.from_numpy(np.array(chunk.pop("crops"))).to(self.device)  # a copy: Ray's is read-only
        top_p, top_i = answer.top5(self.net, crops, self.transform) if len(crops) else ([], [])
        return _batch(**chunk, top_p=top_p, top_i=top_i)


def _node_cpus() -> int:
    """The CPUs Ray counts on this actor's node."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return max(1, int(next(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == here)))


def write(batch: dict, out: str, classes: list[dict]) -> dict:
    """A chunk's answers -> OUT/part-NNNNN.parquet (written whole); returns the chunk's counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (chunk,) = _rows(batch)
    answers = iter(zip(chunk["top_p"], chunk["top_i"]))
    rows = []
    for key, label, error in zip(chunk["keys"], chunk["labels"], chunk["errors"]):
        said = answer.row(*next(answers), classes) if not error else answer.no_answer(error)
        rows.append({"key": key, **said, "label": int(label)})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buf)
    storage.write_bytes(_join(out, part_name(chunk["chunk"])), buf.getvalue())
    return _batch(**counts(rows), chunk=chunk["chunk"])


def counts(rows: list[dict]) -> dict:
    answered = [r for r in rows if not r["error"]]
    labeled = [r for r in answered if r["label"] >= 0]
    return {
        "images": len(rows),
        "errors": len(rows) - len(answered),
        "labeled": len(labeled),
        "hits1": sum(r["class_id"] == r["label"] for r in labeled),
        "hits5": sum(r["label"] in r["top5_class_ids"] for r in labeled),
    }


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("class_id", pa.int64()),
            ("wnid", pa.string()),
            ("name", pa.string()),
            ("probability", pa.float64()),
            ("top5_class_ids", pa.list_(pa.int64())),
            ("top5_wnids", pa.list_(pa.string())),
            ("top5_names", pa.list_(pa.string())),
            ("top5_probabilities", pa.list_(pa.float64())),
            ("error", pa.string()),
            ("label", pa.int64()),  # the class the source names (folder or shard), -1 when none
        ]
    )


SCHEMA = _schema()


def _rows(batch: dict) -> list[dict]:
    """A Ray Data batch (columns) -> its rows, with lists and plain values."""
    n = len(batch["chunk"])
    return [{k: _plain(v[i]) for k, v in batch.items()} for i in range(n)]


def _plain(value):
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _batch(**row) -> dict:
    """One row -> a Ray Data batch of one (each column a one-element list or array)."""
    import numpy as np

    out = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            out[k] = v[None]
        else:
            column = np.empty(1, dtype=object)
            column[0] = v
            out[k] = column
    return out


# --- the run: the manifest, the chunks left, the pipeline -------------------------------------


def read_manifest(out: str) -> dict | None:
    url = _join(out, MANIFEST)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def write_manifest(out: str, manifest: dict) -> None:
    storage.write_bytes(_join(out, MANIFEST), json.dumps(manifest, indent=1).encode())


def written(out: str) -> set[int]:
    """The chunks already in OUT (each part file is written whole, or not at all)."""
    return {int(m[1]) for name in storage.list_dir(out) if (m := PART.match(name))}


def actor_cpus(workers: int, gpu: bool, cpus: int | None) -> tuple[int, int | None]:
    """(the CPUs each model actor holds, its torch threads; None: a thread per CPU of its node).
    ``cpus`` (--cpus-per-worker) sets both. A lone actor on CPUs holds none: the decode tasks may
    then run on every core, and the OS shares the cores between them and the model's threads,
    which sleep when they wait (on 2 cores a 1-thread actor left a core mostly idle)."""
    if cpus is not None:
        return cpus, cpus
    return (1, 1) if gpu or workers > 1 else (0, None)


def run_chunks(chunks: list[dict], model: dict, out: str, workers: int, gpu: bool, cpus: int | None):
    """The chunks through decode -> classify -> write on Ray Data; yields each written chunk's
    counts as it lands (in no particular order). ``model``: weights (bytes), stats, classes, geometry.
    ``cpus``: --cpus-per-worker (actor_cpus)."""
    import logging

    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # this stage prints its own progress line
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    held, threads = actor_cpus(workers, gpu, cpus)
    weights = ray.put(model["weights"])  # once in the object store, not once per actor
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(
        decode, batch_size=1, num_cpus=1, fn_kwargs={"geometry": model["geometry"], "stats": model["stats"]}
    )
    ds = ds.map_batches(
        Classify,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
        fn_constructor_kwargs={
            "weights": weights,
            "stats": model["stats"],
            "crop": model["geometry"]["crop"],
            "gpu": gpu,
            "threads": threads,
        },
        num_cpus=held,
        num_gpus=1 if gpu else 0,
        # torch's threads sleep when they wait rather than spin: they share the cores with the
        # decode tasks (on 2 cores, two spinning threads gave 200 to 420 images/s run to run)
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
        # The weights, a chunk's activations and torch: reserved so that actors are not packed
        # past a node's memory. (A reservation of its own also keeps Ray Data from fusing the
        # decode into this actor, which would then decode and classify in turn, on one core.)
        memory=ACTOR_MEMORY,
    )
    # Writing a chunk is one small file: it holds no CPU, so it never waits behind a decode.
    ds = ds.map_batches(write, batch_size=1, num_cpus=0, fn_kwargs={"out": out, "classes": model["classes"]})
    yield from ds.iter_rows()


ACTOR_MEMORY = 2 << 30


def counts_of(out: str, chunks: list[int]) -> dict:
    """The summed counts of chunks already written (a killed run's), read back from their files."""
    import pyarrow.parquet as pq

    totals = dict.fromkeys(("images", "errors", "labeled", "hits1", "hits5"), 0)
    for chunk in chunks:
        found = counts(pq.read_table(io.BytesIO(storage.read_bytes(_join(out, part_name(chunk))))).to_pylist())
        totals = {k: v + found[k] for k, v in totals.items()}
    return totals
