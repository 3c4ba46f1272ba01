"""MLflow: where runs go, runs, params, metrics, artifacts, and a stage run's bookkeeping. Every
MLflow call of the project lives here, in pipelines/lineage.py (which runs made what a run read)
or in pipelines/registry.py (the logged model and its registered versions).

    MLFLOW_TRACKING_URI=http://mlflow:5000 python -m pipelines ...   # a server
    python -m pipelines ...                     # default: sqlite:///$PWD/mlflow.db, artifacts in $PWD/mlartifacts

Only the driver or training rank 0 calls this module; ``model/`` never does. Every function
takes an explicit ``run_id`` and talks through ``MlflowClient``: there is no active-run state,
so any process (a Ray job driver, a restarted rank 0) can log into the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import os
import platform
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .errors import StageError, StrictFailure

RUN_NAME_TAG = "pipelines.run_name"
STAGE_TAG = "pipelines.stage"
OUTPUT_DIGESTS_TAG = "pipelines.output_digests"  # all output digests of a stage run, space-separated
MASK = "***"
STATUSES = ("FINISHED", "FAILED", "KILLED")

# mlflow/utils/validation.py (3.17): longer param values are truncated by the store anyway; we
# truncate first so "already logged with the same value?" compares what the store really holds.
MAX_PARAM_VALUE = 6000
# mlflow/utils/validation.py MAX_DATASET_DIGEST_SIZE: a sha256 (64 hex) is rejected as a dataset
# digest, so the dataset carries a prefix and the full digest goes in its profile and an input tag.
MAX_DATASET_DIGEST = 36
_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH

# Matched against dotted key names: AWS_SECRET_ACCESS_KEY, aws_access_key_id, hf_token, db.password...
# but not "keep_aspect" or the index's "key" column.
_SECRET = re.compile(
    r"secret|token|password|passwd|credential|access[_-]?key|api[_-]?key|private[_-]?key", re.IGNORECASE
)
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")

PACKAGES = ("torch", "torchvision", "ray", "mlflow", "webdataset", "boto3", "numpy", "pillow", "pyarrow")
PROJECT_DIR = Path(__file__).resolve().parents[1]


# --- where runs go --------------------------------------------------------------------------


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded default: a SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"


def configure() -> str:
    """Point the ``mlflow`` module at :func:`tracking_uri` (model logging and registry use it).

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (mlflow/tracking/_tracking_service/
    utils.py), so processes started afterwards, such as a local Ray, use this same absolute store.
    """
    import logging

    import mlflow

    # A new SQLite store announces its table creation at INFO: not news to the user.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # Ending a run on a tracking server prints "View run ... at: URL" to stdout, where each stage
    # promises one JSON line only (which holds the run's id); the summaries say where runs are.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient(configure())


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _local_artifact_root(uri: str) -> Path | None:
    """Artifacts sit next to a local store's file. MLflow's own default, ``./mlruns``, is
    resolved against each process's cwd, so Ray workers started elsewhere would scatter them."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts"
    if uri.startswith("file:") or "://" not in uri:
        return Path(uri.removeprefix("file://")).resolve().parent / "mlartifacts"
    return None  # a server or a database elsewhere: the server decides (it proxies artifacts)


def redact_url(text: str) -> str:
    return _URL_USERINFO.sub(r"\1***@", text)


def check_reachable(timeout: float = 3.0) -> None:
    """Fail fast with the fix when a tracking server is configured but down; MLflow itself
    would retry each request for minutes before giving up."""
    uri = tracking_uri()
    if not is_server_uri(uri):
        return
    shown = redact_url(uri)
    fix = "Start it, or unset MLFLOW_TRACKING_URI to use the local SQLite store."
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as e:
        raise StageError(
            f"MLflow tracking server at {shown} answered /health with HTTP {e.code}: is it an MLflow server? {fix}"
        ) from None
    except (OSError, ValueError) as e:  # URLError, refused, timeout, DNS, malformed URL
        reason = getattr(e, "reason", e)
        raise StageError(f"MLflow tracking server at {shown} is not reachable ({reason}). {fix}") from None


