"""The GPU check: the project's GPU paths run once, end to end, and every figure kept as JSON.

    bash benchmarks/gpu_check/run.sh OUT                   # on a bare one-GPU machine, ~7 min
    bash benchmarks/gpu_check/run.sh OUT --cpu-rehearsal   # here, the same steps at a tiny size

A GPU machine may be lent for minutes at a time, bare and without a network, so the whole check
is this one command, rehearsed on the CPU by a test. Steps, in order of what matters most:
  env         the card, driver, torch and CUDA versions, nvidia-smi               -> env.json
  cuda-tests  pytest -m cuda: the tests that need a CUDA device                   -> cuda-tests.json
  bench       python -m benchmarks.gpu: the model alone (eager and compiled, with MFU) and end
              to end from shards (decode on CPU workers against nvjpeg), data-wait fraction -> gpu.json
  data        sample (every core) -> index -> shard --resize 256 -> stats: ImageNet's format
  train       python -m pipelines train --gpu through the CLI: 2 epochs, bf16, channels_last,
              --decode device, --compile, on Ray Train                              -> train.json
  evaluate    python -m pipelines evaluate --ten-crop on the GPU                   -> evaluate.json
  bisect      python -m benchmarks.gpu_check.bisect: the training recipe's factors one at a time,
              the first step with a non-finite loss of each                         -> bisect.json
check.json has each step's outcome and seconds; run.log every step's output. A step that fails
is recorded and the steps that do not need it still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# (GPU machine, CPU rehearsal). The GPU sizes keep the whole check near 7 minutes on one H200
# with 16 cores; the rehearsal's keep it under 3 minutes on 2 cores, where a bf16 step is slow
# (no bf16 arithmetic in these cores): 32 training images are 2 steps of 16 an epoch.
SIZES = {
    "gpu": dict(
        classes=100,
        train_per_class=300,
        val_per_class=20,
        size="320x256",
        resize=256,
        crop=224,
        batch=256,
        bench=["--steps", "30", "--repeats", "2", "--loader-workers", "14"],
        bisect=[],
    ),
    "cpu": dict(
        classes=4,
        train_per_class=8,
        val_per_class=4,
        size="96x80",
        resize=72,
        crop=64,
        batch=16,
        bench=["--device", "cpu", "--tiny", "--compile-backend", "eager"],
        bisect=[
            "--device",
            "cpu",
            "--steps",
            "2",
            "--batch",
            "8",
            "--loader-workers",
            "1",
            "--variants",
            "as-run-eager",
        ],
    ),
}
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_data.py")
STEPS = ("env", "cuda-tests", "bench", "data", "train", "evaluate", "bisect")  # "data": sample, index, shard, stats


class Check:
    """Runs the steps, appends their output to run.log and records each outcome in check.json."""

    def __init__(self, out: str):
        self.out, self.steps = out, []
        os.makedirs(out, exist_ok=True)
        self.log = open(os.path.join(out, "run.log"), "a")

    def run(
        self, name: str, cmd: list[str], *, json_to: str | None = None, timeout: float = 600, env: dict | None = None
    ) -> dict | None:
        """Run ``cmd``; with ``json_to``, its last stdout line (the stages' JSON line) is written
        there and returned. None if the step failed."""
        print(f"[gpu-check] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        self.log.write(f"\n==== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        t0, result, rc = time.monotonic(), None, None
        try:
            p = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=self.log,
                text=True,
                timeout=timeout,
                env={**os.environ, **(env or {})},
            )
            rc = p.returncode
            self.log.write(p.stdout)
            lines = p.stdout.strip().splitlines()
            if rc == 0 and json_to:
                result = json.loads(lines[-1])
                self.write(json_to, result)
            elif rc == 0:
                result = {}
        except subprocess.TimeoutExpired:
            self.log.write(f"\n(timed out after {timeout:.0f} s)\n")
        except (json.JSONDecodeError, IndexError) as e:
            self.log.write(f"\n(no JSON line on stdout: {e})\n")
        seconds = round(time.monotonic() - t0, 1)
        self.steps.append({"step": name, "ok": result is not None, "rc": rc, "seconds": seconds})
        self.write("check.json", {"steps": self.steps})
        print(
            f"[gpu-check] {name}: {'ok' if result is not None else 'FAILED'} in {seconds} s",
            file=sys.stderr,
            flush=True,
        )
        return result

    def write(self, name: str, record: dict) -> None:
        with open(os.path.join(self.out, name), "w") as f:
            json.dump(record, f, indent=2)


def env_record() -> None:
    """The card and the software, printed as one JSON line (the env step's output)."""
    import platform

    import torch
    import torchvision

    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True) if torch.cuda.is_available() else None
    print(smi.stdout if smi else "no CUDA device: a CPU rehearsal", file=sys.stderr)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
                "cuda": torch.version.cuda,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "nvidia_smi": smi.stdout if smi else None,
            }
        )
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for the JSON files and run.log (at most 8 files)")
    ap.add_argument("--cpu-rehearsal", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    ap.add_argument(
        "--work", default=None, help="scratch folder for the data, runs and MLflow store (default: OUT-work beside OUT)"
    )
    ap.add_argument(
        "--only",
        default=",".join(STEPS),
        type=lambda t: set(t.split(",")),
        help=f"comma-separated steps to run (default: all of {','.join(STEPS)}); a rerun on a "
        "GPU machine repeats only what failed",
    )
    ap.add_argument("--env-record", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.env_record:
        env_record()
        return 0
    if a.only - set(STEPS):
        ap.error(f"--only {','.join(sorted(a.only))}: unknown step(s); expected some of {','.join(STEPS)}")
    s = SIZES["cpu" if a.cpu_rehearsal else "gpu"]
    out = os.path.abspath(a.out)
    work = os.path.abspath(a.work or out + "-work")
    py, cli = sys.executable, [sys.executable, "-m", "pipelines"]
    check = Check(out)
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "BENCH_OUT": os.path.join(work, "bench"),
        "PYTHONUNBUFFERED": "1",
    }
    os.makedirs(work, exist_ok=True)
    gpu = [] if a.cpu_rehearsal else ["--gpu"]

    want = a.only.__contains__
    if want("env"):
        check.run("env", [py, "-m", "benchmarks.gpu_check", out, "--env-record"], json_to="env.json", timeout=60)
    if want("cuda-tests"):
        xml = os.path.join(work, "cuda-tests.xml")
        ok = check.run(
            "cuda-tests",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "cuda",
                *CUDA_TESTS,
                "-o",
                "addopts=",
                "--junitxml",
                xml,
            ],
            timeout=150,
            env=env,
        )
        check.write("cuda-tests.json", junit_counts(xml, ok=ok is not None))
    if want("bench"):
        bench = [py, "-m", "benchmarks.gpu", *s["bench"], "--cache", os.path.join(work, "bench-cache")]
        if check.run("bench", bench, timeout=240, env=env) is not None:
            with open(os.path.join(work, "bench", "gpu.json")) as f:
                check.write("gpu.json", json.load(f))

    src, data = os.path.join(work, "source"), os.path.join(work, "data")
    stages = {  # each needs the one before it
        "sample": [
            *cli,
            "sample",
            "--out",
            src,
            "--classes",
            str(s["classes"]),
            "--train-per-class",
            str(s["train_per_class"]),
            "--val-per-class",
            str(s["val_per_class"]),
            "--size",
            s["size"],
            "--layouts",
            "tarballs",
            "--workers",
            str(os.cpu_count()),
        ],
        "index": [*cli, "index", "--source", os.path.join(src, "tarballs"), "--data", data],
        "shard": [*cli, "shard", "--data", data, "--resize", str(s["resize"])],
        "stats": [*cli, "stats", "--data", data],
    }
    made = not want("data") or all(
        check.run(name, cmd, env=env, timeout=180) is not None for name, cmd in stages.items()
    )
    trained = None
    if made and want("train"):
        trained = check.run(
            "train",
            [
                *cli,
                "train",
                "--data",
                data,
                *gpu,
                "--workers",
                "1",
                "--epochs",
                "2",
                "--batch-size",
                str(s["batch"]),
                "--crop",
                str(s["crop"]),
                "--amp",
                "bf16",
                "--decode",
                "device",
                "--channels-last",
                "--compile",
                "--name",
                "gpu-check",
                "--experiment",
                "gpu-check",
                "--storage",
                os.path.join(work, "runs"),
            ],
            json_to="train.json",
            env=env,
            timeout=300,
        )
    if trained and want("evaluate"):
        check.run(
            "evaluate",
            [*cli, "evaluate", "--data", data, "--run-id", trained["run_id"], "--ten-crop"],
            json_to="evaluate.json",
            env=env,
            timeout=120,
        )
    if made and want("bisect"):
        check.run(
            "bisect",
            [py, "-m", "benchmarks.gpu_check.bisect", "--data", data, "--crop", str(s["crop"]), *s["bisect"]],
            json_to="bisect.json",
            env=env,
            timeout=300,
        )
    failed = [st["step"] for st in check.steps if not st["ok"]]
    print(
        f"[gpu-check] {'all steps ok' if not failed else 'FAILED: ' + ', '.join(failed)}; results in {out}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def junit_counts(path: str, ok: bool) -> dict:
    """tests/failures/errors/skipped of pytest's JUnit XML, and each test's name and outcome."""
    import xml.etree.ElementTree as ET

    if not os.path.exists(path):
        return {"ok": False, "error": "pytest wrote no report"}
    suite = ET.parse(path).getroot().find("testsuite")
    cases = [
        {
            "test": f"{c.get('classname')}::{c.get('name')}",
            "outcome": next((ch.tag for ch in c if ch.tag in ("failure", "error", "skipped")), "passed"),
        }
        for c in suite.iter("testcase")
    ]
    return {"ok": ok, **{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}, "cases": cases}


if __name__ == "__main__":
    sys.exit(main())
