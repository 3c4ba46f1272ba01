"""A stalled training run explains itself.

A rank that hangs (a dead network mount, a stuck collective, a stopped process) leaves the
others waiting in their next all-reduce, silently, until a timeout of many minutes. Here:

    Heartbeat (every rank)  a thread writes RUN/heartbeats/rankNNN.json every few seconds: the
                            rank's last progress (epoch, step, the step's sample keys, phase),
                            a count of its beats and of its progress, and its step time. When
                            this rank has made no progress for the stall time, it also writes
                            its threads' Python stacks to RUN/stacks/rankNNN.txt.
    Watch (the driver)      reads the heartbeats; when no rank has made progress for the stall
                            time, it waits briefly for the stacks and writes stall-report.txt
                            (printed, in the run's folder and in the MLflow run): per rank, its
                            last step and samples, whether it is still beating (a stopped or
                            gone process is not), and the call its training thread waits in.
                            With the action "restart" it then kills the silent ranks (all of
                            them when none is silent), and Ray Train restarts the worker group
                            from the last checkpoint.

The stall time is max(10 x the slowest rank's step time, --stall-after). The driver times
everything on its own clock (a beat is new when its count changed), so no two hosts' clocks
are compared.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
import traceback

from . import meter, storage, tracking

HEARTBEATS, STACKS, REPORT = "heartbeats", "stacks", "stall-report.txt"  # in the run's folder
ACTIONS = ("report", "restart")
BEAT_S = 5.0  # seconds between a rank's heartbeats and between the driver's looks at them
STEPS_PER_STALL = 10  # a stall is this many step times without progress (or --stall-after, if longer)


def stall_s(step_s: float | None, floor_s: float) -> float:
    return max(STEPS_PER_STALL * (step_s or 0.0), floor_s)


class Heartbeat:
    """One rank's side: ``progress(...)`` after each step (cheap: a few assignments); a daemon
    thread does the writing, so a slow store never slows a step."""

    def __init__(self, run_dir: str, rank: int, world: int, floor_s: float, node_id: str = "", gpus: int = 0):
        self.clock = meter.Clock(run_dir, gpus)  # the run's cost: this process's time, kept as it beats
        self.url = storage.join(run_dir, HEARTBEATS, f"rank{rank:03d}.json")
        self.stacks_url = storage.join(run_dir, STACKS, f"rank{rank:03d}.txt")
        self.floor_s, self.thread_id = floor_s, threading.get_ident()  # the training thread
        self.state = {"rank": rank, "world": world, "pid": os.getpid(), "host": socket.gethostname()}
        self.state.update(node_id=node_id, phase="starting", epoch=None, step=None, keys=[])
        # "armed" from this process's first step: start-up (a resume's download, a compile's
        # minutes) is not a stall
        self.state.update(beats=0, progress=0, step_s=None, armed=False, dumped=None)
        self.last = time.monotonic()
        threading.Thread(target=self._beat, name="stall-heartbeat", daemon=True).start()

    def progress(self, phase: str, epoch: int | None = None, step: int | None = None, keys=()) -> None:
        now = time.monotonic()
        s = self.state
        if phase == "train" and s["phase"] == "train":  # a step time: between two steps, no validation
            took = now - self.last
            s["step_s"] = took if s["step_s"] is None else 0.9 * s["step_s"] + 0.1 * took
        s.update(phase=phase, epoch=epoch, step=step, progress=s["progress"] + 1, armed=s["armed"] or phase == "train")
        if keys:
            s["keys"] = [str(k) for k in keys]
        self.last = now

    def _beat(self) -> None:
        while True:
            s = self.state
            s["beats"] += 1
            try:
                idle = time.monotonic() - self.last
                if s["armed"] and idle > stall_s(s["step_s"], self.floor_s) and s["dumped"] != s["progress"]:
                    storage.write_bytes(self.stacks_url, self.stacks(idle).encode())
                    s["dumped"] = s["progress"]  # this stall's dump is written: the driver can read it
                storage.write_json(self.url, s)
                self.clock.tick()
            except Exception:  # noqa: BLE001 - a store that is down must not end training; the driver sees no beats
                pass
            time.sleep(BEAT_S)

    def stacks(self, idle: float) -> str:
        names = {t.ident: t.name for t in threading.enumerate()}
        out = [f"rank {self.state['rank']} (pid {os.getpid()}): no progress for {idle:.0f} s\n"]
        for ident, frame in sys._current_frames().items():
            mark = "  <- the training thread" if ident == self.thread_id else ""
            out.append(f"\n--- thread {names.get(ident, ident)}{mark}\n")
            out.extend(traceback.format_stack(frame))
        return "".join(out)


class Watch:
    """The driver's side, on a thread of its own from ``start()`` to ``stop()``."""

    def __init__(self, run_dir: str, run_id: str, floor_s: float, action: str, restart=None):
        self.run_dir, self.run_id, self.floor_s, self.action = run_dir, run_id, floor_s, action
        self.restart = restart or kill_ranks  # restart(ranks' heartbeats): ends those processes
        self.seen: dict[int, dict] = {}  # rank -> its last heartbeat, and when (our clock) it beat and progressed
        self.reports: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_S)

    def _run(self) -> None:
        reported = False
        while not self._stop.wait(BEAT_S):
            try:
                moved = self.look()
                reported = reported and not moved
                if not reported and self.stalled():
                    self.report()
                    reported = True
            except Exception as e:  # noqa: BLE001 - the watch must never end the run it watches
                print(f"train: stall watch: {e}", file=sys.stderr)

    def look(self) -> bool:
        """Read every rank's heartbeat; True when some rank made progress since the last look."""
        now, moved = time.monotonic(), False
        for name in storage.list_dir(storage.join(self.run_dir, HEARTBEATS)):
            try:
                hb = storage.read_json(storage.join(self.run_dir, HEARTBEATS, name))
            except Exception:  # noqa: BLE001 - removed since the listing: an earlier attempt's rank
                continue
            old = self.seen.get(hb["rank"])
            if old is None or old["pid"] != hb["pid"]:  # a rank's first beat, or a restarted rank's
                self._new_attempt(hb)
                self.seen[hb["rank"]] = {**hb, "beat_at": now, "moved_at": now}
                moved = True
                continue
            if hb["beats"] != old["beats"]:
                old["beat_at"] = now
            if hb["progress"] != old["progress"]:
                old["moved_at"], moved = now, True
            old.update(hb)
        return moved

    def _new_attempt(self, hb: dict) -> None:
        """A worker group restarted after a node loss can have fewer ranks: the others' files go."""
        for rank in [r for r in self.seen if r >= hb["world"]]:
            del self.seen[rank]
            storage.remove(storage.join(self.run_dir, HEARTBEATS, f"rank{rank:03d}.json"))

    def limit_s(self) -> float:
        return stall_s(max((r["step_s"] or 0.0 for r in self.seen.values()), default=0.0), self.floor_s)

    def stalled(self) -> bool:
        if not any(r["armed"] for r in self.seen.values()):
            return False
        return time.monotonic() - max(r["moved_at"] for r in self.seen.values()) > self.limit_s()

    def silent(self) -> list[dict]:
        """Ranks whose heartbeat thread stopped too: a stopped, hung or gone process."""
        now = time.monotonic()
        return [r for r in self.seen.values() if now - r["beat_at"] > 3 * BEAT_S]

    def report(self) -> str:
        self._wait_for_stacks()
        text = self.render()
        self.reports.append(text)
        everything = "\n".join(self.reports)
        print(text, file=sys.stderr, flush=True)
        storage.write_bytes(storage.join(self.run_dir, REPORT), everything.encode())
        if self.action == "restart":
            self.restart(self.silent() or list(self.seen.values()))
        tracking.log_text(self.run_id, everything, REPORT)  # last: the tracking server may be the one down
        return text

    def _wait_for_stacks(self) -> None:
        """Until each rank has dumped its stacks (the beating ones do at the same stall time) or
        has been silent long enough to call it so: a few beats."""
        deadline = time.monotonic() + 4 * BEAT_S
        while time.monotonic() < deadline:
            silent = {r["rank"] for r in self.silent()}
            if all(r in silent or v["dumped"] == v["progress"] for r, v in self.seen.items()):
                return
            time.sleep(min(1.0, BEAT_S))
            self.look()

    def _stacks(self, rank: int) -> str:
        return storage.join(self.run_dir, STACKS, f"rank{rank:03d}.txt")

    def render(self) -> str:
        now = time.monotonic()
        silent = {r["rank"] for r in self.silent()}
        lines = [
            f"STALL at {time.strftime('%Y-%m-%d %H:%M:%S')}: no rank has made progress for "
            f"{now - max(r['moved_at'] for r in self.seen.values()):.0f} s (the stall time is {self.limit_s():.0f} s)."
        ]
        for rank in sorted(self.seen):
            r = self.seen[rank]
            where = "".join(f" {k} {r[k]}" for k in ("epoch", "step") if r[k] is not None)
            keys = f", samples {_span(r['keys'])}" if r["keys"] else ""
            state = (
                f"SILENT for {now - r['beat_at']:.0f} s: the process is stopped, hung holding the interpreter, or gone"
                if rank in silent
                else f"waits in {self._waiting_in(rank)}"
            )
            lines.append(
                f"  rank {rank} (pid {r['pid']} on {r['host']}): last beat: {r['phase']}{where}{keys}; {state}"
            )
        if silent:
            lines.append(f"The other ranks wait for rank {', '.join(map(str, sorted(silent)))}.")
        lines.append(f"Stacks: {storage.join(self.run_dir, STACKS)}/")
        action = "kills those ranks; Ray Train restarts the workers from the last checkpoint"
        lines.append(f"--stall-action {self.action}: " + (action if self.action == "restart" else "keeps waiting"))
        return "\n".join(lines) + "\n"

    def _waiting_in(self, rank: int) -> str:
        """The innermost call of the rank's training thread, and the project's own call that led
        there, from its stack dump: e.g. the backward pass's all-reduce, called from a step."""
        try:
            text = storage.read_bytes(self._stacks(rank)).decode()
        except Exception:  # noqa: BLE001 - no dump: say so
            return "(no stack dump)"
        thread = text.split("<- the training thread\n", 1)[-1].split("\n--- thread", 1)[0]
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', thread)
        if not frames:
            return "(no training thread in its stack dump)"
        calls = [frames[-1]] + [f for f in reversed(frames[:-1]) if "/pipelines/" in f[0]][:1]
        return ", called from ".join(f"{fn} ({'/'.join(path.split('/')[-2:])}:{line})" for path, line, fn in calls)