def is_outage(e: BaseException) -> bool:
    """Whether a tracking call failed because the server is away (refused, timed out, reset,
    or it answered 5xx): worth waiting for. Anything else (a bad request, a missing file, a
    bug) is not, and must fail with its own message."""
    import re

    names = {
        "ConnectionError",
        "Timeout",
        "ConnectTimeout",
        "ReadTimeout",
        "MaxRetryError",
        "NewConnectionError",
        "ProtocolError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "ConnectionAbortedError",
        "TimeoutError",
        "RemoteDisconnected",
    }
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in names and type(e).__module__.split(".")[0] in (
            "requests",
            "urllib3",
            "builtins",
            "http",
            "socket",
        ):
            return True
        if type(e).__name__ == "RestException" and getattr(e, "get_http_status_code", lambda: 0)() >= 500:
            return True
        if re.search(r"failed with error code 5\d\d|too many 5\d\d error responses", str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, creating it (with an absolute artifact location on a local store)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = _local_artifact_root(tracking_uri())
        try:
            return client.create_experiment(name, artifact_location=(root / name).as_uri() if root else None)
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # another process created it meanwhile
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise StageError(
            f"MLflow experiment '{name}' is deleted. Restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) "
            "or choose another experiment name."
        )
    return exp.experiment_id


# --- runs -----------------------------------------------------------------------------------


def _quote(value: str) -> str:
    """A string literal for an MLflow filter; its grammar has no escape for a quote inside."""
    for q in ("'", '"'):
        if q not in value:
            return f"{q}{value}{q}"
    raise StageError(f"Name {value!r} contains both ' and \": MLflow cannot search for it. Choose another.")


def standard_tags(stage: str) -> dict[str, str]:
    """MLflow's own tags, which fill the UI's User, Source and Version columns (MLflow sets them
    only for runs started with mlflow.start_run; these runs are made with the client)."""
    import getpass

    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    tags = {
        MLFLOW_USER: os.environ.get("PIPELINES_USER") or user,  # a job: who submitted it
        MLFLOW_SOURCE_NAME: f"python -m pipelines {stage}",
        MLFLOW_SOURCE_TYPE: "JOB" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "LOCAL",
    }
    sha = environment()["git_sha"]
    if sha != "unknown":
        tags[MLFLOW_GIT_COMMIT] = sha
    return tags


def _newest_named(client, exp_id: str, run_name: str):
    """The experiment's run tagged with ``run_name`` (the newest if several), or None."""
    found = client.search_runs(
        [exp_id], f"tags.`{RUN_NAME_TAG}` = {_quote(run_name)}", order_by=["attributes.start_time DESC"], max_results=1
    )
    return found[0] if found else None


def find_run(experiment: str, run_name: str) -> str | None:
    """The id of ``experiment``'s run tagged with ``run_name`` (the newest if several), or None."""
    run = _newest_named(mlflow_client(), experiment_id(experiment), run_name)
    return run.info.run_id if run else None


def start_or_resume_run(experiment: str, run_name: str, tags: dict | None = None) -> str:
    """The run of ``experiment`` tagged with ``run_name`` (the newest if several), else a new one.

    This is what keeps one training run one MLflow run across worker restarts and reruns of
    the same ``--name``. A resumed run is set back to RUNNING.
    """
    client = mlflow_client()
    exp_id = experiment_id(experiment)
    all_tags = {**_clean_strings(tags or {}), RUN_NAME_TAG: run_name}
    run = _newest_named(client, exp_id, run_name)
    if run is None:
        stage = (tags or {}).get(STAGE_TAG, run_name)
        return client.create_run(exp_id, run_name=run_name, tags={**standard_tags(stage), **all_tags}).info.run_id
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    set_tags(run.info.run_id, all_tags)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", end_time: float | None = None) -> None:
    """``end_time``: when it ended (time.time()), if not now."""
    if status not in STATUSES:
        raise ValueError(f"Unknown run status {status!r}. Expected one of: {', '.join(STATUSES)}.")
    mlflow_client().set_terminated(run_id, status, end_time=int(end_time * 1000) if end_time else None)


def set_tags(run_id: str, tags: dict) -> None:
    """Set (or overwrite) run tags; nested dicts become dotted keys, secrets are masked."""
    from mlflow.entities import RunTag

    client = mlflow_client()
    items = [RunTag(k, v) for k, v in _clean_strings(tags).items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, tags=items[i : i + _BATCH])


def get_tags(run_id: str) -> dict[str, str]:
    """The tags of ``run_id``; a run that is not in the configured store is a StageError that
    names the store searched and how to point at another (never an empty store created)."""
    uri = tracking_uri()
    fix = (
        "Set MLFLOW_TRACKING_URI to the store that holds it (the demo's is sqlite:///<its --out>/mlflow.db; "
        "a team's is its server, http://HOST:5000)."
    )
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise StageError(
            f"Run {run_id} not found: there is no MLflow store at {uri} "
            f"(MLFLOW_TRACKING_URI "
            f"{'is' if os.environ.get('MLFLOW_TRACKING_URI') else 'unset: the default is ./mlflow.db'}). {fix}"
        )
    from mlflow.exceptions import MlflowException

    try:
        return dict(mlflow_client().get_run(run_id).data.tags)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise StageError(f"Run {run_id} is not in the MLflow store {redact_url(uri)}. {fix}") from None


# --- params and metrics ---------------------------------------------------------------------


def _flatten(obj: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _clean_strings(values: Mapping) -> dict[str, str]:
    """Flattened, stringified, secrets masked, credentials cut out of URLs."""
    return {k: MASK if _SECRET.search(k) else redact_url(str(v)) for k, v in _flatten(values).items()}


def mask_secrets(obj):
    """The same masking inside a JSON-like value (summaries written as artifacts)."""
    if isinstance(obj, Mapping):
        return {k: MASK if isinstance(k, str) and _SECRET.search(k) else mask_secrets(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v) for v in obj]
    return redact_url(obj) if isinstance(obj, str) else obj


def log_params(run_id: str, params: dict) -> list[str]:
    """Log ``params`` (nested dicts as dotted keys), skipping those already logged with the same value.

    MLflow refuses to change a logged param; a key logged before with another value is left as
    it was and returned, so the caller can warn (a resumed run whose config changed).
    """
    from mlflow.entities import Param

    client = mlflow_client()
    have = client.get_run(run_id).data.params
    new, conflicts = [], []
    for key, value in _clean_strings(params).items():
        value = value[:MAX_PARAM_VALUE]
        if key not in have:
            new.append(Param(key, value))
        elif have[key] != value:
            conflicts.append(key)
    for i in range(0, len(new), _BATCH):
        client.log_batch(run_id, params=new[i : i + _BATCH])
    return conflicts


def _numeric(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, complex)


def logged_steps(run_id: str, key: str) -> list[int]:
    return sorted({m.step for m in mlflow_client().get_metric_history(run_id, key)})


def log_metrics(
    run_id: str, metrics: dict, step: int = 0, model_id: str | None = None, dataset: tuple[str, str] | None = None
) -> None:
    """Log each numeric metric at ``step`` (the newest value at a step is the one shown); with
    ``model_id``, as that LoggedModel's metrics too, measured on ``dataset`` (name, digest)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    name, digest = dataset or (None, None)
    batch = [Metric(k, float(v), now, step, model_id, name, digest) for k, v in metrics.items() if _numeric(v)]
    for i in range(0, len(batch), 1000):  # MAX_METRICS_PER_BATCH
        mlflow_client().log_batch(run_id, metrics=batch[i : i + 1000])


def log_metrics_once(run_id: str, metrics: dict, step: int, model_id: str | None = None, **of) -> dict:
    """Log each numeric metric at ``step`` unless it already has a value there, so a restarted
    worker that replays an epoch does not draw the curve twice. Returns what was logged.
    With ``model_id``: unless that LoggedModel has it (the run may have it from another model of
    the same epoch); ``of``: log_metrics's dataset."""
    if model_id:
        had = {(m.key, m.step) for m in mlflow_client().get_logged_model(model_id).metrics or []}
        logged = {k: float(v) for k, v in metrics.items() if _numeric(v) and (k, step) not in had}
    else:
        logged = {k: float(v) for k, v in metrics.items() if _numeric(v) and step not in logged_steps(run_id, k)}
    log_metrics(run_id, logged, step, model_id=model_id, **of)
    return logged


CHECKPOINT_TAG, EPOCH_TAG = "pipelines.checkpoint", "pipelines.epoch"


def checkpoint_model(run_id: str, epoch: int, checkpoint: str) -> str:
    """The id of the LoggedModel that stands for run ``run_id``'s checkpoint of ``epoch`` (at
    ``checkpoint``), made the first time it is asked for: MLflow's model view then lists every
    epoch's checkpoint with its metrics, and `evaluate --model` / `predict --model` take its URI."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = mlflow_client()
    exp_id = client.get_run(run_id).info.experiment_id
    name = f"epoch-{epoch}"
    found = client.search_logged_models(
        experiment_ids=[exp_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'", max_results=1
    )
    if found:  # a replayed epoch (a restarted worker, or the driver catching up after an outage)
        return found[0].model_id
    model = client.create_logged_model(
        exp_id,
        name=name,
        source_run_id=run_id,
        tags={CHECKPOINT_TAG: checkpoint, EPOCH_TAG: str(epoch)},
        model_type="checkpoint",
    )
    client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=epoch)])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


# --- artifacts ------------------------------------------------------------------------------


def json_default(obj):
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors: numbers, not "0.5"
        return obj.tolist()
    return str(obj)  # Paths, datetimes


def start_pipeline_run(experiment: str, run_name: str, command: str, tags: dict | None = None) -> str:
    """A run that stands for a whole pipeline (``command``, e.g. demo): its stage runs are created
    with it as parent."""
    return (
        mlflow_client()
        .create_run(
            experiment_id(experiment),
            run_name=run_name,
            tags={**standard_tags(command), STAGE_TAG: "pipeline", **_clean_strings(tags or {})},
        )
        .info.run_id
    )


def start_child_run(parent_run_id: str, run_name: str, stage: str, tags: dict | None = None) -> str:
    """A new run nested under ``parent_run_id`` in its experiment (the UI shows it under the
    parent's row): an evaluation of a training run is a run of its own, every time."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    return client.create_run(
        parent.info.experiment_id,
        run_name=run_name,
        tags={
            **standard_tags(stage),
            STAGE_TAG: stage,
            MLFLOW_PARENT_RUN_ID: parent_run_id,
            **_clean_strings(tags or {}),
        },
    ).info.run_id


def log_table(run_id: str, rows: list[dict], artifact_file: str) -> None:
    """Rows as an MLflow table (the UI's artifact view and Evaluation tab show it)."""
    import pandas as pd

    mlflow_client().log_table(run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)


def log_figure(run_id: str, figure, artifact_file: str) -> None:
    mlflow_client().log_figure(run_id, figure, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    mlflow_client().log_text(run_id, text, artifact_file)


def log_json(run_id: str, obj, artifact_file: str) -> None:
    mlflow_client().log_text(
        run_id, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n", artifact_file
    )


def log_yaml(run_id: str, obj, artifact_file: str) -> None:
    import yaml

    plain = json.loads(json.dumps(obj, default=json_default))  # safe_dump knows no numpy or Paths
    mlflow_client().log_text(run_id, yaml.safe_dump(plain, sort_keys=False), artifact_file)


def log_file(run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    mlflow_client().log_artifact(run_id, str(local_path), artifact_path)


# --- how a run was made ---------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(dist: str) -> str:
    from importlib import metadata

    for name in (dist, f"{dist}-skinny"):  # mlflow may be installed as mlflow-skinny
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return "not installed"


def environment() -> dict:
    """Git SHA of the project, Python and library versions. Never environment variables."""
    top = _git("rev-parse", "--show-toplevel")
    # Only our own checkout counts: an installed copy inside some other repository is not "at" its HEAD.
    in_checkout = top is not None and Path(top).resolve() == PROJECT_DIR
    sha = _git("rev-parse", "HEAD") if in_checkout else None
    status = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    if sha is None and os.environ.get("PIPELINES_GIT_SHA"):
        # A Ray job's working dir or a container image has no .git: `submit` and the image build
        # pass the SHA they were made from.
        return {
            "git_sha": os.environ["PIPELINES_GIT_SHA"],
            "git_dirty": os.environ.get("PIPELINES_GIT_DIRTY", "unknown") == "true",
            "python": platform.python_version(),
            "versions": {p: package_version(p) for p in PACKAGES},
        }
    return {
        "git_sha": sha or "unknown",
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "versions": {p: package_version(p) for p in PACKAGES},
    }


# --- stages ---------------------------------------------------------------------------------


def _digest_tags(name: str, value) -> dict[str, str]:
    if isinstance(value, Mapping):
        return {f"pipelines.{name}.{k}": str(v) for k, v in value.items() if v is not None}
    return {f"pipelines.{name}": str(value)} if value is not None else {}


def _summary_metrics(summary: dict) -> dict[str, float]:
    out = {}
    for key, value in summary.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items() if _numeric(v)})
        elif _numeric(value):
            out[key] = value
    return out


def _record_summary(run_id: str, summary: dict) -> None:
    log_metrics_once(run_id, _summary_metrics(summary), step=0)
    output = _digest_tags("output_digest", summary.get("output_digest"))
    tags = {**_digest_tags("input_digest", summary.get("input_digest")), **output}
    if output:
        tags[OUTPUT_DIGESTS_TAG] = " ".join(sorted(output.values()))
    if summary.get("data") is not None:
        tags["pipelines.data"] = summary["data"]
    tags.update(allowed_stale_tag(summary.get("allowed_stale")))
    set_tags(run_id, tags)
    log_json(run_id, mask_secrets(summary), "summary.json")


def allowed_stale_tag(reasons: list[str] | None) -> dict:
    """--allow-stale let a run read stale inputs: a tag says which, for whoever reads its results."""
    return {"pipelines.allowed_stale": "; ".join(reasons)[:4000]} if reasons else {}


@contextlib.contextmanager
def on_a_thread(fn: Callable, *args):
    """Run ``fn(*args)`` (MLflow work, such as opening a run) on a thread of its own while the
    caller works; yields its future, and waits for it on leaving.

    MLFLOW_TRACKING_URI is resolved first, in the caller's thread, so that a process started
    meanwhile (a local Ray) uses the same store (configure() exports it too, once MLflow is
    imported). numpy and pyarrow are imported first too: two threads importing one package's
    circular modules at once can deadlock."""
    from concurrent.futures import ThreadPoolExecutor

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    import numpy  # noqa: F401
    import pyarrow  # noqa: F401

    with ThreadPoolExecutor(1, thread_name_prefix="mlflow") as pool:
        yield pool.submit(fn, *args)


def track_stage(
    stage: str, cfg, fn: Callable, experiment: str = "preprocessing", parent_run_id: str | Future | None = None
) -> dict:
    """``summary = fn(cfg)`` inside an MLflow run of its own; returns the summary plus ``mlflow_run_id``.

    Params: the config and :func:`environment`. Metrics: the summary's numbers. Tags: stage,
    input/output digests, the dataset ROOT. The run ends FAILED (re-raising) when ``fn`` raises;
    a StrictFailure's summary is recorded first, since its work is complete. With
    ``parent_run_id`` the run is nested under it (the UI nests runs of the same experiment only);
    it may be the future of a parent run still opening, waited for on the stage run's thread.

    The run is opened on a thread while ``fn`` works: importing MLflow and opening its store take
    ~2 s of one core (on SQLite, half of it SQLAlchemy's mappers), which a stage run from the
    command line would otherwise spend before its first image. If the run cannot be opened, the
    stage stops at its next progress report (common.Progress), not hours later at its end; what
    it wrote is kept, and a rerun skips it.
    """
    from . import common

    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        config = dataclasses.asdict(cfg)
    else:
        config = dict(cfg or {})
    tags = {STAGE_TAG: stage}
    if config.get("data") is not None:
        tags["pipelines.data"] = config["data"]

    def open_run() -> str:
        parent = parent_run_id.result() if isinstance(parent_run_id, Future) else parent_run_id
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = (
            mlflow_client()
            .create_run(
                experiment_id(experiment), run_name=stage, tags={**standard_tags(stage), **_clean_strings(tags)}
            )
            .info.run_id
        )
        log_params(run_id, {**config, **environment()})
        return run_id

    with on_a_thread(open_run) as opening:
        try:
            with common.stop_on_failure(opening):
                summary = fn(cfg)
        except BaseException as e:  # KeyboardInterrupt too: the run must not stay RUNNING forever
            if opening.exception() is None:  # (waits for it)
                if isinstance(e, StrictFailure):
                    _record_summary(opening.result(), e.summary)
                _fail(opening.result(), e, "FAILED" if isinstance(e, Exception) else "KILLED")
            raise
    run_id = opening.result()  # the stage's work is done and kept; without its run, this raises
    _record_summary(run_id, summary)
    end_run(run_id, "FINISHED")
    return {**summary, "mlflow_run_id": run_id}


def _fail(run_id: str, error: BaseException, status: str) -> None:
    set_tags(run_id, {"pipelines.error": f"{type(error).__name__}: {error}"})
    end_run(run_id, status)
