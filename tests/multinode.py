"""A multi-node Ray cluster on this one machine, for tests of node loss.

A head with no CPUs (as a cluster launcher's head: no tasks or train workers land on it) and
worker nodes that join it with `ray start --address`, each its own raylet with its own
resources, ports and temp dir. Every `ray start --block` runs in its own session, so
`kill_node(i)` can SIGKILL a worker node whole (raylet, agents and every worker process it
started), the way a spot instance disappears; teardown kills what is left of every node the
same way.

    with ray_cluster(tmp_path, [{"num_cpus": 1, "resources": {"nodeA": 1}},
                                {"num_cpus": 1}]) as cluster:
        env = {**os.environ, **cluster.env}          # RAY_ADDRESS=<gcs>, loopback, no token
        driver = subprocess.Popen([sys.executable, "driver.py"], env=env)   # its own process:
        ...                                           # the session's ray_local holds this one
        cluster.kill_node(0)                          # worker node 0 is gone
        cluster.add_node(num_cpus=1)                  # a replacement joins

A driver connecting from this machine attaches to the head (Ray prefers the head among the
local nodes), so Ray Train's controller, which is pinned to the driver's node with num_cpus=0,
runs on the head and survives the loss of any worker node.

Nothing here touches another Ray on the machine: processes are found by their session id
(each `ray start` is a session leader and Ray's processes never leave its session), never
by name, and `ray stop` is never called.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .services import VENV_BIN, _kill, _port_open, free_ports, wait_for

# What a test cluster needs in the environment of its nodes and of a driver connecting to it:
# loopback only (without this, Ray swaps 127.0.0.1 for the machine's IP and binds everywhere)
# and no token authentication (an open cluster: a token only matters to test_cluster.py).
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
# GCS marks a node dead after `threshold` failed health checks in a row, one every `period`
# (defaults 3 s x 5); a test that kills nodes wants to hear of it sooner. A killed raylet fails
# its checks at once (its port is closed), so the timeout can stay long enough for a live one
# on a loaded 2-core machine never to be taken for dead.
FAST_HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "5000",
    "RAY_health_check_failure_threshold": "3",
}


# For the driver of an elastic fit (Ray Train passes it on to its controller). After a node loss
# the controller sizes the new worker group from a view of the cluster up to 20 s old (its
# AutoscalingCoordinator refreshes every 20 s), so its first restart may ask for the old worker count
# and wait this long for a placement group that cannot be placed (default 60 s) before it retries;
# each such retry counts against FailureConfig(controller_failure_limit) (unlimited), not max_failures.
# The timeout covers only the placement group wait, so it can be short on a cluster that has the CPUs.
FAST_TRAIN_RESTART = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}

# Each node would take 30% of the machine's memory for its object store (in /dev/shm) by default.
OBJECT_STORE = 256 * 1024**2


def _session_pids(sid: int) -> list[int]:
    """Every live process in session ``sid`` (field 6 of /proc/PID/stat)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_stopped(pids: list[int], timeout: float = 10) -> None:
    """Until every thread of every process in ``pids`` is stopped (or gone): SIGSTOP is
    delivered asynchronously, and a title read before would be of a process still running."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while not all(state in "Tt" for state in _thread_states(pid)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {pid} did not stop within {timeout} s of SIGSTOP")
            time.sleep(0.001)


def _thread_states(pid: int) -> list[str]:
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # a thread that ended
            continue
        states.append(text[text.rindex(")") + 2])
    return [s for s in states if s not in "XZ"]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _kill_session(sid: int, timeout: float = 10) -> None:
    """SIGKILL every process of a session until none is left (a dying raylet may still fork)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _session_pids(sid)
        if not pids:
            return
        signal_all(pids, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} of Ray session {sid} survive SIGKILL")
        time.sleep(0.1)


