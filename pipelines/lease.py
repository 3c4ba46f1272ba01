"""One writer per dataset root: the stages that write ROOT (index, shard, stats) hold a lease.

    with lease.hold(cfg.data, "shard"):
        ...   # a second index/shard/stats on the same ROOT stops with an error naming this one

The lease is ``ROOT/.lease.json`` ({"holder", "stage", "host", "pid", "started", "generation",
"heartbeat"}), created with an exclusive write (on a local disk a hard link to a file written
whole; ``If-None-Match: *`` on S3, which refuses a second create). Every later write is a
compare-and-swap on the version the writer last saw (S3: ``If-Match`` on the ETag; a local
disk: a lock around read, compare and rename): the heartbeat every HEARTBEAT_S seconds, and a
takeover. It is released when the stage ends, by an error or Ctrl-C too. A holder that died
without releasing it (SIGKILL, a lost node) leaves a stale lease, taken over:
  - at once, when the holder ran on this machine and its process is gone;
  - otherwise after STALE_S seconds without a heartbeat (PIPELINES_LEASE_STALE_S overrides it).
Of two runs that judge one lease stale at the same moment, one replaces the version both read;
the other finds it changed. A holder judged stale while alive (paused, cut off) learns it at its
next heartbeat or its next ``check`` (every stage calls it before writing a document or deleting
a file) and stops before writing anything more, naming the run that took over. A stage's
documents (manifests, stats, the index record) are written by ``write``, a compare-and-swap on
the version the run read at its start: a run paused between its check and its write, and
taken over meanwhile, finds the document changed and writes nothing.
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


def stale_after() -> float:
    return float(os.environ.get("PIPELINES_LEASE_STALE_S", STALE_S))


def beat_every() -> float:
    """HEARTBEAT_S, or a fifth of a shorter stale time: a live holder never looks stale."""
    return min(HEARTBEAT_S, stale_after() / 5)


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat): a pid alone may be reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _read(url: str) -> tuple[dict, str] | tuple[None, None]:
    """(the lease, its version), or (None, None) when there is none or it cannot be read."""
    try:
        found = storage.read_versioned(url)
        return (json.loads(found[0]), found[1]) if found else (None, None)
    except (json.JSONDecodeError, OSError, StageError):
        return None, None  # half-written by a holder killed mid-write (before renames), or gone meanwhile


def _why_stale(held: dict) -> str | None:
    """Why a lease's holder is gone, or None if it may still be running."""
    if held.get("host") == socket.gethostname() and _proc_start(held.get("pid", -1)) != held.get("pid_started"):
        return f"its process {held.get('pid')} on this machine has ended"
    age = time.time() - float(held.get("heartbeat_s", 0))
    if age > stale_after():
        return f"no heartbeat for {age:.0f} s (stale after {stale_after():.0f} s)"
    return None


def _who(held: dict | None) -> str:
    if held is None:
        return "a run that has since released it"
    return (
        f"a '{held.get('stage')}' run (started {held.get('started')} on {held.get('host')}, process "
        f"{held.get('pid')}, last heartbeat {held.get('heartbeat')})"
    )


