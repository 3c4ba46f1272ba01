"""One writer per dataset root: the stages that write ROOT (index, shard, stats) hold a lease.

    with lease.hold(cfg.data, "shard"):
        ...   # a second index/shard/stats on the same ROOT stops with an error naming this one

The lease is ``ROOT/.lease.json`` ({"holder", "stage", "host", "pid", "started", "heartbeat"}),
created with an exclusive write (O_EXCL on a local disk; ``If-None-Match: *`` on S3, which
refuses a second create) and rewritten by a heartbeat every HEARTBEAT_S seconds. It is
released when the stage ends, by an error or Ctrl-C too. A holder that died without releasing it
(SIGKILL, a lost node) leaves a stale lease, taken over:
  - at once, when the holder ran on this machine and its process is gone;
  - otherwise after STALE_S seconds without a heartbeat (PIPELINES_LEASE_STALE_S overrides it).
Two runs on one root would otherwise corrupt each other: the shard stage's clean-up of a killed
run's temporary files would delete the files the other run is writing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from . import storage
from .common import now_iso
from .errors import StageError

HEARTBEAT_S = 30.0
STALE_S = 150.0  # five missed heartbeats: a holder that stopped beating is gone, not slow
NAME = ".lease.json"


def _stale_after() -> float:
    return float(os.environ.get("PIPELINES_LEASE_STALE_S", STALE_S))


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat): a pid alone may be reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _create(url: str, data: bytes) -> bool:
    """Write the lease only if none is there. A store that ignores If-None-Match would let two
    writers both "create": the read-back shows who won."""
    if not storage.write_if_absent(url, data):
        return False
    return not storage.is_s3(url) or json.loads(storage.read_bytes(url))["holder"] == json.loads(data)["holder"]


def _read(url: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(url)) if storage.exists(url) else None
    except (json.JSONDecodeError, OSError, StageError):
        return None  # half-written by a holder killed mid-write, or gone meanwhile


def _why_stale(held: dict) -> str | None:
    """Why a lease's holder is gone, or None if it may still be running."""
    if held.get("host") == socket.gethostname() and _proc_start(held.get("pid", -1)) != held.get("pid_started"):
        return f"its process {held.get('pid')} on this machine has ended"
    age = time.time() - float(held.get("heartbeat_s", 0))
    if age > _stale_after():
        return f"no heartbeat for {age:.0f} s (stale after {_stale_after():.0f} s)"
    return None


@contextmanager
def hold(root: str, stage: str):
    """Hold ROOT's lease for the block, or raise StageError naming the run that holds it."""
    url = storage.join(root, NAME)
    me = {
        "holder": uuid.uuid4().hex,
        "stage": stage,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _proc_start(os.getpid()),
        "started": now_iso(),
    }

    def doc() -> bytes:
        return storage.json_bytes({**me, "heartbeat": now_iso(), "heartbeat_s": time.time()})

    for _ in range(3):
        if _create(url, doc()):
            break
        held = _read(url)
        if held is None:
            continue  # released (or half-written) between our create and read: try again
        why = _why_stale(held)
        if why is None:
            raise StageError(
                f"Another '{held.get('stage')}' run holds '{root}' (started {held.get('started')} on "
                f"{held.get('host')}, process {held.get('pid')}, last heartbeat {held.get('heartbeat')}). Two "
                "runs on one dataset root would overwrite each other's files: wait for it to finish. If it was "
                f"killed, its lease is taken over {_stale_after():.0f} s after its last heartbeat, or delete {url}."
            )
        print(
            f"{stage}: taking over the lease of a '{held.get('stage')}' run on {root}: {why}",
            flush=True,
            file=sys.stderr,
        )
        storage.remove(url)
    else:
        raise StageError(f"Could not take the lease {url}: other runs keep taking it. Is a run starting now?")

    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            held = _read(url)
            if held is None or held.get("holder") != me["holder"]:
                return  # taken over (we were thought dead): the error shows at release
            try:
                storage.write_bytes(url, doc())
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                pass

    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        held = _read(url)
        if held is not None and held.get("holder") == me["holder"]:
            storage.remove(url)