@dataclass
class Node:
    index: int  # -1: the head
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    spec: dict = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return bool(_session_pids(self.proc.pid))

    def kill(self) -> None:
        """A lost machine: SIGKILL everything the node runs, at once, no goodbye to the GCS."""
        _kill_session(self.proc.pid)
        self.proc.wait(10)

    def kill_mid_task(self, task: str, running, timeout: float = 300) -> None:
        """Kill the node while one of its workers runs the Ray task function ``task``, known for
        certain: the node is frozen (SIGSTOP, a few milliseconds) and its processes' titles read.
        Ray titles a worker "ray::<function>" while it runs a task and "ray::IDLE" again before
        the task's result leaves the worker, so a node frozen with that title holds a task whose
        result its caller never got; otherwise it is thawed and asked again. ``running()`` says
        whether the work the kill is meant for still runs (fails loudly when it ended first)."""
        deadline = time.monotonic() + timeout
        want = f"ray::{task}".encode()
        while True:
            assert running() and time.monotonic() < deadline, f"no '{task}' task ran on node {self.index}"
            pids = _session_pids(self.proc.pid)
            signal_all(pids, signal.SIGSTOP)
            wait_stopped(pids)
            if any(_cmdline(pid).split(b"\0")[0] == want for pid in pids):
                self.kill()
                return
            signal_all(pids, signal.SIGCONT)
            time.sleep(0.02)


