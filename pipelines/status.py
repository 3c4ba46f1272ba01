"""What has been done to a dataset ROOT, and what a rerun would redo.

    python -m pipelines status --data /data/alexnet

Each stage is ``done`` (its outputs match its current inputs), ``stale`` (its inputs or
outputs changed since it ran: a rerun redoes the affected part) or ``missing`` (never ran).
"""

from __future__ import annotations

from . import contract
from .config import SPLITS, StatusConfig
from .errors import StageError
from .sources import open_source

COUNTS = {
    "index": lambda r: {k: r["summary"][k] for k in ("classes", "train", "val", "rejected")},
    "shard": lambda m: {
        "shards": len(m["shards"]),
        "samples": m["samples"],
        "rejected": m["rejected"],
        "bytes": m["bytes"],
    },
    "stats": lambda st: {"images": st["images"]},
}


def _row(found: dict) -> dict:
    """A layout state as status shows it: the document's time, counts and parameters."""
    doc = found.pop("doc")
    if doc is not None:
        found.update(ran_at=doc["ran_at"], counts=COUNTS[found["stage"].split()[0]](doc))
        if "params" in doc:
            found["params"] = doc["params"]
    return found


def _check_source(row: dict, fingerprint: str) -> None:
    """The one check the stages leave to status: re-listing the source (slow on huge folders)."""
    p = row["params"]
    try:
        if open_source(p["source"], p["layout"]).fingerprint() != fingerprint:
            row.update(state="stale", reason=f"source {p['source']} changed since it was indexed")
    except StageError as e:
        row.update(state="unknown", reason=f"source not readable: {e}")


def run(cfg: StatusConfig) -> dict:
    rec = contract.read_index_record(cfg.data)
    found = [
        contract.index_state(cfg.data),
        *(contract.shard_state(cfg.data, s, rec, cfg.verify) for s in SPLITS),
        contract.stats_state(cfg.data),
    ]
    stages = [_row(f) for f in found]
    if cfg.check_source and stages[0]["state"] == "done":
        _check_source(stages[0], rec["source_fingerprint"])
    states = {s["stage"]: s["state"] for s in stages}
    return {
        "stage": "status",
        "data": cfg.data,
        "stages": stages,
        "states": states,
        "sweeps": contract.sweep_states(cfg.data),
    }


def format_table(summary: dict) -> str:
    lines = [f"dataset {summary['data']}", f"{'stage':<12} {'state':<8} {'ran at':<26} counts / reason"]
    for s in summary["stages"]:
        counts = ", ".join(f"{k} {v}" for k, v in s.get("counts", {}).items())
        detail = "; ".join(x for x in (counts, s.get("reason", "")) if x)
        lines.append(f"{s['stage']:<12} {s['state']:<8} {s.get('ran_at', '-'):<26} {detail}")
    for w in summary.get("sweeps", []):
        lines.append(f"sweep {w['sweep']:<6} {w['state']:<8} {_sweep_counts(w)}")
    return "\n".join(lines)


def _sweep_counts(w: dict) -> str:
    """A sweep's line: its trials by how they ended (or so far), and its best trial."""
    if w["state"] == "done":
        said = f"{w['trials']} trials: {w['finished']} finished, {w['stopped']} stopped early, {w['failed']} failed"
        best = f"; best {w['best_trial']} (val_top1 {w['best_val_top1']:.4f})" if w.get("best_trial") else ""
        return said + best
    said = f"{w['ended']}/{w['trials']} trials ended ({w['stopped_early']} stopped early), {w['running']} running"
    best = f"; best so far trial {w['best_trial']} (val_top1 {w['best_val_top1']:.4f})" if "best_trial" in w else ""
    return said + best
