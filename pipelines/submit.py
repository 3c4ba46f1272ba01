"""Submit any stage to a Ray cluster through the Ray Jobs API, and follow it.

    python -m pipelines submit [--address http://head:8265] [--no-wait] -- shard --data s3://bucket/imagenet
    python -m pipelines submit --list | --logs JOB_ID | --stop JOB_ID

The job runs ``python -m pipelines <stage> <args...>`` on the cluster with this project
shipped as its working directory (``.venv``, ``.git``, data, run and tracking folders left
out, so the upload stays far under Ray's limit) and with MLFLOW_TRACKING_URI and the AWS_*
settings of this shell forwarded. The address comes from ``--address`` or RAY_ADDRESS; Ray's
token authentication uses RAY_AUTH_TOKEN or the token file (~/.ray/auth_token). ``submit``
follows the job's logs and exits with the job's exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

from .cluster import forwarded_env
from .common import fmt_seconds, off_the_main_thread
from .config import SubmitConfig
from .errors import StageError

PROJECT = Path(__file__).resolve().parent.parent
# Never shipped: environments, history, datasets, checkpoints and local tracking stores.
EXCLUDES = [
    ".venv",
    ".git",
    ".stack",
    ".pytest_cache",
    "__pycache__",
    "*.egg-info",
    "demo",
    "data",
    "runs",
    "mlruns",
    "mlartifacts",
    "*.db",
    "*.tar",
    "*.parquet",
]
STAGES = ("sample", "index", "shard", "stats", "prepare", "status", "train", "sweep", "evaluate", "predict", "demo")
DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def _client(address: str):
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's client announces each step of packaging and uploading the project, the log stream's
    # close, and (at WARNING) that it leaves .git out, which EXCLUDES does anyway: submit says in
    # its own lines what was submitted and how it ended. Ray's errors still show.
    # (Ray's job client modules set their own loggers to INFO: each is set back here.)
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - translated into an error that names the address
        raise _explain(e, address) from None


def _explain(e: Exception, address: str) -> StageError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if type(e).__name__ == "AuthenticationError" or "uthentication" in text:
        return StageError(f"The Ray cluster at {address} refused the request: {text} {_token_hint()}")
    if isinstance(e, ConnectionError) or "onnect" in text:
        return StageError(
            f"Cannot reach the Ray Jobs API at {address} ({text}): is the cluster up, and is "
            "the address its dashboard (http://head:8265)?"
        )
    return StageError(f"Ray Jobs API at {address}: {text}")


def _token_hint() -> str:
    """What is missing for Ray's token authentication, from this client's settings."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            "Set RAY_AUTH_MODE=token: without it this client sends no token at all (the token itself "
            "comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."
        )
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not os.environ.get("RAY_AUTH_TOKEN") and not path.exists():
        return (
            f"No token found: set RAY_AUTH_TOKEN to the cluster's token, or copy it to {path} "
            "(`ray start` keeps it in ~/.ray/auth_token on the head node)."
        )
    given = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else str(path)
    return (
        f"The token in {given} is not this cluster's: use the head node's (~/.ray/auth_token there, "
        "or `ray get-auth-token` on it)."
    )