@dataclass
class Cluster:
    gcs: str  # "127.0.0.1:PORT": RAY_ADDRESS for drivers, --address for nodes
    head: Node
    workers: list[Node]
    env: dict[str, str]  # for a driver: RAY_ADDRESS and CLUSTER_ENV
    root: Path  # the nodes' temp dirs (short: unix sockets), removed at the end
    logs: Path  # each node's `ray start` output (head.log, w0.log, ...); at the end also each
    #             node's Ray logs (logs/head/..., logs/w0/...: the Train controller's are in logs/head/train)
    dashboard: str = ""
    node_env: dict[str, str] = field(default_factory=dict)

    def kill_node(self, i: int) -> None:
        self.workers[i].kill()

    def add_node(self, num_cpus: int = 1, resources: dict | None = None, timeout: float = 120) -> int:
        """Join one more worker node (a replacement machine); returns its index."""
        node = _start_worker(self, {"num_cpus": num_cpus, "resources": resources or {}}, timeout)
        self.workers.append(node)
        return node.index

    def alive_nodes(self) -> int:
        """Nodes the GCS counts alive, the head included (asks the GCS, no driver needed)."""
        out = subprocess.run(
            [
                str(VENV_BIN / "ray"),
                "list",
                "nodes",
                f"--address={self.gcs}",
                "--filter",
                "state=ALIVE",
                "--format=json",
                "--limit=100",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=60,
        )
        return len(json.loads(out.stdout)) if out.returncode == 0 else -1

    def node_of(self, pid: int) -> int | None:
        """The index of the worker node running process ``pid`` (e.g. a train worker's
        os.getpid()), -1 for the head, None if it is no process of this cluster."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        sid = int(stat[stat.rindex(")") + 2 :].split()[3])
        return next((n.index for n in [self.head, *self.workers] if n.proc.pid == sid), None)


# `ray start --address` refuses to join a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("multi-node
# clusters are not supported on Windows and OSX"), and with it =1 Ray turns --node-ip-address=127.0.0.1
# into the machine's IP and listens on every interface. A worker node therefore runs the same CLI with
# the guard passed and the loopback address kept; its processes still inherit =0, so they stay on
# 127.0.0.1 like the head's.
_JOIN = (
    "import sys; import ray._private.ray_constants as c; import ray._private.services as s; "
    "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def _ray_start(
    args: list[str], temp_dir: Path, log: Path, env: dict, join: bool = False, ports: list[int] | None = None
) -> subprocess.Popen:
    ray = [str(VENV_BIN / "python"), "-c", _JOIN] if join else [str(VENV_BIN / "ray")]
    p = ports or free_ports(6)
    cmd = [
        *ray,
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--node-manager-port={p[0]}",
        f"--object-manager-port={p[1]}",
        f"--metrics-export-port={p[2]}",
        f"--dashboard-agent-listen-port={p[3]}",
        f"--dashboard-agent-grpc-port={p[4]}",
        f"--runtime-env-agent-port={p[5]}",
        # 0: workers bind ports the OS picks, so nodes and other Rays never collide on a range
        "--min-worker-port=0",
        "--max-worker-port=0",
        *args,
    ]
    return subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True, stdin=subprocess.DEVNULL
    )


def _raylet_up(node: Node) -> bool:
    """The node's raylet registered: `ray start --block` prints this once it has started it; a
    `ray start` that exited fails at once (wait_for would take its error for "not up yet")."""
    if node.proc.poll() is not None:
        return True
    return "Ray runtime started" in node.log.read_text()


def _wait_node(node: Node, what: str, timeout: float, extra=lambda: True) -> None:
    wait_for(lambda: _raylet_up(node) and extra(), what, timeout, node.log)
    if node.proc.poll() is not None:
        raise RuntimeError(f"{what}: `ray start` exited ({node.proc.returncode}):\n{node.log.read_text()[-3000:]}")


def _start_worker(cluster: Cluster, spec: dict, timeout: float) -> Node:
    i = len(cluster.workers)
    temp_dir = cluster.root / f"w{i}"
    log = cluster.logs / f"w{i}.log"
    args = [f"--address={cluster.gcs}", f"--num-cpus={spec.get('num_cpus', 1)}"]
    if spec.get("resources"):
        args.append(f"--resources={json.dumps(spec['resources'])}")
    if spec.get("labels"):
        args.append("--labels=" + ",".join(f"{k}={v}" for k, v in spec["labels"].items()))
    args.append(f"--object-store-memory={int(spec.get('object_store_memory', OBJECT_STORE))}")
    node = Node(i, _ray_start(args, temp_dir, log, cluster.node_env, join=True), temp_dir, log, spec)
    try:
        _wait_node(node, f"Ray worker node {i}", timeout)
    except BaseException:
        node.kill()
        raise
    return node


@contextmanager
def ray_cluster(
    tmp: Path,
    workers: list[dict],
    head: dict | None = None,
    fast_health_check: bool = True,
    timeout: float = 120,
    node_env: dict[str, str | None] | None = None,
):
    """A head (``head``: {"num_cpus": 0, "resources": {...}} by default no CPUs) and one worker
    node per entry of ``workers`` ({"num_cpus": 1, "resources": {"nodeA": 1}, "labels": {...}}),
    started one after the other (simultaneous starts collide). ``node_env``: what every node's
    environment holds beyond this process's, e.g. its own S3 credentials, as an instance
    profile gives a cloud node (None removes a variable). Yields a :class:`Cluster`."""
    tmp.mkdir(parents=True, exist_ok=True)
    head = {"num_cpus": 0, **(head or {})}
    # Unix sockets live under each node's temp dir and must stay under 107 bytes: a short root.
    root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # RAY_ADDRESS, tokens...
    env.update(CLUSTER_ENV, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    if fast_health_check:
        env.update(FAST_HEALTH_CHECK)
    for k, v in (node_env or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    gcs_port, dash_port, client_port, *node_ports = free_ports(9)
    head_args = [
        "--head",
        f"--port={gcs_port}",
        f"--num-cpus={head['num_cpus']}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={client_port}",
        f"--object-store-memory={int(head.get('object_store_memory', OBJECT_STORE))}",
    ]
    if head.get("resources"):
        head_args.append(f"--resources={json.dumps(head['resources'])}")
    nodes: list[Node] = []
    cluster = None
    try:
        head_node = Node(
            -1,
            _ray_start(head_args, root / "head", tmp / "head.log", env, ports=node_ports),
            root / "head",
            tmp / "head.log",
            head,
        )
        nodes.append(head_node)
        _wait_node(head_node, "Ray head", timeout, lambda: _port_open(gcs_port))
        gcs = f"127.0.0.1:{gcs_port}"
        cluster = Cluster(
            gcs=gcs,
            head=head_node,
            workers=[],
            root=root,
            logs=tmp,
            node_env=env,
            env={**CLUSTER_ENV, "RAY_ADDRESS": gcs},
            dashboard=f"http://127.0.0.1:{dash_port}",
        )
        for spec in workers:
            node = _start_worker(cluster, spec, timeout)
            cluster.workers.append(node)
        yield cluster
    finally:
        everyone = [cluster.head, *cluster.workers] if cluster else nodes
        for node in reversed(everyone):  # workers first, the head (GCS) last
            try:
                node.kill()
            except Exception:  # noqa: BLE001 - kill the rest regardless
                _kill(node.proc, grace=0)
        for node in everyone:  # keep the Ray logs: the temp dirs go
            src = node.temp_dir / "session_latest" / "logs"
            if src.is_dir():
                shutil.copytree(
                    src,
                    tmp / "logs" / node.temp_dir.name,
                    dirs_exist_ok=True,
                    symlinks=True,
                    ignore=shutil.ignore_patterns("*.sock", "*.pipe"),
                    ignore_dangling_symlinks=True,
                )
        shutil.rmtree(root, ignore_errors=True)
