"""What a training run cost: worker-hours and GPU-hours, summed over every worker process that
ran for it, restarts and lost workers included.

Each worker process keeps a clock file, RUN/meter/<host>-<pid>-<start>.json, holding when it
started and when it was last seen alive (rewritten every ``EVERY_S``); the run's cost is the sum
over all of them. A worker killed mid-epoch keeps its file, so the time it spent, even on work a
restart redid, is counted: at most ``EVERY_S`` of each process goes unseen. Both times come from
the same host's clock, so no two hosts' clocks are compared.
"""

from __future__ import annotations

import os
import socket
import time

from . import storage

METER = "meter"  # in the run's folder
# a clock file's rewrite interval, so a killed process's last, uncounted, stretch: one small
# write per worker as often as its stall heartbeat's, a trifle beside what a worker-hour costs
EVERY_S = 5.0


class Clock:
    """One worker process's clock file; ``tick()`` (from any periodic thread) rewrites it at most
    every EVERY_S. A store that is down only delays it."""

    def __init__(self, run_dir: str, gpus: int):
        self.started = time.time()
        name = f"{socket.gethostname()}-{os.getpid()}-{int(self.started * 1000)}.json"
        self.url = storage.join(run_dir, METER, name)
        self.doc = {"host": socket.gethostname(), "pid": os.getpid(), "gpus": gpus, "started": self.started}
        self.written = 0.0

    def tick(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self.written >= EVERY_S:
            storage.write_json(self.url, {**self.doc, "seen": now})
            self.written = now


def hours(run_dir: str) -> dict[str, float]:
    """The run's worker-hours and GPU-hours so far, from every clock file in its folder."""
    folder = storage.join(run_dir, METER)
    worker = gpu = 0.0
    for name in (n for n in storage.list_dir(folder) if n.endswith(".json")):  # not a write's temporary
        try:
            doc = storage.read_json(storage.join(folder, name))
        except (OSError, ValueError):  # one being rewritten right now: the next look counts it
            continue
        spent = max(doc["seen"] - doc["started"], 0.0) / 3600
        worker, gpu = worker + spent, gpu + spent * doc["gpus"]
    return {"worker_hours": worker, "gpu_hours": gpu}


def metrics(spent: dict[str, float], price_per_hour: float | None) -> dict[str, float]:
    """The cost/* metrics of a run: hours, and dollars when a price per worker-hour is known."""
    out = {f"cost/{k}": v for k, v in spent.items()}
    if price_per_hour is not None:
        out["cost/usd"] = spent["worker_hours"] * price_per_hour
    return out
