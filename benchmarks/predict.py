"""Bulk prediction (`predict --source`) against evaluate, a pyfunc loop and the file CLI; its driver's memory.

    python -m benchmarks.predict [--val-per-class 1000] [--images 2000] [--lines 10000,100000] [--repeats 3]

The data and the model are made with the project's own commands, once, in --cache (default
/tmp/bench-predict; reused when present): `sample --layouts folders` (10 classes, --val-per-class
val images each), `prepare --resize 72` (shards of 512), `train --epochs 1 --crop 64 --init
kaiming --register alexnet-bench --alias bench` (the demo's small geometry: 72 px shards, 64 px
crops, so 100k images take minutes on 2 cores; accuracy does not matter here), all tracked in a
SQLite MLflow store in the cache. The model is models:/alexnet-bench@bench. Beside it, a folder
of --images photo-like ~500x375 JPEGs (~108 KB, ImageNet's average file; benchmarks/common.py).

Every contender is a fresh process (a local Ray of its own where Ray is used; RAY_ADDRESS is
dropped), timed from process start to exit and by its own summary's ``seconds``; in each repeat
the contenders run interleaved, in the order below; the table gives the median of the repeats:

 (a) the dataset ROOT's val shards (10 x --val-per-class images), goal: bulk / evaluate >= 0.8
  evaluate           `python -m pipelines evaluate --data ROOT --run-id RUN` (centre crop; RUN the
                     training run), in one process: a torch DataLoader of 2 workers, the model in it
  predict ROOT       `python -m pipelines predict --model models:/alexnet-bench@bench --source ROOT
                     --out OUT`: Ray Data, decode tasks, the model in an actor pool, Parquet out
 (b) a folder of --images JPEGs, goal: bulk / loop >= 2
  pyfunc loop        one process, one file a call, as a user writes it (`python -m benchmarks.predict
                     _loop URI LIST`): model = mlflow.pyfunc.load_model(URI); for f in files:
                     model.predict(pd.DataFrame({"image": [open(f, "rb").read()]})); its own time is
                     load_model and the loop (imports excluded, as the stages' own times exclude theirs)
  predict FILE...    `python -m pipelines predict --model URI FILE...`: one process, batches of 64
  predict FOLDER     `python -m pipelines predict --model URI --source FOLDER --out OUT`
 (c) list files whose --lines lines repeat the folder's files (each line an image; no files
     written), once each after the repeats, goal: the driver's peak memory flat in the size
  predict LIST       `python -m pipelines predict --model URI --source LIST --out OUT`

Columns: images/s by the command's own summary (its ``images`` / ``seconds``: from its run's
start, after the imports); from process start (imports, Ray's start-up and exit included); once
started: the steady rate, from the first of its progress lines to the last (at least 3 lines,
else "-"), and the loop's rate without load_model; driver MB: the bulk driver's peak RSS, VmHWM
of its /proc/PID/status, read in the driver at exit (an atexit hook of a launcher that runs the
same CLI main) and every 0.2 s from outside, the larger of the two (both in the JSON): Ray's own
processes and workers are not counted, the object store's pages the driver wrote (the weights
it ray.put()s) are. bulk x: the bulk row's images/s over this row's (predict ROOT for (a),
predict FOLDER for (b)). --chunk-images and --workers pass through to every bulk run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from . import common

CLASSES, TRAIN_PER_CLASS, PER_SHARD = 10, 100, 512
RESIZE, CROP = 72, 64  # pipelines/demo.py's small geometry
MODEL = "models:/alexnet-bench@bench"
GOALS = {"root_vs_evaluate": 0.8, "folder_vs_loop": 2.0}
PROGRESS = re.compile(r"^(?:predict|evaluate): .*?, (\d+) images, ")

# Runs the CLI's main as `python -m pipelines` does, and at exit (after Ray's own atexit
# shutdown: atexit runs its hooks last-registered first) writes this process's VmHWM in kB.
_DRIVER = r"""
import atexit, os, sys
def _hwm():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PREDICTBENCH_HWM"], "w") as f:
        f.write(kb)