class Lease:
    """This process's hold on one ROOT: the version it last wrote, kept current by a heartbeat
    (compare-and-swap on that version), and whether another run has taken it."""

    def __init__(self, root: str, stage: str):
        self.root, self.url = root, storage.join(root, NAME)
        self.me = {
            "holder": uuid.uuid4().hex,
            "stage": stage,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": _proc_start(os.getpid()),
            "started": now_iso(),
        }
        self.version, self.generation, self.lost, self.beaten = None, 1, None, time.monotonic()
        self.versions: dict[str, str | None] = {}  # document -> its version as this run last saw it
        self._lock = threading.Lock()

    def doc(self, generation: int) -> bytes:
        return storage.json_bytes(
            {**self.me, "generation": generation, "heartbeat": now_iso(), "heartbeat_s": time.time()}
        )

    def take(self) -> None:
        """Create the lease, or take over a stale one by compare-and-swap: of two runs that judge
        it stale at once, one replaces the version both read and the other finds it changed."""
        for _ in range(3):
            if storage.write_if_absent(self.url, self.doc(1)):
                held, self.version = _read(self.url)
                if held is not None and held["holder"] == self.me["holder"]:  # (a store ignoring If-None-Match)
                    return
                continue
            held, version = _read(self.url)
            if held is None:
                continue  # released between our create and read: try again
            why = _why_stale(held)
            if why is None:
                raise LeaseHeld(
                    f"Another '{held.get('stage')}' run holds '{self.root}' (started {held.get('started')} on "
                    f"{held.get('host')}, process {held.get('pid')}, last heartbeat {held.get('heartbeat')}). "
                    "Two runs writing there would overwrite each other's files: wait for it to finish. If "
                    f"it was killed, its lease is taken over {stale_after():.0f} s after its last heartbeat, "
                    f"or delete {self.url}."
                )
            self.generation = int(held.get("generation", 1)) + 1
            self.version = storage.replace_if(self.url, self.doc(self.generation), version)
            if self.version is not None:
                print(f"{self.me['stage']}: took over the lease of {_who(held)} on {self.root}: {why}", file=sys.stderr)
                return
        raise StageError(f"Could not take the lease {self.url}: other runs keep taking it. Is a run starting now?")

    def beat(self) -> bool:
        """Rewrite the heartbeat if the lease is still ours; False (and ``lost`` says who has it) if not."""
        with self._lock:  # the heartbeat thread and a check() in the stage's thread
            if self.lost is not None:
                return False
            new = storage.replace_if(self.url, self.doc(self.generation), self.version)
            if new is None:
                self.lost = _who(_read(self.url)[0])
                return False
            self.version, self.beaten = new, time.monotonic()
            return True

    def check(self) -> None:
        """Before a write or a delete: still ours, or a StageError naming who took it. Read afresh
        when the last heartbeat is older than a beat (this process may have been paused)."""
        if self.lost is None and time.monotonic() - self.beaten > beat_every():
            self.beat()
        if self.lost is not None:
            raise LeaseLost(self.lost_message())

    def remember(self, urls) -> None:
        """The versions of the documents this run will replace, read under the lease before any
        work: its writes of them compare against these."""
        for url in urls:
            found = storage.read_versioned(url)
            self.versions[url] = found[1] if found else None

    def write(self, url: str, data: bytes) -> None:
        """Replace a remembered document only if it is still the version this run last read or
        wrote (compare-and-swap). A ``check`` just before is not enough: a run paused between it
        and the write, and taken over meanwhile, would write over the new holder's document."""
        self.check()
        expected = self.versions[url]  # a KeyError here: the stage did not remember it at its start
        found = storage.read_versioned(url)
        if found is not None and found == (data, expected):
            return  # unchanged: a rerun that changes nothing touches nothing
        if expected is None:
            new = storage.read_versioned(url)[1] if storage.write_if_absent(url, data) else None
        else:
            new = storage.replace_if(url, data, expected)
        if new is None:
            self.lost = f"a run that wrote '{url}' meanwhile"
            raise LeaseLost(self.lost_message())
        self.versions[url] = new

    def lost_message(self) -> str:
        return (
            f"This {self.me['stage']} run lost its lease on '{self.root}' to {self.lost} (it was paused or "
            "cut off longer than the lease's stale time). It stopped before writing anything more; the "
            "other run goes on."
        )


class LeaseLost(StageError):
    """Another run took this run's lease: it must write nothing more."""


class LeaseHeld(StageError):
    """Another run holds the lease, and it is not stale (yet)."""


_held: dict[str, Lease] = {}  # root -> this process's lease on it


def check(root: str) -> None:
    """Before a stage writes a document or deletes a file under ROOT: it still holds ROOT's lease
    (a StageError naming the run that took it if not). Nothing to check outside ``hold``."""
    if root in _held:
        _held[root].check()


def remember(root: str, *urls: str) -> None:
    """At a stage's start, under ROOT's lease: the documents it will write with ``write``."""
    if root in _held:
        _held[root].remember(urls)


def write(root: str, url: str, data: bytes) -> None:
    """Write a document under ROOT fenced by the lease (``Lease.write``); outside ``hold``, as
    ``storage.write_if_changed``."""
    if root in _held:
        _held[root].write(url, data)
    else:
        storage.write_if_changed(url, data)


@contextmanager
def hold(root: str, stage: str):
    """Hold ROOT's lease for the block, or raise StageError naming the run that holds it."""
    held, stop = Lease(root, stage), threading.Event()

    def beat():
        while not stop.wait(beat_every()):
            try:
                if not held.beat():
                    return  # taken over: the stage stops at its next check()
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                pass

    thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
    try:  # from the create on: Ctrl-C at any point after it still releases the lease
        held.take()
        thread.start()
        _held[root] = held
        try:
            yield held
        except Exception as e:
            # A write that failed because the run that took over removed its temporary file (this
            # run was paused between its check and the write): say what happened, not the symptom.
            if not isinstance(e, LeaseLost) and (held.lost is not None or not held.beat()):
                raise LeaseLost(held.lost_message()) from e
            raise
    finally:
        _held.pop(root, None)
        stop.set()
        if thread.is_alive():
            thread.join(5)
        now, _ = _read(held.url)
        if now is not None and now.get("holder") == held.me["holder"]:
            storage.remove(held.url)