def _span(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else f"{keys[0]} .. {keys[-1]} ({len(keys)})"


def kill_ranks(ranks: list[dict]) -> None:
    """SIGKILL each rank's process, on its own node (a stopped process dies of it too)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def kill(pid: int) -> str:
        try:  # only a Ray Train worker: a pid can have been reused since its last beat
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" not in f.read():
                    return "not a training worker any more"
            os.kill(pid, signal.SIGKILL)
            return "killed"
        except (FileNotFoundError, ProcessLookupError):
            return "gone"

    ranks = [r for r in ranks if r["node_id"]]
    done = [
        kill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(r["node_id"], soft=False)).remote(r["pid"])
        for r in ranks
    ]
    for r, outcome in zip(ranks, ray.get(done, timeout=60)):
        print(f"train: stall: rank {r['rank']} (pid {r['pid']}): {outcome}", file=sys.stderr)


def read_report(run_dir: str) -> str | None:
    url = storage.join(run_dir, REPORT)
    return storage.read_bytes(url).decode() if storage.exists(url) else None


def clear(run_dir: str) -> None:
    """An earlier attempt's heartbeats and stacks: this attempt's ranks write their own."""
    for sub in (HEARTBEATS, STACKS):
        for name in storage.list_dir(storage.join(run_dir, sub)):
            storage.remove(storage.join(run_dir, sub, name))
