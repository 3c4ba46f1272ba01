"""One writer per dataset root: the lease the index, shard and stats stages hold."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipelines import lease
from pipelines.errors import StageError


def _lease(root, **fields):
    doc = {
        "holder": "other",
        "stage": "shard",
        "host": socket.gethostname(),
        "pid": 1,
        "pid_started": None,
        "started": "2026-01-01T00:00:00+00:00",
        "heartbeat": "now",
        "heartbeat_s": time.time(),
        **fields,
    }
    (root / lease.NAME).write_text(json.dumps(doc))


def test_a_second_writer_is_refused_naming_the_first_and_the_lease_goes_at_the_end(tmp_path):
    with lease.hold(str(tmp_path), "shard"):
        held = json.loads((tmp_path / lease.NAME).read_text())
        with pytest.raises(StageError, match=r"Another 'shard' run holds .* process \d+.*wait for it to finish"):
            with lease.hold(str(tmp_path), "stats"):
                pass
        assert json.loads((tmp_path / lease.NAME).read_text())["holder"] == held["holder"]  # still the first's
    assert not (tmp_path / lease.NAME).exists()
    with pytest.raises(RuntimeError):  # released on an error too
        with lease.hold(str(tmp_path), "index"):
            raise RuntimeError("boom")
    assert not (tmp_path / lease.NAME).exists()


def test_the_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = lease._proc_start(dead.pid)
    dead.wait()
    _lease(tmp_path, pid=dead.pid, pid_started=started)
    with lease.hold(str(tmp_path), "shard"):
        assert json.loads((tmp_path / lease.NAME).read_text())["holder"] != "other"


def test_a_lease_from_another_machine_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINES_LEASE_STALE_S", "60")
    _lease(tmp_path, host="another-node", heartbeat_s=time.time() - 10)
    with pytest.raises(StageError, match="on another-node.*taken over 60 s after its last heartbeat"):
        with lease.hold(str(tmp_path), "shard"):
            pass
    _lease(tmp_path, host="another-node", heartbeat_s=time.time() - 61)
    with lease.hold(str(tmp_path), "shard"):
        assert json.loads((tmp_path / lease.NAME).read_text())["holder"] != "other"


def _race_for_a_stale_lease(root: str, racers: int = 8) -> tuple[list, list]:
    """``racers`` threads, released at one moment, each taking the stale lease at ``root`` (each
    opens the lock of its own, as separate processes do): (the winners, the refusals)."""
    start, won, refused = threading.Barrier(racers), [], []

    def race():
        mine = lease.Lease(root, "shard")
        start.wait()
        try:
            mine.take()
            won.append(mine)
        except StageError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, refused


def test_of_runs_that_judge_one_lease_stale_at_the_same_moment_only_one_goes_on(tmp_path):
    _lease(tmp_path, host="another-node", heartbeat_s=time.time() - 3600)
    won, refused = _race_for_a_stale_lease(str(tmp_path))
    assert len(won) == 1 and len(refused) == 7, refused
    assert all("Another 'shard' run holds" in r for r in refused)
    doc = json.loads((tmp_path / lease.NAME).read_text())
    assert doc["holder"] == won[0].me["holder"] and doc["generation"] == 2
    assert won[0].beat()  # the winner's heartbeat finds its own version


def test_a_holder_whose_lease_was_taken_learns_it_and_writes_nothing(tmp_path, monkeypatch):
    """A holder paused past the stale time: the run that takes over replaces its version, so the
    old holder's next heartbeat fails, and its next check (before any write) raises, naming it."""
    monkeypatch.setenv("PIPELINES_LEASE_STALE_S", "0.5")
    old = lease.Lease(str(tmp_path), "shard")
    old.take()  # no heartbeat thread: this holder is as good as paused
    beat = json.loads((tmp_path / lease.NAME).read_text())["heartbeat_s"]
    while time.time() - beat <= 0.5:  # until its lease is stale by its own record
        time.sleep(0.05)
    assert lease._read(old.url)[1] == old.version
    new = lease.Lease(str(tmp_path), "stats")
    new.take()
    assert lease._read(old.url)[1] != old.version
    assert not old.beat() and "a 'stats' run" in old.lost
    old.beaten = 0.0
    with pytest.raises(lease.LeaseLost, match="lost its lease on .* to a 'stats' run .* stopped before writing"):
        old.check()
    assert json.loads((tmp_path / lease.NAME).read_text())["holder"] == new.me["holder"]


