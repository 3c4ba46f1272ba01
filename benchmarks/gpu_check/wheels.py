"""Fetch, here, the wheels the bare GPU machine lacks, for its Python (3.12, x86-64).

    python -m benchmarks.gpu_check.wheels [--dest .whl]

The GPU machine has no network. Its image holds torch, torchvision, numpy, pillow, pyarrow,
pandas, pytest and more (THERE), but not Ray, MLflow or webdataset, and at most 64 MiB of files
reach it per call, the repository included. So this resolves what `train` and `evaluate` need on
one machine with a SQLite MLflow store (NEEDED, at the versions installed here: the ones the
suite passed with), keeps what the image lacks, and downloads those wheels into --dest.
Ray's wheel is 79 MB; its Java jar (32 MB), RLlib, Ray LLM, Serve and the dashboard's web
page are left out of it, which none of the stages use, so that it fits.
run.sh installs them there with `pip install --no-index --no-deps --target`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

NEEDED = ("ray[train]", "mlflow-skinny", "sqlalchemy", "alembic", "webdataset")
# Python packages of the GPU machine's image, as it listed them (2026-11): not carried.
THERE = set(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox
etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11
h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split()
)
# Parts of Ray's wheel no stage imports: Java workers, RLlib, Ray LLM, Serve, the dashboard's web page.
RAY_LEFT_OUT = ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/serve/", "ray/dashboard/client/")
TARGET = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)],
]
LIMIT = 61 << 20  # of the 64 MiB a call carries, the rest is the repository (~2 MiB)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(requirement: str) -> str:
    """'ray[train]' -> 'ray[train]==2.60.0' where installed here, else as given."""
    name = requirement.split("[")[0]
    try:
        return f"{requirement}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return requirement


def missing_there(requirements: list[str]) -> list[str]:
    """name==version of every package in the requirements' closure that the GPU image lacks."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--dry-run",
                "--ignore-installed",
                "--target",
                os.path.join(tmp, "t"),
                "--report",
                report,
                *TARGET,
                *requirements,
            ],
            check=True,
        )
        with open(report) as f:
            installs = json.load(f)["install"]
    found = [(i["metadata"]["name"], i["metadata"]["version"]) for i in installs]
    return sorted(f"{name}=={version}" for name, version in found if norm(name) not in THERE)


def slim_ray(path: str) -> None:
    """Rewrite Ray's wheel without RAY_LEFT_OUT, its RECORD listing only what stays."""
    slim = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(RAY_LEFT_OUT):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(
                    line for line in data.decode().splitlines(keepends=True) if not line.startswith(RAY_LEFT_OUT)
                ).encode()
            dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(slim, path)


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=".whl", help="folder for the wheels (ignored by git; carried to the GPU)")
    a = ap.parse_args(argv)
    wanted = missing_there([pinned(r) for r in NEEDED])
    print(f"[wheels] the GPU image lacks {len(wanted)} packages: {' '.join(wanted)}", file=sys.stderr)
    os.makedirs(a.dest, exist_ok=True)
    for old in os.listdir(a.dest):  # one version of each: two would stop the install there
        os.remove(os.path.join(a.dest, old))
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", a.dest, *TARGET, *wanted], check=True
    )
    for name in os.listdir(a.dest):
        if name.startswith("ray-"):
            slim_ray(os.path.join(a.dest, name))
    total = sum(os.path.getsize(os.path.join(a.dest, n)) for n in os.listdir(a.dest))
    print(f"[wheels] {len(os.listdir(a.dest))} wheels, {total / 2**20:.1f} MiB in {a.dest}", file=sys.stderr)
    if total > LIMIT:
        raise SystemExit(
            f"error: the wheels take {total / 2**20:.1f} MiB, over the {LIMIT >> 20} MiB that "
            "may travel beside the repository; leave more of Ray's wheel out (RAY_LEFT_OUT)."
        )
    return wanted


if __name__ == "__main__":
    main()
