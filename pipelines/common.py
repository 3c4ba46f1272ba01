"""Small pieces every stage shares: digests, timestamps, progress lines, and waiting for work on
another thread so that Ctrl-C is heard at once."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import sys
import threading
import time


def off_the_main_thread(fn, name: str):
    """``fn()`` on a daemon thread of its own, waited for here: Ctrl-C (and SIGTERM, which the
    CLI turns into it) is raised in this thread at once, whatever ``fn`` is doing (a Ray call,
    an asyncio loop), and never inside ``fn``'s own machinery. ``fn`` is abandoned: it ends
    with the process."""
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the waiting thread
            out["error"] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a timed wait: a signal's KeyboardInterrupt is raised here at once
    if "error" in out:
        raise out["error"]
    return out["result"]


def digest(obj) -> str:
    """A stable sha256 of any JSON-able value (keys sorted), for 'did my inputs change?'."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_watched: list = []  # futures whose failure stops the stage at its next progress report


@contextlib.contextmanager
def stop_on_failure(future):
    """While inside, a failure of ``future`` (work on another thread that the stage needs, such
    as opening its MLflow run) is raised by the stage's next Progress.update."""
    _watched.append(future)
    try:
        yield
    finally:
        _watched.remove(future)


def raise_if_background_failed() -> None:
    for f in _watched:
        if f.done() and f.exception() is not None:
            raise f.exception()


class Progress:
    """Prints 'label: done/total unit, N images, R img/s, ETA' to stderr, at most every ``every`` s."""

    def __init__(self, label: str, total: int, unit: str = "shards", every: float = 2.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self.images = 0
        self.start = self._last = time.monotonic()

    def update(self, items: int = 1, images: int = 0) -> None:
        raise_if_background_failed()
        self.done += items
        self.images += images
        now = time.monotonic()
        if now - self._last >= self.every or self.done == self.total:
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.images / elapsed
        left = (self.total - self.done) * elapsed / self.done if self.done else float("nan")
        eta = fmt_seconds(left) if self.done else "?"
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit}, {self.images} images, "
            f"{rate:.0f} img/s, {fmt_seconds(elapsed)} elapsed, ETA {eta}",
            file=sys.stderr,
            flush=True,
        )
