"""Where a stage's work runs: joining or starting Ray, and the task pools (Ray tasks, or this
machine's processes for small data) the stages submit to."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from .errors import StageError

# Settings the stages read from the environment. A driver joining a running cluster, and a
# submitted job, hand them to every Ray worker so tasks see the same stores as the driver.
# Never a credential: Ray keeps a job's environment in its job info (the dashboard and
# `ray job list` show it), credentials of the moment expire hours into a run, and a profile
# name means nothing on a node without that profile. Every node uses its own AWS credential
# chain (its environment, instance profile or web identity, its own profiles), which refreshes.
FORWARD = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARD if os.environ.get(k)}


_own_address: str | None = None  # RAY_ADDRESS as ensure_ray set it for a local Ray of this process


def on_cluster() -> bool:
    """RAY_ADDRESS names a cluster's Ray for this process to join (not unset, not "local", not the
    local Ray this process started, not a dashboard URL, which only `submit` can use)."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    return bool(address) and address not in ("local", _own_address) and not _is_url(address)


def _is_url(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def ray_address() -> str:
    """Where a stage's Ray is: RAY_ADDRESS (a cluster's GCS, HOST:PORT), checked to answer within
    seconds, else "local": a Ray of its own. Never ray.init()'s own default, which joins whatever
    cluster `ray start` last recorded on this machine and hangs silently when that head is gone.
    A dashboard URL in RAY_ADDRESS (what `submit` uses) is refused, naming the fix."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if _is_url(address):
        raise StageError(
            f"RAY_ADDRESS={address} is a dashboard (Jobs API) address: `python -m pipelines submit -- <stage> ...` "
            "sends a stage there as a job. To run this stage's driver here against that cluster, set RAY_ADDRESS "
            "to its GCS address (HOST:6379); unset it to use a Ray of this process's own."
        )
    if not on_cluster():
        return "local"
    if address == "auto" or address.startswith("ray://"):
        return address
    host, _, port = address.rpartition(":")
    import socket

    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise StageError(
            f"Nothing answers at RAY_ADDRESS={address} ({type(e).__name__}: {e}): is the cluster's head up, and is "
            "this its GCS address (HOST:6379)? Unset RAY_ADDRESS to use a Ray of this process's own."
        ) from None
    return address


def _name_the_local_gcs(ray) -> None:
    """Choose the local Ray's GCS port and put its address in RAY_ADDRESS before it starts, so
    its processes inherit it: Ray Train's placement-group cleaner looks its cluster up by address
    and, with another Ray on the machine (a `ray start` left running), finds two and fails."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    global _own_address
    _own_address = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = _own_address


def counted_task(fn, args: tuple) -> dict:
    """Run ``fn(*args)`` as a Ray task does for the stages: its result, the S3 GETs it sent and
    the node it ran on (summaries count GETs per image and say which nodes did the work)."""
    import ray

    return _counted(fn, args, ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address())


def local_task(fn, args: tuple) -> dict:
    """counted_task in a process of this machine's pool (no Ray): the same result."""
    import socket

    return _counted(fn, args, f"local:{socket.gethostname()}", "127.0.0.1")


def _counted(fn, args: tuple, node: str, ip: str) -> dict:
    from . import storage

    before = storage.request_counts().get("GetObject", 0)
    result = fn(*args)
    return {"result": result, "gets": storage.request_counts().get("GetObject", 0) - before, "node": node, "ip": ip}


def _warm_worker(module: str) -> None:
    # One thread per worker, as Ray gives a 1-CPU task; the imports happen while the driver plans.
    os.environ["OMP_NUM_THREADS"] = "1"
    # Ctrl-C in a terminal reaches every process of its group: the driver decides what stops
    # (it lets the tasks in flight finish, or stops the workers), never a traceback per worker.
    # The worker was started with SIGINT blocked (_submit): ignored now, a held one is dropped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if os.environ.get("PIPELINES_QUIET"):  # --quiet: nothing from the workers (a task's error still
        devnull = os.open(os.devnull, os.O_WRONLY)  # reaches the driver with its result)
        os.dup2(devnull, 2)
        sys.stderr = open(os.devnull, "w")
    import importlib

    import torch

    torch.set_num_threads(1)
    importlib.import_module(module)
    # The worker's exit would walk every object torch made (~0.5 s, which the stage waits for).
    import gc

    gc.freeze()


def _submit(pool, fn, *args):
    """``pool.submit``, with SIGINT held back while it may start a worker: the worker inherits the
    blocked signal through exec, so a Ctrl-C cannot kill it half-started (with a traceback of its
    imports) before _warm_worker ignores it. Held back here, not lost: it arrives as this returns."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(fn, *args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _local_pool(num_cpus: float, warm: str):
    """(a process pool of this machine, its size): one worker per ``num_cpus`` cores."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, int((os.cpu_count() or 1) // max(num_cpus, 1e-9)))
    # spawn, not fork: the driver holds MLflow's and boto3's threads and connections
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_warm_worker, initargs=(warm,)
    ), workers


