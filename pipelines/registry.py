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
) -> str:
    """Log the image classifier (pipelines/classifier.py) into run ``run_id``; with ``register``
    also a version of that registered model, and ``alias`` pointed at it. ``output_example`` is
    what the model makes of ``input_example``: the signature is stated from the two (MLflow would
    infer it with an INFO line and a warning about integer columns). Returns its URI:
    ``models:/NAME@ALIAS`` when registered with an alias, else the logged model's ``models:/`` URI."""
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
        experiment_id=run.info.experiment_id, name=name, source_run_id=run_id, params=run.data.params
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
    if register and alias:
        client.set_registered_model_alias(register, alias, info.registered_model_version)
        print(
            f"train: model registered as {register} version {info.registered_model_version}, alias @{alias}",
            file=sys.stderr,
        )
        return f"models:/{register}@{alias}"
    return info.model_uri


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