atexit.register(_hwm)
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


# --- the data and the model, made once with the project's commands ------------------------------
def _env(home: str) -> dict:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{os.path.abspath(home)}/mlflow.db",
        "PYTHONPATH": os.getcwd(),
    }
    env.pop("RAY_ADDRESS", None)  # each bulk run starts a local Ray, as on one machine
    return env


def _cli(args: list[str], env: dict) -> dict:
    """``python -m pipelines ARGS`` to completion; its summary (the last JSON line on stdout)."""
    p = subprocess.run([sys.executable, "-m", "pipelines", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"pipelines {' '.join(args[:8])} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return _summary(p.stdout)


def _summary(stdout: str) -> dict:
    return next(json.loads(line) for line in reversed(stdout.strip().splitlines()) if line.startswith("{"))


def _dataset(cache: str, val_per_class: int) -> tuple[str, dict]:
    """(the folder of the ROOT, source and MLflow store, the training summary), made once a size."""
    home = os.path.join(cache, f"root-{CLASSES}x{val_per_class}-r{RESIZE}c{CROP}")
    ready = os.path.join(home, "train.json")
    if not os.path.exists(ready):
        shutil.rmtree(home, ignore_errors=True)
        os.makedirs(home)
        env, src, data = _env(home), os.path.join(home, "src"), os.path.join(home, "data")
        print(f"making {home}: sample, prepare, train (1 epoch, {CROP} px crops) ...", file=sys.stderr, flush=True)
        _cli(
            ["sample", "--out", src, "--classes", str(CLASSES), "--train-per-class", str(TRAIN_PER_CLASS)]
            + ["--val-per-class", str(val_per_class), "--layouts", "folders"],
            env,
        )
        _cli(
            ["prepare", "--source", os.path.join(src, "folders"), "--data", data]
            + ["--resize", str(RESIZE), "--samples-per-shard", str(PER_SHARD)],
            env,
        )
        trained = _cli(
            ["train", "--data", data, "--epochs", "1", "--crop", str(CROP), "--init", "kaiming", "--workers", "2"]
            + ["--experiment", "bench", "--name", "bench", "--register", "alexnet-bench", "--alias", "bench"],
            env,
        )
        with open(ready, "w") as f:
            json.dump(trained, f)
    with open(ready) as f:
        return home, json.load(f)


def _photos(cache: str, n: int) -> list[str]:
    """``n`` photo-like ~500x375 JPEGs in a flat folder, made once a size; their paths, sorted."""
    folder = os.path.join(cache, f"photos-{n}x500x375")
    ready = os.path.join(cache, f"photos-{n}.ready")
    if not os.path.exists(ready):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        print(f"making {n} photo-like 500x375 JPEGs in {folder} ...", file=sys.stderr, flush=True)
        for i, jpg in enumerate(common.photo_jpegs(n, size=(500, 375), vary=0.2, seed=3)):
            with open(os.path.join(folder, f"photo_{i:06d}.JPEG"), "wb") as f:
                f.write(jpg)
        open(ready, "w").close()
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def _list_file(cache: str, files: list[str], lines: int) -> str:
    """A list file of ``lines`` lines that repeat ``files`` (a line is an image, repeats too)."""
    path = os.path.join(cache, "lists", f"list-{lines}-of-{len(files)}.txt")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.writelines(files[i % len(files)] + "\n" for i in range(lines))
        os.replace(path + ".tmp", path)
    return path


# --- one run of a contender ---------------------------------------------------------------------
def _run(argv: list[str], env: dict, hwm: bool = False) -> dict:
    """``argv`` in a fresh process: its wall seconds from start to exit, its summary (the last
    JSON line on stdout), its once-started rate (progress lines) and, with ``hwm``, its VmHWM."""
    hwm_file = os.path.join(env["PREDICTBENCH_TMP"], "hwm")
    if os.path.exists(hwm_file):
        os.remove(hwm_file)
    if hwm:
        argv = [sys.executable, "-c", _DRIVER, *argv[3:]]  # [python, -m, pipelines, ...] -> the launcher
    marks: list[tuple[float, int]] = []
    tail: list[str] = []
    polled = [0]
    t0 = time.perf_counter()
    p = subprocess.Popen(
        argv, env={**env, "PREDICTBENCH_HWM": hwm_file}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    reader.start()
    if hwm:
        threading.Thread(target=_poll_hwm, args=(p, polled), daemon=True).start()
    for line in p.stderr:
        tail = (tail + [line])[-40:]
        if m := PROGRESS.match(line):
            marks.append((time.perf_counter() - t0, int(m.group(1))))
    code = p.wait()
    wall = time.perf_counter() - t0
    reader.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed ({code}):\n{''.join(tail)}")
    summary = _summary(out[0])
    if summary.get("skipped"):
        raise RuntimeError(f"{' '.join(argv[:6])} ... did nothing (its OUT held the predictions already)")
    started = None  # from 3 progress lines (2 s apart at least; the last may follow at once)
    if len(marks) >= 3 and marks[-1][0] > marks[0][0]:
        started = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    got = {"wall": wall, "summary": summary, "started": started, "stderr_tail": tail}
    if hwm:
        with open(hwm_file) as f:
            got["hwm_exit_kb"] = int(f.read())
        # the interpreter's finalisation after the hook can add a little: the larger of the two
        got["hwm_polled_kb"] = polled[0]
        got["hwm_kb"] = max(got["hwm_exit_kb"], polled[0])
    return got


def _poll_hwm(p: subprocess.Popen, polled: list) -> None:
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                polled[0] = max(polled[0], next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")))
        except (OSError, StopIteration, ValueError):
            pass  # gone, or a zombie without memory: the last read stands
        time.sleep(0.2)


def run_loop(uri: str, listing: str) -> None:
    """The baseline as a user writes it: the registered model, one file a predict call."""
    t0 = time.perf_counter()
    import mlflow.pyfunc
    import pandas as pd

    with open(listing) as f:
        files = f.read().split()
    t1 = time.perf_counter()
    model = mlflow.pyfunc.load_model(uri)
    t2 = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            out = model.predict(pd.DataFrame({"image": [f.read()]}))
        if out["error"][0]:
            raise RuntimeError(f"{path}: {out['error'][0]}")
    t3 = time.perf_counter()
    seconds = t3 - t1
    print(
        json.dumps(
            {
                "images": len(files),
                "imports_s": t1 - t0,
                "load_model_s": t2 - t1,
                "loop_s": t3 - t2,
                "seconds": seconds,
                "images_per_second": len(files) / seconds,
                "loop_images_per_second": len(files) / (t3 - t2),
            }
        )
    )


# --- the harness --------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val-per-class", type=int, default=1000, help="val images per class of 10 (ROOT, row a)")
    ap.add_argument("--images", type=int, default=2000, help="JPEGs in the folder (rows b; the lists repeat them)")
    ap.add_argument("--lines", default="10000,100000", help="the list files' sizes, comma-separated (rows c)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-images", type=int, default=None, help="passed to the bulk runs (default: the CLI's)")
    ap.add_argument("--workers", type=int, default=None, help="passed to the bulk runs (default: the CLI's)")
    ap.add_argument("--cache", default=os.path.join("/tmp", "bench-predict"))
    a = ap.parse_args(argv)
    sizes = sorted(int(x) for x in a.lines.split(","))

    home, trained = _dataset(a.cache, a.val_per_class)
    root = os.path.join(home, "data")
    files = _photos(a.cache, a.images)
    folder = os.path.dirname(files[0])
    env = {**_env(home), "PREDICTBENCH_TMP": os.path.join(a.cache, "tmp")}
    os.makedirs(env["PREDICTBENCH_TMP"], exist_ok=True)
    listing = os.path.join(a.cache, "tmp", "files.txt")
    with open(listing, "w") as f:
        f.writelines(p + "\n" for p in files)
    val = CLASSES * a.val_per_class

    cli = [sys.executable, "-m", "pipelines"]
    flags = [f"--chunk-images={a.chunk_images}"] if a.chunk_images else []
    flags += [f"--workers={a.workers}"] if a.workers else []

    def bulk(source: str, name: str):
        out = os.path.join(a.cache, "out", name)

        def go() -> dict:
            shutil.rmtree(out, ignore_errors=True)  # a fresh OUT: a rerun into the old would skip
            return _run([*cli, "predict", "--model", MODEL, "--source", source, "--out", out, *flags], env, hwm=True)

        return go

    contenders = {
        # (a) the val shards
        "evaluate": lambda: _run([*cli, "evaluate", "--data", root, "--run-id", trained["run_id"]], env),
        "predict ROOT": bulk(root, "root"),
        # (b) the folder of JPEGs
        "pyfunc loop": lambda: _run([sys.executable, "-m", "benchmarks.predict", "_loop", MODEL, listing], env),
        "predict FILE...": lambda: _run([*cli, "predict", "--model", MODEL, *files], env),
        "predict FOLDER": bulk(folder, "folder"),
    }
    images = {"evaluate": val, "predict ROOT": val, "pyfunc loop": a.images}
    images |= {"predict FILE...": a.images, "predict FOLDER": a.images}
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    for r in range(a.repeats):
        for name, go in contenders.items():
            got = go()
            n = got["summary"]["images"]
            if n != images[name]:
                raise RuntimeError(f"{name}: {n} images predicted, expected {images[name]}")
            runs[name].append(got)
            print(
                f"  repeat {r + 1}/{a.repeats} {name}: {_own(got):,.1f} images/s "
                f"(own), {n / got['wall']:,.1f} from process start",
                file=sys.stderr,
                flush=True,
            )
    # (c) the driver's memory at each size, once each
    for lines in sizes:
        name = f"predict LIST {_k(lines)}"
        got = bulk(_list_file(a.cache, files, lines), f"list-{lines}")()
        if got["summary"]["images"] != lines:
            raise RuntimeError(f"{name}: {got['summary']['images']} images predicted, expected {lines}")
        runs[name], images[name] = [got], lines
        print(
            f"  {name}: {_own(got):,.1f} images/s, driver peak {got['hwm_kb'] / 1024:,.0f} MB",
            file=sys.stderr,
            flush=True,
        )

    def med(name: str, what) -> float | None:
        xs = [x for x in map(what, runs[name]) if x is not None]
        return common.median(xs) if xs else None

    own = {k: med(k, _own) for k in runs}
    wall = {k: med(k, lambda g, k=k: images[k] / g["wall"]) for k in runs}
    started = {k: med(k, lambda g: g["started"]) for k in runs}
    started["pyfunc loop"] = med("pyfunc loop", lambda g: g["summary"]["loop_images_per_second"])
    mb = {k: med(k, lambda g: g["hwm_kb"] / 1024 if "hwm_kb" in g else None) for k in runs}
    sources = {
        "evaluate": f"ROOT val shards ({RESIZE} px)",
        "predict ROOT": f"ROOT val shards ({RESIZE} px)",
        "pyfunc loop": "folder of JPEGs",
        "predict FILE...": "folder of JPEGs",
        "predict FOLDER": "folder of JPEGs",
        **{f"predict LIST {_k(n)}": f"list file, {n:,} lines" for n in sizes},
    }
    versus = {"evaluate": "predict ROOT", "pyfunc loop": "predict FOLDER", "predict FILE...": "predict FOLDER"}
    rows = [
        {
            "contender": k,
            "source": sources[k],
            "images": images[k],
            "images/s": own[k],
            "images/s from start": wall[k],
            "once started": started[k],
            "driver MB": mb[k],
            "bulk x": own[versus[k]] / own[k] if k in versus else None,
        }
        for k in runs
    ]
    lo, hi = f"predict LIST {_k(sizes[0])}", f"predict LIST {_k(sizes[-1])}"
    ratios = {
        "root_vs_evaluate": own["predict ROOT"] / own["evaluate"],
        "root_vs_evaluate_start": wall["predict ROOT"] / wall["evaluate"],
        "folder_vs_loop": own["predict FOLDER"] / own["pyfunc loop"],
        "folder_vs_loop_start": wall["predict FOLDER"] / wall["pyfunc loop"],
        "folder_vs_cli": own["predict FOLDER"] / own["predict FILE..."],
        "folder_vs_cli_start": wall["predict FOLDER"] / wall["predict FILE..."],
        f"driver_mem_{_k(sizes[-1])}_vs_{_k(sizes[0])}": mb[hi] / mb[lo],
        # the steady rates (progress lines; the loop without load_model): where the fixed costs go
        "root_vs_eval_started": _ratio(started["predict ROOT"], started["evaluate"]),
        "folder_vs_loop_started": _ratio(started["predict FOLDER"], started["pyfunc loop"]),
    }
    record = common.report(
        "predict",
        f"bulk predict (Ray Data) against evaluate, a pyfunc loop and the file CLI; the model "
        f"{MODEL}: AlexNet, {RESIZE} px shards, {CROP} px centre crops (the demo's size, not the paper's "
        f"256/224); {val} val images, {a.images} photo-like ~500x375 JPEGs; median of {a.repeats} "
        f"(the list rows: one run each)",
        rows,
        ["contender", "source", "images", "images/s", "images/s from start", "once started", "driver MB", "bulk x"],
        {
            "crop": CROP,
            "resize": RESIZE,
            "model": MODEL,
            "train_run_id": trained["run_id"],
            "val_images": val,
            "folder_images": a.images,
            "list_lines": sizes,
            "bulk_flags": flags,
            # each run's summary, less `predict FILE...`'s per-image answers (megabytes at 2,000 files)
            "summaries": {k: [_without_predictions(g["summary"]) for g in v] for k, v in runs.items()},
            "wall_seconds": {k: [g["wall"] for g in v] for k, v in runs.items()},
            "once_started": {k: [g["started"] for g in v] for k, v in runs.items()},
            "driver_hwm_kb": {k: [g["hwm_kb"] for g in v] for k, v in runs.items() if "hwm_kb" in v[0]},
            "driver_hwm_exit_kb": {k: [g["hwm_exit_kb"] for g in v] for k, v in runs.items() if "hwm_kb" in v[0]},
            "driver_hwm_polled_kb": {k: [g["hwm_polled_kb"] for g in v] for k, v in runs.items() if "hwm_kb" in v[0]},
            "ratios": ratios,
            "goals": {**{k: f">= {v}" for k, v in GOALS.items()}, "driver_mem": "flat (ratio ~1)"},
            "command": "python -m benchmarks.predict " + " ".join(argv or sys.argv[1:]),
        },
    )
    print(
        "goals: "
        + ", ".join(f"{k} {ratios[k]:.2f} (>= {v}: {'met' if ratios[k] >= v else 'NOT met'})" for k, v in GOALS.items())
        + f"; driver peak memory {mb[lo]:,.0f} MB at {sizes[0]:,} images, {mb[hi]:,.0f} MB at {sizes[-1]:,} "
        f"({mb[hi] / mb[lo]:.2f}x); model crops {CROP} px"
    )
    return record


def _own(got: dict) -> float:
    """images / the command's own ``seconds`` (its summary; the file CLI's gives no rate)."""
    return got["summary"]["images"] / max(got["summary"]["seconds"], 1e-9)


def _without_predictions(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "predictions"}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_loop":
        run_loop(*sys.argv[2:4])
    else:
        main()