_prestarted: dict = {}  # (num_cpus, warm) -> (pool, workers), started by prestart_local_pool


def prestart_local_pool(parallel: str, source_bytes, ray_min_bytes: int, num_cpus: float, warm: str) -> None:
    """Start the local workers now, when a stage's tasks will run in them (see use_ray), so that
    their imports (torch: ~2.5 s) overlap the driver's MLflow start-up instead of following it.
    ``source_bytes`` is called only when the answer depends on it. The TaskPool made later
    with the same ``num_cpus`` and ``warm`` takes these workers; a pool not taken is shut down."""
    if _started_for(num_cpus, warm) or use_ray(parallel, source_bytes, ray_min_bytes):
        return
    pool, workers = _local_pool(num_cpus, warm)
    for _ in range(workers):  # a pool spawns its processes as work arrives: one no-op each
        _submit(pool, os.getpid)
    _prestarted[(num_cpus, warm)] = (pool, workers)
    import atexit

    atexit.register(_drop_prestarted)


def _drop_prestarted() -> None:
    while _prestarted:
        _prestarted.popitem()[1][0].shutdown(wait=False, cancel_futures=True)


_shared = [False]  # inside local_workers_shared: pools are handed on, not shut down


@contextlib.contextmanager
def local_workers_shared():
    """Stages run one after another in this process (prepare) share one pool of local workers:
    each stage's TaskPool takes it and hands it on, instead of starting and stopping its own
    (a worker's start, importing torch, is about a second of a core)."""
    _shared[0] = True
    try:
        yield
    finally:
        _shared[0] = False
        _drop_prestarted()


def _started_for(num_cpus: float, warm: str) -> tuple | None:
    """The key of a started pool for these tasks: the one started for them, or while shared, any
    of their size (a worker imports a stage's module the first time it runs one of its tasks)."""
    if (num_cpus, warm) in _prestarted:
        return (num_cpus, warm)
    return next((k for k in _prestarted if _shared[0] and k[0] == num_cpus), None)


def _take_prestarted(num_cpus: float, warm: str):
    key = _started_for(num_cpus, warm)
    return _prestarted.pop(key) if key else None


def _ray_initialized() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class TaskPool:
    """Where a stage's tasks run: Ray (a cluster's, or a local one), or a pool of this machine's
    processes, which a small job on one machine gets instead of a local Ray's ~7 s start-up and
    shut-down. The same calls either way: submit(fn, args) -> handle, done(handles) -> the
    finished ones (within a second), result(handle) -> counted_task's dict; ``window`` tasks in
    flight keep the queue short and progress smooth."""

    def __init__(self, use_ray: bool, num_cpus: float = 1.0, warm: str = "pipelines.cluster"):
        self.ray = ensure_ray() if use_ray else None
        if self.ray is not None:
            _drop_prestarted()
            self._remote = self.ray.remote(num_cpus=num_cpus)(counted_task)
            # At least 32 so an autoscaling cluster that starts small sees enough demand to grow.
            self.window = max(32, 2 * int(self.ray.cluster_resources().get("CPU", 1)))
            return
        self._pool, self._workers = _take_prestarted(num_cpus, warm) or _local_pool(num_cpus, warm)
        self._key = (num_cpus, warm)
        self.window = 2 * self._workers

    def submit(self, fn, args: tuple):
        if self.ray is not None:
            return self._remote.remote(fn, args)
        return _submit(self._pool, local_task, fn, args)

    def done(self, pending) -> list:
        if self.ray is not None:
            return self.ray.wait(list(pending), num_returns=1, timeout=1.0)[0]
        from concurrent.futures import FIRST_COMPLETED, wait

        return list(wait(list(pending), timeout=1.0, return_when=FIRST_COMPLETED).done)

    def result(self, handle) -> dict:
        return self.ray.get(handle) if self.ray is not None else handle.result()

    def close(self, hand_on: bool = False) -> None:
        if self.ray is None and hand_on and _shared[0]:
            _prestarted[self._key] = (self._pool, self._workers)  # the next stage takes it
        elif self.ray is None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, error_type, *_):
        if error_type is not None and issubclass(error_type, KeyboardInterrupt):
            self.stop()
        self.close(hand_on=error_type is None)  # a pool a failure may have broken is not handed on

    def stop(self) -> None:
        """Stop the local workers at once, mid-task (Ctrl-C): a task writes under a temporary name
        and renames when done, so nothing half-written stays under a final name, and the next
        run removes the temporary files. (Ray's tasks end with the driver.)"""
        if self.ray is None:
            for process in list(self._pool._processes.values()):  # no public way before Python 3.14
                process.kill()


