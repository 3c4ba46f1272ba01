"""Lineage: which runs made what a training run read. Every stage run tags the digests of its
inputs and outputs (tracking.track_stage); a training run logs the shards it read as MLflow
datasets and links the index, shard and stats runs behind them, in any experiment.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .common import digest
from .tracking import (
    MAX_DATASET_DIGEST,
    OUTPUT_DIGESTS_TAG,
    STAGE_TAG,
    is_server_uri,
    json_default,
    mask_secrets,
    mlflow_client,
    redact_url,
    set_tags,
)


def log_dataset(
    run_id: str, name: str, digest: str, source: str, context: str = "training", profile: dict | None = None
) -> None:
    """Record that the run read dataset ``name`` (e.g. the train shards) with this manifest digest.

    ``source`` is where the manifest lives (``ROOT/shards/train.json``); it is stored as MLflow's
    dataset sources store it (``{"uri": ...}``), typed s3, http or local.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = str(source)
    if source.startswith("s3://"):
        source_type, source_json = "s3", {"uri": source}
    elif is_server_uri(source):
        source_type, source_json = "http", {"url": redact_url(source)}
    else:
        source_type, source_json = "local", {"uri": str(Path(source).resolve())}
    dataset = Dataset(
        name=name,
        digest=digest[:MAX_DATASET_DIGEST],
        source_type=source_type,
        source=json.dumps(source_json),
        profile=json.dumps({**mask_secrets(profile or {}), "digest": digest}, default=json_default),
    )
    mlflow_client().log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("pipelines.digest", digest)]
            )
        ],
    )


def find_stage_runs(output_digest: str, experiment: str | None = "preprocessing", key: str = "output") -> list[dict]:
    """Stage runs (newest first) that wrote ``output_digest`` (``key="input"``: that read it), e.g.
    the shard run behind a training run's manifest (``key="input"`` matches a single input digest,
    as stats records); ``experiment=None`` searches every experiment
    (the demo keeps its stage runs in its own). [{"run_id", "stage", "status", "experiment_id",
    "input_digest"}]; a failed strict run did write its output."""
    client = mlflow_client()
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        exp = client.get_experiment_by_name(experiment)
        ids = [exp.experiment_id] if exp is not None else []
    if not ids or not re.fullmatch(r"[\w.:+-]+", output_digest):
        return []
    # MLflow search has no OR over tag keys; the combined tag narrows in the store, the loop is exact.
    query = (
        f"tags.`{OUTPUT_DIGESTS_TAG}` LIKE '%{output_digest}%'"
        if key == "output"
        else f"tags.`pipelines.input_digest` = '{output_digest}'"
    )
    found, token = [], None
    while True:
        page = client.search_runs(
            ids, query, order_by=["attributes.start_time DESC"], max_results=1000, page_token=token
        )
        for run in page:
            t = run.data.tags
            if any(
                v == output_digest
                for k, v in t.items()
                if k == f"pipelines.{key}_digest" or k.startswith(f"pipelines.{key}_digest.")
            ):
                found.append(
                    {
                        "run_id": run.info.run_id,
                        "stage": t.get(STAGE_TAG),
                        "status": run.info.status,
                        "experiment_id": run.info.experiment_id,
                        "input_digest": _digest_from_tags(t, "input"),
                    }
                )
        token = page.token
        if not token:
            return found


def _digest_from_tags(tags: dict, key: str):
    """The ``input``/``output`` digest a run's tags record: a string, or {split: digest}."""
    if f"pipelines.{key}_digest" in tags:
        return tags[f"pipelines.{key}_digest"]
    prefix = f"pipelines.{key}_digest."
    return {k[len(prefix) :]: v for k, v in tags.items() if k.startswith(prefix)} or None


def lineage(manifest_digest: str) -> dict[str, dict]:
    """The newest index, shard and stats runs behind a train manifest (in any experiment):
    the shard run that wrote it, the index run that wrote what that shard run read, the stats
    run that read it. {stage: run} for those found."""
    found = {}
    shard_runs = find_stage_runs(manifest_digest, experiment=None)
    if shard_runs:
        found["shard"] = shard_runs[0]
        # The shard run read the index's {split: digest}; the index run's output digest is their digest.
        read = shard_runs[0]["input_digest"]
        index_runs = find_stage_runs(read if isinstance(read, str) else digest(read or {}), experiment=None)
        if index_runs:
            found["index"] = index_runs[0]
    stats_runs = [r for r in find_stage_runs(manifest_digest, experiment=None, key="input") if r["stage"] == "stats"]
    if stats_runs:
        found["stats"] = stats_runs[0]
    return found


def link_lineage(run_id: str, runs: dict[str, dict], datasets: str) -> None:
    """Tags naming the stage runs, and a description the MLflow UI shows on the run's page with
    a link to each (the UI nests runs only inside one experiment; a link works across them)."""
    if not runs:
        return
    links = ", ".join(f"[{stage}](#/experiments/{r['experiment_id']}/runs/{r['run_id']})" for stage, r in runs.items())
    set_tags(
        run_id,
        {
            **{f"pipelines.{stage}_run": r["run_id"] for stage, r in runs.items()},
            "mlflow.note.content": f"Trained on {datasets}. Made by the stage runs: {links}.",
        },
    )