def _call(address: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        raise _explain(e, address) from None


def runtime_env() -> dict:
    from . import tracking

    env = forwarded_env()
    here = tracking.environment()  # the shipped copy has no .git: say which commit it is
    if here["git_sha"] != "unknown":
        env["PIPELINES_GIT_SHA"] = here["git_sha"]
        env["PIPELINES_GIT_DIRTY"] = "true" if here["git_dirty"] else "false"
    import getpass

    try:  # the runs' mlflow.user: who submitted, not the cluster's account
        env["PIPELINES_USER"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    return {"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env}


async def _follow(client, job_id: str, tail: list[str]) -> None:
    """The job's log lines to stdout as they come; its last lines kept in ``tail``."""
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        tail[:] = (tail + chunk.splitlines())[-20:]


def _run_link(tail: list[str]) -> str:
    """Where the job's MLflow run is, from the stage's own last line (a JSON summary), if it has one."""
    import json

    for line in reversed(tail):
        try:
            summary = json.loads(line)
        except ValueError:
            continue
        run_id = (summary.get("mlflow_run_id") or summary.get("run_id")) if isinstance(summary, dict) else None
        if not run_id:
            return ""
        uri = os.environ.get("MLFLOW_TRACKING_URI", "").rstrip("/")
        try:  # the UI's address of a run holds its experiment
            from . import tracking

            experiment = tracking.mlflow_client().get_run(run_id).info.experiment_id
            return f"; MLflow run {uri}/#/experiments/{experiment}/runs/{run_id}"
        except Exception:  # noqa: BLE001 - the server is away: the id still finds it
            return f"; MLflow run {run_id}"
    return ""


# the stages that record MLflow runs (predict: in bulk; it reads its model from the store anyway)
TRACKED = ("index", "shard", "stats", "prepare", "train", "sweep", "evaluate", "predict")


def _check_tracking(stage: str) -> None:
    """A tracked stage in a job needs a tracking server: without one it would log into a SQLite
    file in the job's temporary working directory (and Ray Train's rank 0 into another on its
    node), and the runs would be lost with it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if stage in TRACKED and not uri.startswith(("http://", "https://", "databricks")):
        shown = f"'{uri}'" if uri else "unset"
        raise StageError(
            f"MLFLOW_TRACKING_URI is {shown}: a '{stage}' job on a cluster would record its runs in "
            "a file inside the job's temporary folder, lost when the job ends. Set "
            "MLFLOW_TRACKING_URI to the cluster's tracking server (http://HOST:PORT), reachable "
            "from every node."
        )


def run(cfg: SubmitConfig) -> dict:
    if cfg.args and not (cfg.list or cfg.logs or cfg.stop):
        _check_tracking(cfg.args[0])  # before anything reaches the cluster
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise StageError("No Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS.")
    if not address.startswith(("http://", "https://")):
        raise StageError(
            f"--address {address}: the Jobs API needs the dashboard's HTTP address, e.g. http://127.0.0.1:8265"
        )
    client = _client(address)
    if cfg.list:
        jobs = _call(address, client.list_jobs)
        rows = [{"job_id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint} for j in jobs]
        for r in rows:
            print(f"{r['job_id']:<28} {r['status']:<10} {r['entrypoint']}", file=sys.stderr)
        return {"stage": "submit", "jobs": rows}
    if cfg.logs:
        sys.stdout.write(_call(address, client.get_job_logs, cfg.logs))
        return {
            "stage": "submit",
            "job_id": cfg.logs,
            "status": str(_call(address, client.get_job_status, cfg.logs).value),
        }
    if cfg.stop:
        stopped = _call(address, client.stop_job, cfg.stop)
        return {"stage": "submit", "job_id": cfg.stop, "stopped": bool(stopped)}
    if cfg.follow:
        entrypoint = _call(address, client.get_job_info, cfg.follow).entrypoint
        with _left_running(cfg, address, client, cfg.follow):
            return _until_done(address, client, cfg.follow, entrypoint)

    if not cfg.args or cfg.args[0] not in STAGES:
        got = cfg.args[0] if cfg.args else "nothing"
        raise StageError(
            f"submit needs a stage after '--', got {got}. Expected one of: {', '.join(STAGES)} "
            "(e.g. python -m pipelines submit -- shard --data s3://bucket/imagenet)."
        )
    entrypoint = "python -m pipelines " + shlex.join(cfg.args)
    job_id = _call(
        address,
        lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(), metadata={"stage": cfg.args[0]}),
    )
    with _left_running(cfg, address, client, job_id):
        print(f"submitted {job_id}: {entrypoint}", file=sys.stderr, flush=True)
        if not cfg.wait:
            return {"stage": "submit", "job_id": job_id, "status": "PENDING", "entrypoint": entrypoint}
        return _until_done(address, client, job_id, entrypoint)


@contextlib.contextmanager
def _left_running(cfg: SubmitConfig, address: str, client, job_id: str):
    """Ctrl-C while a job is followed leaves it running and says how to follow or stop it
    (--stop-on-interrupt stops it): the job may hold hours of work."""
    try:
        yield
    except KeyboardInterrupt:
        if cfg.stop_on_interrupt:
            _call(address, client.stop_job, job_id)
            raise KeyboardInterrupt(f"job {job_id} stopped (--stop-on-interrupt)") from None
        raise KeyboardInterrupt(
            f"job {job_id} goes on; follow it: python -m pipelines submit --follow {job_id}; "
            f"stop it: python -m pipelines submit --stop {job_id}"
        ) from None


def _until_done(address: str, client, job_id: str, entrypoint: str) -> dict:
    """Follow the job's logs to its end; its summary, with the job's exit code."""
    t0, tail = time.monotonic(), []
    # The log stream's event loop runs on a thread of its own, so Ctrl-C is raised here at once
    # and never inside it: asyncio's own handler only cancels the task (a stream that ends
    # quietly on cancel swallowed the interrupt), and one raised inside the loop could leave
    # its clean-up printing tracebacks.
    off_the_main_thread(lambda: asyncio.run(_follow(client, job_id, tail)), "job-logs")
    info = _call(address, client.get_job_info, job_id)
    while str(info.status.value) not in DONE:  # the log stream can end a moment before the status
        time.sleep(0.5)
        info = _call(address, client.get_job_info, job_id)
    status = str(info.status.value)
    code = getattr(info, "driver_exit_code", None)
    exit_code = 0 if status == "SUCCEEDED" else (code if code not in (None, 0) else 1)
    print(f"{job_id}: {status} after {fmt_seconds(time.monotonic() - t0)}{_run_link(tail)}", file=sys.stderr)
    return {
        "stage": "submit",
        "job_id": job_id,
        "status": status,
        "entrypoint": entrypoint,
        "message": info.message,
        "exit_code": exit_code,
    }