def check_parallel(parallel: str) -> None:
    """--parallel, before any work or MLflow run."""
    if parallel not in ("auto", "ray", "local"):
        raise StageError(f"--parallel {parallel!r}: expected auto, ray or local.")


def use_ray(parallel: str, source_bytes, ray_min_bytes: int) -> bool:
    """--parallel auto|ray|local: auto is Ray on a cluster (RAY_ADDRESS), in a process already
    connected to Ray (a job, the demo, tests), or for ``source_bytes`` >= ``ray_min_bytes``
    (a number, or a function giving it, called only when the answer depends on it)."""
    if parallel != "auto":
        return parallel == "ray"
    if on_cluster() or _ray_initialized():
        return True
    return (source_bytes() if callable(source_bytes) else source_bytes) >= ray_min_bytes


def ensure_ray(dashboard: bool = False):
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray; reuse one already started.

    Stages call this rather than ray.init() so the same run(cfg) works from the CLI, inside a
    Ray job (already connected) and in tests (one shared session). ``dashboard``: a local Ray
    also starts its dashboard, on loopback only. Ray Train's controller queries actor state
    through it (without it, it works but warns every few seconds); the other stages skip its
    ~4 s start (benchmarks/shard.py). A process that runs several stages asks for it first.
    """
    import ray

    if not ray.is_initialized():
        address = ray_address()
        if not sys.stderr.isatty():  # a log file or a pipe: no colour codes in the workers' lines
            os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        if address == "local":
            # A Ray of this process's own, on loopback: a token would guard nothing, and Ray
            # warns about it on every start. A user's own RAY_AUTH_MODE is kept.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            _name_the_local_gcs(ray)
        if dashboard and address == "local" and not _dashboard_installed():
            print(
                "note: Ray's dashboard packages (ray[default]) are not installed: starting Ray without "
                "its dashboard (Ray Train then warns that it cannot list its actors).",
                file=sys.stderr,
            )
            dashboard = False
        local = {} if address != "local" else {"include_dashboard": dashboard}
        if dashboard and address == "local":
            local["dashboard_host"] = "127.0.0.1"
        # Workers of a cluster started elsewhere do not have this shell's settings: send them.
        # Inside a submitted job they arrive with the job's runtime env (sending them again
        # would be a conflict Ray refuses).
        env = forwarded_env()
        if address != "local" and env and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            local["runtime_env"] = {"env_vars": env}
        # --quiet: the workers' lines are not sent here at all
        ray.init(address=address, logging_level="WARNING", log_to_driver=not os.environ.get("PIPELINES_QUIET"), **local)
        _no_auto_init()
    return ray


def _no_auto_init() -> None:
    """This process's Ray is the one started or joined above. A thread still running as the
    process exits (Ray Tune's loop after Ctrl-C) would otherwise call a Ray API after the exit's
    ray.shutdown() and so start or join a Ray again, printing its connection lines after the
    stage's last. (Ray reads RAY_ENABLE_AUTO_CONNECT once, when imported; this is its flag.)"""
    from ray._private import auto_init_hook

    if hasattr(auto_init_hook, "enable_auto_connect"):
        auto_init_hook.enable_auto_connect = False


def _dashboard_installed() -> bool:
    """Whether ray[default]'s dashboard packages are here (Ray's own test: this module imports
    them); a plain `pip install ray` lacks them, and Ray then refuses to start with a dashboard."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True
