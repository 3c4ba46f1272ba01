"""Small readers and writers the tests use for what the stages read and write."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def read_shards(root: Path, split: str) -> dict[str, tuple[int, bytes, str]]:
    """key -> (label, jpg bytes, shard name) over every shard of ``split``; fails on a duplicate key."""
    out = {}
    for tar_path in sorted((root / "shards" / split).glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        keys = {name.rsplit(".", 1)[0] for name in members}
        for key in keys:
            assert key not in out, f"{key} is in {out[key][2]} and {tar_path.name}"
            out[key] = (int(members[f"{key}.cls"]), members[f"{key}.jpg"], tar_path.name)
    return out


def rejects(root: Path) -> list[dict]:
    path = root / "index" / "rejected.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def mtimes(root: Path) -> dict[str, int]:
    """Modification time (ns) of every file under root: shows which files a run rewrote."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def image(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def write_shard_tar(path, samples) -> str:
    """(key, jpg bytes, label) samples as a tar in the shard stage's layout: {key}.jpg + {key}.cls,
    with its sample index beside it (scanned from the tar, as a shard rerun adds it)."""
    from pipelines import tarindex

    with tarfile.open(path, "w") as tar:
        for key, jpg, label in samples:
            for ext, payload in (("jpg", jpg), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    tarindex.write(str(path), tarindex.scan(str(path)))
    return str(path)


def read_ledger(folder) -> dict[int, dict[int, dict[int, list[str]]]]:
    """The sample ledger as {epoch: {step: {rank: keys}}}, keeping for each (epoch, step) the
    entries of the latest attempt that reached it (a restart redoes the steps after its
    checkpoint; the earlier attempt's entries for them never reached the model)."""
    entries = [
        json.loads(line)
        for p in sorted(Path(folder).glob("rank*-attempt*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    latest: dict[tuple[int, int], int] = {}
    for e in entries:
        latest[(e["epoch"], e["step"])] = max(latest.get((e["epoch"], e["step"]), 0), e["attempt"])
    out: dict = {}
    for e in entries:
        if e["attempt"] == latest[(e["epoch"], e["step"])]:
            ranks = out.setdefault(e["epoch"], {}).setdefault(e["step"], {})
            assert e["rank"] not in ranks, f"rank {e['rank']} recorded epoch {e['epoch']} step {e['step']} twice"
            ranks[e["rank"]] = e["keys"]
    return out


def ledger_entries(folder: Path) -> list[dict]:
    """Every entry of a sample ledger so far, read while the workers write it (a line still
    being written is skipped)."""
    entries = []
    for path in Path(folder).glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                pass
    return entries


def ledger_worlds(folder: Path) -> set[int]:
    """The world sizes a sample ledger has seen so far."""
    return {e["world"] for e in ledger_entries(folder)}


def epoch_keys(ledger: dict, epoch: int) -> list[str]:
    return [
        k for step in sorted(ledger[epoch]) for rank in sorted(ledger[epoch][step]) for k in ledger[epoch][step][rank]
    ]


def sigint_as_a_terminal_gives_it() -> None:
    """A child's preexec_fn: SIGINT back to its default. A test run as a background job of a
    script (CI's shell, nohup) inherits SIGINT ignored, and a Python started so never turns
    Ctrl-C into KeyboardInterrupt; a user's terminal does."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


RECOVERY = "recovery_s: "  # the prefix of the test properties that hold a recovery time


def recovered(record_property, fault: str, since: float) -> float:
    """Record the seconds from ``since`` (``time.monotonic()`` when ``fault`` was injected, or
    when it ended) to now, the moment the test saw the recovery it waits for. pytest's summary
    and ``make flakes`` list them; nothing asserts on them (a timed test fails by chance)."""
    import time

    took = time.monotonic() - since
    record_property(RECOVERY + fault, round(took, 1))
    return took
