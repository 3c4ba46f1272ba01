"""What has been done to a dataset ROOT, and what a rerun would redo.

    python -m pipelines status --data /data/alexnet

Each stage is ``done`` (its outputs match its current inputs), ``stale`` (its inputs or
outputs changed since it ran: a rerun redoes the affected part) or ``missing`` (never ran).
"""
from __future__ import annotations

from . import index, shard, stats, storage
from .common import StageError
from .config import SPLITS, StatusConfig
from .sources import open_source


def _index_status(cfg: StatusConfig) -> dict:
    paths = index.paths(cfg.data)
    if not storage.exists(paths["record"]):
        return {"stage": "index", "state": "missing", "reason": "never ran"}
    rec = storage.read_json(paths["record"])
    out = {"stage": "index", "state": "done", "reason": "", "ran_at": rec["ran_at"],
           "counts": {k: rec["summary"][k] for k in ("classes", "train", "val", "rejected")},
           "params": rec["params"]}
    lost = [s for s in (*SPLITS, "classes") if not storage.exists(paths[s])]
    if lost:
        out.update(state="stale", reason=f"output missing: {', '.join(lost)}")
    elif rec["params"].get("assignment") != index.ASSIGNMENT:
        out.update(state="stale", reason="made by an older version that dealt images to shards one by one: "
                                         "rerun the index stage (then shard) to read the source in runs")
    elif cfg.check_source:
        p = rec["params"]
        try:
            if open_source(p["source"], p["layout"]).fingerprint() != rec["source_fingerprint"]:
                out.update(state="stale", reason=f"source {p['source']} changed since it was indexed")
        except StageError as e:
            out.update(state="unknown", reason=f"source not readable: {e}")
    return out


def _shard_status(cfg: StatusConfig, split: str, index_rec: dict | None) -> dict:
    name = f"shard {split}"
    m = shard.read_manifest(cfg.data, split)
    if m is None:
        return {"stage": name, "state": "missing", "reason": "never ran"}
    out = {"stage": name, "state": "done", "reason": "", "ran_at": m["ran_at"],
           "counts": {"shards": len(m["shards"]), "samples": m["samples"], "rejected": m["rejected"],
                      "bytes": m["bytes"]}, "params": m["params"]}
    folder = shard.shard_dir(cfg.data, split)
    # Size by default (a missing or truncated shard); with --verify the sha256 too, which also
    # finds bytes changed in place.
    damaged = [s["name"] for s in m["shards"]
               if (storage.stat(storage.join(folder, s["name"])) or (None,))[0] != s["bytes"]
               or (cfg.verify and shard.file_checksum(storage.join(folder, s["name"])) != s["checksum"])]
    if index_rec is None or index_rec["digests"].get(split) != m["index_digest"]:
        out.update(state="stale", reason="the index changed since the shards were made")
    elif not m["complete"]:
        out.update(state="stale", reason=f"incomplete: {len(m['shards'])} of {m['shards_expected']} shards")
    elif damaged:
        out.update(state="stale", reason=f"{len(damaged)} of {len(m['shards'])} shards missing or "
                                         f"changed on disk (e.g. {damaged[0]})")
    elif m["params"].get("codecs") != shard.codec_versions():
        made, here = m["params"].get("codecs") or {}, shard.codec_versions()
        diff = ", ".join(f"{k} {made.get(k, '?')} (here {v})" for k, v in here.items() if made.get(k) != v)
        out.update(state="stale", reason=f"made with {diff}: a shard rerun remakes them with this machine's")
    return out


def _stats_status(cfg: StatusConfig) -> dict:
    url = stats.stats_url(cfg.data)
    if not storage.exists(url):
        return {"stage": "stats", "state": "missing", "reason": "never ran"}
    st = storage.read_json(url)
    out = {"stage": "stats", "state": "done", "reason": "", "ran_at": st["ran_at"],
           "counts": {"images": st["images"]}}
    m = shard.read_manifest(cfg.data, "train")
    if m is None or m["digest"] != st["input_digest"]:
        out.update(state="stale", reason="the training shards changed since the stats were computed")
    return out


def run(cfg: StatusConfig) -> dict:
    rec_url = index.paths(cfg.data)["record"]
    index_rec = storage.read_json(rec_url) if storage.exists(rec_url) else None
    stages = [_index_status(cfg), *(_shard_status(cfg, s, index_rec) for s in SPLITS),
              _stats_status(cfg)]
    return {"stage": "status", "data": cfg.data, "stages": stages,
            "states": {s["stage"]: s["state"] for s in stages}}


def format_table(summary: dict) -> str:
    lines = [f"dataset {summary['data']}", f"{'stage':<12} {'state':<8} {'ran at':<26} counts / reason"]
    for s in summary["stages"]:
        counts = ", ".join(f"{k} {v}" for k, v in s.get("counts", {}).items())
        detail = "; ".join(x for x in (counts, s.get("reason", "")) if x)
        lines.append(f"{s['stage']:<12} {s['state']:<8} {s.get('ran_at', '-'):<26} {detail}")
    return "\n".join(lines)