def test_a_holder_paused_between_its_check_and_its_write_writes_no_document_over_the_new_holders(tmp_path, monkeypatch):
    """The window a check cannot close: the old holder checked its lease (fresh), was paused,
    and was taken over; the new holder wrote the stage's documents. The old holder's writes,
    a compare-and-swap on the versions it read at its start, find them changed: it raises
    and both documents keep the new holder's bytes. A rewrite of the same bytes changes nothing."""
    monkeypatch.setenv("PIPELINES_LEASE_STALE_S", "0.5")
    made, fresh = tmp_path / "stats.json", tmp_path / "index" / "index.json"
    made.write_bytes(b"from a run before both")
    old = lease.Lease(str(tmp_path), "stats")
    old.take()
    old.remember([str(made), str(fresh)])
    beat = json.loads((tmp_path / lease.NAME).read_text())["heartbeat_s"]
    while time.time() - beat <= 0.5:  # the old holder, paused, goes stale by its own record
        time.sleep(0.05)
    new = lease.Lease(str(tmp_path), "stats")
    new.take()
    new.remember([str(made), str(fresh)])
    fresh.parent.mkdir()
    new.write(str(made), b"the new holder's")
    new.write(str(fresh), b"the new holder's")
    version = new.versions[str(made)]
    new.write(str(made), b"the new holder's")
    assert new.versions[str(made)] == version  # the same bytes: not written again

    monkeypatch.setattr(lease, "beat_every", lambda: 3600.0)  # its check, just before the pause, found it fresh
    with pytest.raises(lease.LeaseLost, match=f"lost its lease on .* wrote '{fresh}' meanwhile.*stopped before"):
        old.write(str(fresh), b"the old holder's")  # absent at its start: created meanwhile
    with pytest.raises(lease.LeaseLost, match="lost its lease on .* stopped before"):
        old.write(str(made), b"the old holder's")  # lost is lost: no second try
    old.lost = None
    with pytest.raises(lease.LeaseLost, match=f"lost its lease on .* wrote '{made}' meanwhile.*stopped before"):
        old.write(str(made), b"the old holder's")  # replaced meanwhile
    assert made.read_bytes() == fresh.read_bytes() == b"the new holder's"


@pytest.mark.fault
def test_the_heartbeat_keeps_a_long_run_from_looking_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    with lease.hold(str(tmp_path), "shard"):
        first = json.loads((tmp_path / lease.NAME).read_text())["heartbeat_s"]
        deadline = time.monotonic() + 30  # beats come every 0.2 s; a loaded disk may hold one up
        while json.loads((tmp_path / lease.NAME).read_text())["heartbeat_s"] <= first:
            assert time.monotonic() < deadline, "no heartbeat within 30 s"
            time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.fault
def test_on_s3_the_second_create_is_refused(tmp_path, monkeypatch):
    from . import services as sv

    s3 = sv.SeaweedFS(tmp_path / "s3")
    s3.start()
    try:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        root = f"s3://{sv.BUCKET}/lease"
        with lease.hold(root, "shard"):
            with pytest.raises(StageError, match="Another 'shard' run holds"):
                with lease.hold(root, "stats"):
                    pass
        with lease.hold(root, "stats"):  # released: free again
            pass
        # A stale lease raced for by 8 runs at once: If-Match on its ETag lets one replace it.
        stale = {"holder": "other", "stage": "shard", "host": "another-node", "pid": 1, "heartbeat_s": 0}
        lease.storage.write_bytes(f"{root}/{lease.NAME}", json.dumps(stale).encode())
        won, refused = _race_for_a_stale_lease(root)
        assert len(won) == 1 and len(refused) == 7, refused
        assert won[0].beat()
    finally:
        s3.stop()
