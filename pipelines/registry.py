"""The model a training run logs and, with --register, its version in the MLflow registry."""

from __future__ import annotations

import sys

from .tracking import mlflow_client, package_version


def log_classifier(
    run_id: str,
    artifacts: dict,
    input_example,
    output_example,
    register: str | None = None,
    alias: str | None = None,
    name: str = "model",
    tags: dict | None = None,
) -> str:
    """Log the image classifier (pipelines/classifier.py) into run ``run_id``; with ``register``
    also a version of that registered model, and ``alias`` pointed at it. ``output_example`` is
    what the model makes of ``input_example``: the signature is stated from the two (MLflow would
    infer it with an INFO line and a warning about integer columns). Returns its URI:
    ``models:/NAME@ALIAS`` when registered with an alias, else the logged model's ``models:/`` URI.
    ``tags`` go on the LoggedModel and on the registered version (its page shows them)."""
    import contextlib
    import io
    import warnings

    import mlflow.pyfunc
    from mlflow.models import Model, infer_signature

    from . import classifier

    client = mlflow_client()
    run = client.get_run(run_id)
    # As in log_model: the LoggedModel made here, so it lands in the run's experiment.
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params, tags=tags
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "integer columns may hold missing values"
        signature = infer_signature(input_example, output_example)
        # MLflow prints its registration steps itself (eprint); the summary and this stage's line say it.
        with contextlib.redirect_stderr(io.StringIO()):
            info = Model.log(
                None,
                mlflow.pyfunc,
                name=name,
                run_id=run_id,
                model_id=logged.model_id,
                registered_model_name=register,
                python_model=classifier.__file__,
                artifacts=artifacts,
                code_paths=classifier.code_paths(),
                input_example=input_example,
                signature=signature,
                pip_requirements=[
                    f"{p}=={package_version(p)}" for p in ("torch", "torchvision", "pillow", "numpy", "pandas")
                ],
            )
    if register:
        return _named(client, register, info.registered_model_version, alias, tags or {}) or info.model_uri
    return info.model_uri


def _named(client, name: str, version, alias: str | None, tags: dict) -> str | None:
    """A new registered version: ``tags`` on its page, ``alias`` moved to it (then its URI)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if not alias:
        return None
    client.set_registered_model_alias(name, alias, version)
    print(f"train: model registered as {name} version {version}, alias @{alias}", file=sys.stderr)
    return f"models:/{name}@{alias}"


def register(model_uri: str, name: str, alias: str, tags: dict) -> str:
    """A new version of registered model ``name`` from ``model_uri`` (a logged model), with
    ``tags`` on the version page and ``alias`` moved to it; returns ``models:/NAME@ALIAS``."""
    import contextlib
    import io

    import mlflow

    client = mlflow_client()  # points the mlflow module at the tracking URI too
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow's own registration lines
        version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, alias, version.version)
    print(f"sweep: model registered as {name} version {version.version}, alias @{alias}", file=sys.stderr)
    return f"models:/{name}@{alias}"


def describe(uri: str) -> dict:
    """What a model URI names: its LoggedModel's id, type ("checkpoint": an epoch's checkpoint,
    no MLflow model files), source run, checkpoint and epoch, and for a registered version its
    name and version number (models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID,
    runs:/RUN_ID/PATH); what cannot be known is left out."""
    import re

    client = mlflow_client()
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))?", uri)
    if m and (m[2] or m[3]):
        v = client.get_model_version_by_alias(m[1], m[2]) if m[2] else client.get_model_version(m[1], m[3])
        # A version registered from a LoggedModel names it in its source (some stores leave model_id unset)
        logged = v.model_id or (v.source[len("models:/") :] if v.source.startswith("models:/m-") else None)
        found = {"name": v.name, "version": int(v.version), "model_id": logged, "run_id": v.run_id}
    elif m:
        logged = client.get_logged_model(m[1])
        found = {"model_id": logged.model_id, "run_id": logged.source_run_id}
    elif uri.startswith("runs:/"):
        found = {"run_id": uri.split("/")[1]}
    else:
        found = {}
    if found.get("model_id"):  # what train recorded on the model: its checkpoint and epoch
        logged = client.get_logged_model(found["model_id"])
        found.update(
            kind=logged.model_type,
            checkpoint=logged.tags.get("pipelines.checkpoint"),
            epoch=int(logged.tags["pipelines.epoch"]) if "pipelines.epoch" in logged.tags else None,
        )
    return {k: v for k, v in found.items() if v is not None}


def link_model(run_id: str, model_id: str) -> None:
    """Record LoggedModel ``model_id`` as an input of run ``run_id`` (the run page links to it)."""
    from mlflow.entities import LoggedModelInput

    mlflow_client().log_inputs(run_id, models=[LoggedModelInput(model_id=model_id)])


def with_checkpoint(uri: str) -> dict:
    """describe(uri) for a model whose checkpoint train recorded and which is still there; else
    a StageError that says why, in the store's words where it answered."""
    from mlflow.exceptions import MlflowException

    from . import checkpoint
    from .errors import StageError
    from .tracking import tracking_uri

    try:
        found = describe(uri)
    except MlflowException as e:
        raise StageError(
            f"Cannot find the model {uri} in the MLflow store {tracking_uri()}: {str(e).splitlines()[0][:300]}"
        ) from None
    if "checkpoint" not in found:
        raise StageError(
            f"{uri} records no checkpoint (tag pipelines.checkpoint): a model logged before train "
            "recorded one. Give its training run (--run-id) instead."
        )
    if not checkpoint.exists(found["checkpoint"]):
        raise StageError(
            f"{uri} is the checkpoint of epoch {found.get('epoch', '?')} of run {found.get('run_id', '?')}, and "
            f"{found['checkpoint']} is gone: a run keeps its --keep-checkpoints best checkpoints and removes "
            "the others. MLflow's model view lists the run's models; take one that is kept."
        )
    return found
