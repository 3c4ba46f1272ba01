"""Real services on loopback for the integration tests: SeaweedFS (S3), an MLflow tracking
server with its artifacts in that S3, and a Ray head with token authentication.

Each runs as a child process in its own process group with state in a temp folder, on free
ports, and is killed at the end (SeaweedFS ignores SIGTERM for >20 s: it gets SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY = "alexnet-test", "s3cr3t-Value-that-must-never-leak"
BUCKET = "alexnet"


def _listen_range() -> range:
    """Where the tests' servers listen: below the kernel's ephemeral range (where an outgoing
    connection could take a server's port while it is down for a restart) and above Ray's
    default worker ports (10002-19999)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(20000, low) if low > 21000 else range(0)


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now that this process has not handed out before (two servers
    started one after the other never get the same one)."""
    ports = _listen_range()
    for _ in range(1000):
        port = random.choice(ports) if ports else 0
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {ports}")


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


def wait_for(check, what: str, timeout: float = 60, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def _http_ok(url: str) -> bool:
    """The server answers (an auth refusal counts: it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill(proc: subprocess.Popen, grace: float = 3) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def s3_env(port: int, secret: str = SECRET_KEY) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
    }


class SeaweedFS:
    """S3 on loopback with one identity (other credentials are refused); stop() and start()
    again keep its ports and data, as a restarted server would."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        (tmp / "data").mkdir(parents=True, exist_ok=True)
        (tmp / "s3.json").write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "tester",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        # Every port it listens on, so that two servers (or one restarted) never meet on a default:
        # its gRPC ports default to each HTTP port + 10000, its Iceberg and Lance ports to fixed ones.
        self.ports = {
            name: free_port()
            for name in (
                "s3",
                "master",
                "filer",
                "volume",
                "admin",
                "debug",
                "webdav",
                "s3.port.grpc",
                "master.port.grpc",
                "filer.port.grpc",
                "volume.port.grpc",
                "admin.port.grpc",
                "s3.port.iceberg",
                "s3.port.lance",
            )
        }
        self.port = self.ports["s3"]
        self.env = s3_env(self.port)
        self.log = tmp / "weed.log"
        self.proc = None

    def start(self) -> None:
        p = self.ports
        cmd = [
            str(VENV_BIN / "weed"),
            f"-logdir={self.tmp}",  # its own log files, which otherwise pile up in /tmp
            "mini",
            f"-dir={self.tmp / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={BUCKET}",
            f"-s3.config={self.tmp / 's3.json'}",
            f"-s3.port={p['s3']}",
            f"-master.port={p['master']}",
            f"-filer.port={p['filer']}",
            f"-volume.port={p['volume']}",
            f"-admin.port={p['admin']}",
            f"-debug.port={p['debug']}",
            f"-webdav.port={p['webdav']}",
            *[f"-{name}={port}" for name, port in p.items() if "." in name],
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)

        def bucket_ready():
            import boto3

            s3 = boto3.client(
                "s3",
                endpoint_url=self.env["AWS_ENDPOINT_URL"],
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name="us-east-1",
            )
            s3.put_object(Bucket=BUCKET, Key="_ready", Body=b"1")
            return True

        wait_for(bucket_ready, "SeaweedFS S3", 90, self.log)

    def identities(self, extra: list[dict]) -> None:
        """Make ``extra`` the identities beside the tests' own, on the running server:
        SeaweedFS reloads its -s3.config file on SIGHUP, so keys are issued and revoked live,
        as an operator (or a cloud's credential service) does. Entries look like
        {"name": ..., "credentials": [{"accessKey": ..., "secretKey": ...}], "actions": [...]}."""
        cfg = json.loads((self.tmp / "s3.json").read_text())
        cfg["identities"] = [i for i in cfg["identities"] if i["name"] == "tester"] + extra
        staged = self.tmp / ".s3.json.new"
        staged.write_text(json.dumps(cfg))
        staged.replace(self.tmp / "s3.json")  # the server never reads a half-written file
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc, grace=1)
            self.proc = None


@contextmanager
def seaweedfs(tmp: Path):
    server = SeaweedFS(tmp)
    server.start()
    try:
        yield {"port": server.port, "env": server.env, "proc": server.proc, "log": server.log, "server": server}
    finally:
        server.stop()


class MlflowServer:
    """An MLflow tracking server that a test can stop and start again on the same port and store."""

    def __init__(self, tmp: Path, s3: dict | None = None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp, self.s3, self.port = tmp, s3, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "mlflow.log"
        self.proc = None

    def start(self) -> None:
        env = {**os.environ, **(self.s3["env"] if self.s3 else {})}
        if self.s3:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3["env"]["AWS_ENDPOINT_URL"]
        env.pop("MLFLOW_TRACKING_URI", None)
        artifacts = f"s3://{BUCKET}/mlartifacts" if self.s3 else str(self.tmp / "artifacts")
        cmd = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.tmp}/mlflow.db",
            "--artifacts-destination",
            artifacts,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runners: tracking only
        self.proc = subprocess.Popen(
            cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        wait_for(lambda: _http_ok(f"{self.uri}/health"), "MLflow server", 120, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc)
            self.proc = None


@contextmanager
def mlflow_server(tmp: Path, s3: dict | None = None):
    server = MlflowServer(tmp, s3)
    server.start()
    try:
        yield {"uri": server.uri, "proc": server.proc, "port": server.port, "log": server.log, "server": server}
    finally:
        server.stop()


@contextmanager
def ray_head(tmp: Path, num_cpus: int = 2, node_env: dict | None = None):
    """`ray start --head --block` in its own temp dir; stopped by killing its process group
    (not `ray stop`, which would also stop the tests' own local Ray). ``node_env``: the node's
    own settings, e.g. its S3 credentials (as an instance profile gives a cloud node: jobs
    bring none)."""
    tmp.mkdir(parents=True, exist_ok=True)
    gcs, dash = free_port(), free_port()
    log = tmp / "ray.log"
    # Ray's unix sockets live under --temp-dir and must stay under 107 bytes: a short folder.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {
        **os.environ,
        **(node_env or {}),
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={ray_tmp}",
        "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        # 0: workers bind ports the OS picks, never a range shared with the tests' own Ray
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for(lambda: _port_open(dash) and _http_ok(f"{address}/api/version"), "Ray head", 120, log)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "proc": proc, "log": log}
    finally:
        _kill(proc, grace=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
