"""Shard stage: images/s from ImageNet-sized JPEGs to 256x256 webdataset shards.

    python -m benchmarks.shard [--images 3000] [--repeats 2]

Contenders, each a fresh process over the same folder of photo-like 500x375 JPEGs, timed from
process start to exit (so Ray's start-up is included where Ray is used), interleaved:

  pipelines      `python -m pipelines shard --split train`: the project's stage, all cores (below
                 4 GB of source its tasks run in a pool of local processes, no Ray start-up)
  pipelines-ray  the same with --parallel ray: the tasks on a local Ray the stage starts, as it
                 does for larger sources
  pipelines, once started
                 the same runs' rate from the first finished shard to the last, timed here from
                 the stage's progress lines: without the fixed cost (imports, Ray and its
                 workers' start-up, MLflow), which a real ImageNet run (1.28M images) amortises
  pipelines index+shard
                 the whole job a user runs from a folder of JPEGs, as every peer's time includes
                 its own listing and labelling: `index` then `shard --split train`, two processes
  pipelines prepare
                 `python -m pipelines prepare`: index, shard and stats in one process; its index +
                 shard is the time its stats heading appears, and the whole (with stats) is a row too
  baseline       one process, written the way people write it: PIL open + convert, resize the
                 shorter side to 256, centre crop, JPEG encode, webdataset.ShardWriter
  ray-data       Ray Data, all cores: read_images -> map(resize, crop, encode) -> write_webdataset
  litdata        LitData's litdata.optimize(), all cores: the baseline's per-image work, written in
                 LitData's own chunk format (skipped, saying why, where litdata is not installed:
                 pip install -e '.[bench]')
and, in this process, one core, no I/O:
  floor          the stage's own per-image work (pipelines.images.prepare_image) in a tight loop
  floor-pil      the baseline's per-image work in a tight loop

Every contender writes quality-90 256x256 JPEGs of the same images with the same shard size;
the table says who decodes each one's JPEGs.

Then a cold-start profile of the stage (``startup_profile`` in the JSON; ``--no-profile`` skips
it): one more run of the same command, with timestamps written by the CLI's own calls (MLflow,
the start of its task pool, each finished task) wrapped in place, so the seconds from
process start to the first finished shard and on to exit are split into phases; beside it, the
import times of the driver's and a worker's libraries, each measured in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

from . import common

RESIZE, QUALITY = 256, 90
# Who decodes each contender's JPEGs (by the first word of its name)
DECODERS = {
    "pipelines": "torchvision (libjpeg-turbo)",
    "pipelines-ray": "torchvision (libjpeg-turbo)",
    "baseline": "PIL",
    "ray-data": "PIL (read_images)",
    "litdata": "PIL",
    "floor": "torchvision (libjpeg-turbo)",
    "floor-pil": "PIL",
}
PREPARE_TO_SHARD = "pipelines prepare, to the end of its shard stage"
# The rows that time the whole job from a folder of JPEGs, listing and labelling included
WHOLE_JOB = {"pipelines index+shard", PREPARE_TO_SHARD, "baseline", "ray-data", "litdata"}


# --- the contenders that run in their own process ------------------------------------------------
def _labelled_files(folder: str) -> list[tuple[str, int]]:
    wnids = sorted(os.listdir(folder))
    return [(p, i) for i, w in enumerate(wnids) for p in sorted(glob.glob(os.path.join(folder, w, "*")))]


def _pil_resize_crop_encode(im) -> bytes:
    """The textbook per-image work: shorter side to 256 (bilinear), central 256x256, JPEG q90."""
    from PIL import Image

    w, h = im.size
    s = RESIZE / min(w, h)
    im = im.resize((max(RESIZE, round(w * s)), max(RESIZE, round(h * s))), Image.Resampling.BILINEAR)
    left, top = (im.width - RESIZE) // 2, (im.height - RESIZE) // 2
    im = im.crop((left, top, left + RESIZE, top + RESIZE))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def run_baseline(src: str, out: str, per_shard: int) -> int:
    import webdataset as wds
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    n = 0
    with wds.ShardWriter(os.path.join(out, "train-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for path, label in _labelled_files(os.path.join(src, "train")):
            with Image.open(path) as im:
                jpg = _pil_resize_crop_encode(im.convert("RGB"))
            sink.write({"__key__": os.path.splitext(os.path.basename(path))[0], "jpg": jpg, "cls": label})
            n += 1
    return n


def run_ray_data(src: str, out: str, per_shard: int) -> int:
    import numpy as np
    import ray
    from PIL import Image

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    wnids = sorted(os.listdir(os.path.join(src, "train")))

    def to_sample(row: dict) -> dict:
        path = row["path"]
        jpg = _pil_resize_crop_encode(Image.fromarray(np.asarray(row["image"])))
        return {
            "__key__": os.path.splitext(os.path.basename(path))[0],
            "jpg": jpg,
            "cls": str(wnids.index(os.path.basename(os.path.dirname(path)))),
        }

    ds = ray.data.read_images(os.path.join(src, "train"), mode="RGB", include_paths=True)
    # encoder=None: the bytes are already a q90 JPEG (the default encoder would re-encode at q75)
    ds.map(to_sample).write_webdataset(out, min_rows_per_file=per_shard, encoder=None)
    n = sum(1 for _ in glob.glob(os.path.join(out, "*.tar")))
    if n == 0:
        raise RuntimeError("Ray Data wrote no shards")
    return len(_labelled_files(os.path.join(src, "train")))


def _litdata_sample(item: tuple[str, int]) -> dict:
    """LitData's per-item function: the baseline's work on one (path, label)."""
    from PIL import Image

    path, label = item
    with Image.open(path) as im:
        jpg = _pil_resize_crop_encode(im.convert("RGB"))
    return {"key": os.path.splitext(os.path.basename(path))[0], "jpg": jpg, "cls": label}


def run_litdata(src: str, out: str, per_shard: int) -> int:
    """LitData's documented path: optimize(fn, inputs, output_dir, num_workers, chunk_size)."""
    import litdata

    items = _labelled_files(os.path.join(src, "train"))
    # chunk_size: items per chunk, as the others' shard size; bytes in, bytes out (no re-encode)
    litdata.optimize(fn=_litdata_sample, inputs=items, output_dir=out, num_workers=os.cpu_count(), chunk_size=per_shard)
    return len(items)


def _count_litdata(folder: str) -> int:
    """Items LitData wrote, from its index.json (what its StreamingDataset reads)."""
    try:
        with open(os.path.join(folder, "index.json")) as f:
            return sum(c["chunk_size"] for c in json.load(f)["chunks"])
    except FileNotFoundError:
        return 0


def litdata_missing() -> str | None:
    """Why the litdata row cannot run here, or None."""
    if importlib.util.find_spec("litdata") is None:
        return "litdata is not installed (pip install -e '.[bench]')"
    return None


# --- the harness --------------------------------------------------------------------------------
def _dataset(images: int, classes: int, per_shard: int, cache: str) -> tuple[str, str, list[bytes]]:
    """The source folder and the indexed dataset ROOT, built once per size and cached."""
    tag = f"shard-{images}x500x375-{per_shard}"
    src, data = os.path.join(cache, tag, "source"), os.path.join(cache, tag, "data")
    if not os.path.exists(os.path.join(cache, tag, "ready")):
        shutil.rmtree(os.path.join(cache, tag), ignore_errors=True)
        print(f"making {images} photo-like 500x375 JPEGs in {src} ...", file=sys.stderr, flush=True)
        # +-20% in each side, like ImageNet's spread around its ~400x350 mean
        jpgs = common.photo_jpegs(images + classes, size=(500, 375), vary=0.2, seed=1)
        common.write_folders(src, jpgs, classes=classes, val_per_class=1)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines",
                "index",
                "--source",
                src,
                "--data",
                data,
                "--samples-per-shard",
                str(per_shard),
            ],
            check=True,
            env=_env(cache),
            stdout=subprocess.DEVNULL,
        )
        open(os.path.join(cache, tag, "ready"), "w").close()
    jpgs = [open(p, "rb").read() for p, _ in _labelled_files(os.path.join(src, "train"))]
    return src, data, jpgs


def _env(cache: str) -> dict:
    # The stage is tracked like any run; a local store keeps the benchmark's runs out of yours.
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{os.path.abspath(cache)}/mlflow.db",
        "PYTHONPATH": os.getcwd(),
    }


def _process(argv: list, cache: str, clean: list[str], marks: list | None = None, seen: dict | None = None):
    """Run ``argv`` (or a list of argvs, one after another) to completion; ``marks`` collects
    (time, images done) from the stage's progress lines ('shard: 3/12 shards, 750 images, ...'),
    and ``seen`` the time each of its keys (a line's start) first appears, stamped as they arrive."""
    commands = argv if isinstance(argv[0], list) else [argv]

    def go() -> int:
        for p in clean:
            shutil.rmtree(p, ignore_errors=True)
        t0 = time.perf_counter()
        for command in commands:
            _follow(command, cache, t0, marks, seen)
        return 1

    return go


def _follow(argv: list[str], cache: str, t0: float, marks: list | None, seen: dict | None) -> None:
    p = subprocess.Popen(argv, env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail = []
    for line in p.stderr:
        tail = (tail + [line])[-40:]
        m = re.match(r"shard: \d+/\d+ shards, (\d+) images", line)
        if m and marks is not None:
            marks.append((time.perf_counter() - t0, int(m.group(1))))
        for start in seen or {}:
            if line.startswith(start) and seen[start] is None:
                seen[start] = time.perf_counter() - t0
    if p.wait() != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{''.join(tail)}")


def _count_tar_members(folder: str) -> int:
    import tarfile

    return sum(
        len([m for m in tarfile.open(t).getnames() if m.endswith(".jpg")])
        for t in glob.glob(os.path.join(folder, "**", "*.tar"), recursive=True)
    )


# --- the cold-start profile ---------------------------------------------------------------------
# `python -c _TRACED shard ...` runs the CLI as `python -m pipelines shard ...` does, with its own
# calls wrapped in place to append wall-clock stamps (comparable across processes) to a file.
_TRACED = r"""
import json, os, sys, time
_T = os.environ["SHARDBENCH_TRACE"]
def mark(what, **kw):
    with open(_T, "a") as f:
        f.write(json.dumps({"t": time.time(), "what": what, **kw}) + "\n")
import pipelines.cli, pipelines.shard as sh, pipelines.tracking as tr
mark("cli imported")
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        mark(name + " begin")
        try:
            return f(*a, **k)
        finally:
            mark(name + " end")
    setattr(mod, name, g)
for mod, name in ((tr, "mlflow_client"), (tr, "log_params"), (sh, "prestart_local_pool")):
    wrap(mod, name)
class TracedPool(sh.TaskPool):  # where the stage's tasks run: a local Ray, or a local process pool
    def __init__(self, *a, **k):
        mark("pool begin")
        super().__init__(*a, **k)
        mark("pool end", ray=self.ray is not None)
    def result(self, handle):
        out = super().result(handle)
        mark("task")  # a shard finished (the driver hears of it within milliseconds)
        return out
sh.TaskPool = TracedPool
code = pipelines.cli.main(sys.argv[1:])
mark("main returned")
import ray
if ray.is_initialized():
    ray.shutdown()  # what the exit would do first (Ray's atexit hook), timed apart from the rest
mark("ray shutdown")
sys.exit(code)
"""

# Imports, each group after the ones before it, in a fresh interpreter: {group: seconds}.
_IMPORTS = r"""
import json, sys, time
out, t = {}, time.perf_counter()
for group in sys.argv[1:]:
    for m in group.split(","):
        __import__(m)
    now = time.perf_counter()
    out[group], t = now - t, now
print(json.dumps(out))
"""
# The driver's libraries in the order the stage imports them, and a worker's (prepare_image's)
DRIVER_IMPORTS = ["pipelines.cli,pipelines.shard", "mlflow", "ray"]
WORKER_IMPORTS = ["torch", "PIL.Image,pipelines.data"]  # (+ torchvision's image extension: milliseconds)


def _import_seconds(groups: list[str], cache: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _IMPORTS, *groups], env=_env(cache), capture_output=True, text=True, check=True
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def startup_profile(data: str, cache: str) -> dict:
    """One traced run of the stage from a fresh process: where its seconds go, in phases."""
    trace = os.path.join(cache, "startup-trace.jsonl")
    shutil.rmtree(os.path.join(data, "shards"), ignore_errors=True)
    if os.path.exists(trace):
        os.remove(trace)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t
    env = {**_env(cache), "SHARDBENCH_TRACE": trace}
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-c", _TRACED, "shard", "--split", "train", "--data", data],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.time()
    if r.returncode != 0:
        raise RuntimeError(f"the traced stage failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(trace) as f:
        marks = [json.loads(line) for line in f]
    tasks = sorted((m for m in marks if m["what"] == "task"), key=lambda m: m["t"])

    def at(what: str) -> float | None:
        return min((m["t"] for m in marks if m["what"] == what), default=None)

    on_ray = next(m for m in marks if m["what"] == "pool end")["ray"]
    points = [
        ("python start, imports of pipelines.cli and .shard", at("cli imported")),
        ("CLI: parse flags, check the index and what is made", at("prestart_local_pool begin")),
        ("local workers started (they import torch meanwhile)", at("prestart_local_pool end")),
        ("lease, index read, plan (MLflow opens on a thread meanwhile)", at("pool begin")),
        ("Ray start (ray.init)" if on_ray else "process pool start", at("pool end")),
        ("first finished shard (workers import torch, encode)", tasks[0]["t"]),
        ("the other shards (steady work)", tasks[-1]["t"]),
        ("driver: MLflow summary, end run, manifest", at("main returned")),
        ("Ray shutdown (ray.shutdown)" if on_ray else "process pool shut down (in the stage)", at("ray shutdown")),
        ("interpreter exit (atexit hooks)", end),
    ]
    phases, before = [], t0
    for name, stamp in [p for p in points if p[1] is not None]:  # prestart: only where local workers are used
        phases.append({"phase": name, "seconds": stamp - before, "at": stamp - t0})
        before = stamp
    # The stage's MLflow run opens on a thread of its own, beside the phases above.
    beside = [
        {"phase": name, "from": a - t0, "to": b - t0}
        for name, a, b in (
            ("MLflow: import mlflow, open the store", at("mlflow_client begin"), at("mlflow_client end")),
            ("MLflow: experiment, run, params", at("mlflow_client end"), at("log_params end")),
        )
        if a and b
    ]
    return {
        "phases": phases,
        "beside": beside,
        "to_first_shard_s": tasks[0]["t"] - t0,
        "total_s": end - t0,
        "tasks": len(tasks),
        "on_ray": on_ray,
        "imports_s": {
            "python -c pass (wall)": bare,
            "driver": _import_seconds(DRIVER_IMPORTS, cache),
            "worker": _import_seconds(WORKER_IMPORTS, cache),
        },
        "note": "one traced run, stamps from the CLI's own calls wrapped in place; the workers' imports "
        "are measured apart, in a fresh interpreter (imports_s.worker)",
    }


def print_profile(p: dict) -> None:
    print(
        f"\ncold start of the stage, traced once: {p['to_first_shard_s']:.1f} s to the first finished shard, "
        f"{p['total_s']:.1f} s in all"
    )
    w = max(len(x["phase"]) for x in p["phases"])
    print(f"{'phase'.ljust(w)}  seconds  at (s)")
    print(f"{'-' * w}  -------  ------")
    for x in p["phases"]:
        print(f"{x['phase'].ljust(w)}  {x['seconds']:7.2f}  {x['at']:6.2f}")
    for x in p.get("beside", []):
        print(f"{x['phase'].ljust(w)}  {x['to'] - x['from']:7.2f}  {x['from']:6.2f}-{x['to']:.2f}, on its own thread")
    imp = p["imports_s"]
    print(
        "imports, fresh interpreter, each after those before it: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in [*imp["driver"].items(), *imp["worker"].items()])
        + f"; python -c pass {imp['python -c pass (wall)']:.2f} s"
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--samples-per-shard", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", default=os.path.join(common.OUT, "cache"))
    ap.add_argument("--name", default="shard", help="the JSON's name in bench-results/ (default shard)")
    ap.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the cold-start profile (one more traced run of the stage)",
    )
    a = ap.parse_args(argv)

    src, data, jpgs = _dataset(a.images, a.classes, a.samples_per_shard, a.cache)
    n = len(jpgs)
    work = os.path.join(a.cache, "out")
    me = [sys.executable, "-m", "benchmarks.shard", "--cache", a.cache]
    marks: list[list] = []
    cli = [sys.executable, "-m", "pipelines"]
    full, prepared, stats_begin = os.path.join(work, "index+shard"), os.path.join(work, "prepare"), []
    contenders = {
        "pipelines": lambda: (
            marks.append([]),
            _process(
                [sys.executable, "-m", "pipelines", "shard", "--split", "train", "--data", data],
                a.cache,
                [os.path.join(data, "shards")],
                marks[-1],
            )(),
        )[1],
        # The same stage made to start a local Ray, as it does for over 4 GB of source: Ray's start-up cost.
        "pipelines-ray": _process(
            [sys.executable, "-m", "pipelines", "shard", "--split", "train", "--data", data, "--parallel", "ray"],
            a.cache,
            [os.path.join(data, "shards")],
        ),
        # The whole job, as every peer's time includes its own listing and labelling: the index
        # and shard stages as a user types them, then prepare (index, shard and stats in one
        # process; the time its stats heading appears is its index + shard).
        "pipelines index+shard": _process(
            [
                [*cli, "index", "--source", src, "--data", full, "--samples-per-shard", str(a.samples_per_shard)],
                [*cli, "shard", "--split", "train", "--data", full],
            ],
            a.cache,
            [full],
        ),
        "pipelines prepare": lambda: (
            stats_begin.append({"== stats": None}),
            _process(
                [*cli, "prepare", "--source", src, "--data", prepared, "--samples-per-shard", str(a.samples_per_shard)],
                a.cache,
                [prepared],
                seen=stats_begin[-1],
            )(),
        )[1],
        "baseline": _process(
            me + ["_run", "baseline", src, os.path.join(work, "baseline"), str(a.samples_per_shard)],
            a.cache,
            [os.path.join(work, "baseline")],
        ),
        "ray-data": _process(
            me + ["_run", "ray-data", src, os.path.join(work, "ray-data"), str(a.samples_per_shard)],
            a.cache,
            [os.path.join(work, "ray-data")],
        ),
    }
    skipped = litdata_missing()
    skipped_rows = {"litdata": skipped} if skipped else {}
    if skipped:
        print(f"litdata: skipped: {skipped}", file=sys.stderr, flush=True)
    else:
        contenders["litdata"] = _process(
            me + ["_run", "litdata", src, os.path.join(work, "litdata"), str(a.samples_per_shard)],
            a.cache,
            [os.path.join(work, "litdata")],
        )
    # The floors run in every repeat, beside the stage, so the per-core ratio compares the two
    # in the same minutes (this machine's speed drifts by 20% and more between minutes).
    floors = _floors(jpgs[: min(n, 400)])
    seconds, floor_rates = {k: [] for k in contenders}, {k: [] for k in floors}
    for r in range(a.repeats):
        for name, rate in floors.items():
            floor_rates[name].append(rate())
            print(
                f"  repeat {r + 1}/{a.repeats} {name}: {floor_rates[name][-1]:,.0f} images/s",
                file=sys.stderr,
                flush=True,
            )
        for name, go in contenders.items():
            t = time.perf_counter()
            go()
            seconds[name].append(time.perf_counter() - t)
            print(f"  repeat {r + 1}/{a.repeats} {name}: {seconds[name][-1]:.1f} s", file=sys.stderr, flush=True)
    # Same work done: every contender wrote every image (the half run, half of them).
    count = _count_tar_members
    written = {
        "pipelines": count(os.path.join(data, "shards", "train")),
        "pipelines-ray": count(os.path.join(data, "shards", "train")),  # ran after pipelines, same place
        "pipelines index+shard": count(os.path.join(full, "shards", "train")),
        "pipelines prepare": count(os.path.join(prepared, "shards", "train")),
        "baseline": count(os.path.join(work, "baseline")),
        "ray-data": count(os.path.join(work, "ray-data")),
    }
    if "litdata" in contenders:
        written["litdata"] = _count_litdata(os.path.join(work, "litdata"))
    for name in contenders:
        if written[name] != n:
            raise RuntimeError(f"{name} wrote {written[name]} images, expected {n}")

    profile = startup_profile(data, a.cache) if a.profile else None

    cores = os.cpu_count()
    t = {k: common.median(v) for k, v in seconds.items()}
    # From the first finished shard to the last: the rate once Ray and its workers are up.
    started_each = [(m[-1][1] - m[0][1]) / (m[-1][0] - m[0][0]) for m in marks]
    started = common.median(started_each)
    startup = t["pipelines"] - n / started
    rate = {
        "pipelines": n / t["pipelines"],
        "pipelines, once started": started,
        "pipelines-ray": n / t["pipelines-ray"],
        "pipelines index+shard": n / t["pipelines index+shard"],
        PREPARE_TO_SHARD: n / common.median([b["== stats"] for b in stats_begin]),
        "pipelines prepare (index, shard and stats)": n / t["pipelines prepare"],
        "baseline": n / t["baseline"],
        "ray-data": n / t["ray-data"],
        **({"litdata": n / t["litdata"]} if "litdata" in t else {}),
        **{k: common.median(v) for k, v in floor_rates.items()},
    }
    single = {"baseline", "floor", "floor-pil"}
    rows = [
        {
            "contender": k,
            "cores": 1 if k in single else cores,
            "images/s": v,
            "images/s/core": v if k in single else v / cores,
            "decoder": DECODERS[k.split(" ")[0].rstrip(",")],
            "pipelines x": rate["pipelines"] / v if k != "pipelines, once started" else None,
            "index+shard x": rate["pipelines index+shard"] / v if k in WHOLE_JOB else None,
        }
        for k, v in rate.items()
    ]
    ratios = {
        "vs_baseline": rate["pipelines"] / rate["baseline"],
        "vs_baseline_once_started": started / rate["baseline"],
        "vs_ray_data": rate["pipelines"] / rate["ray-data"],
        "on_ray_vs_baseline": rate["pipelines-ray"] / rate["baseline"],
        "vs_litdata": rate["pipelines"] / rate["litdata"] if "litdata" in rate else None,
        # per repeat, stage and floor of the same minutes; then the median
        "per_core_vs_floor_once_started": common.median(
            [st / cores / fl for st, fl in zip(started_each, floor_rates["floor"])]
        ),
        "floor_vs_floor_pil": rate["floor"] / rate["floor-pil"],
        # the whole job from process start: each peer lists and labels inside its own time
        "index_shard_vs_baseline": rate["pipelines index+shard"] / rate["baseline"],
        "index_shard_vs_litdata": rate["pipelines index+shard"] / rate["litdata"] if "litdata" in rate else None,
        "prepare_index_shard_vs_baseline": rate[PREPARE_TO_SHARD] / rate["baseline"],
        "prepare_index_shard_vs_litdata": rate[PREPARE_TO_SHARD] / rate["litdata"] if "litdata" in rate else None,
    }
    record = common.report(
        a.name,
        f"shard stage: {n} photo-like JPEGs (~500x375, ~108 KB) -> 256x256 q90 shards of "
        f"{a.samples_per_shard}; median of {a.repeats}; wall time from process start (the stage's fixed "
        f"start-up, {startup:.1f} s here, is included except in 'once started')",
        rows,
        ["contender", "decoder", "cores", "images/s", "images/s/core", "pipelines x", "index+shard x"],
        {
            "images": n,
            "seconds": seconds,
            "floor_rates": floor_rates,
            "once_started": started_each,
            "startup_seconds": startup,
            "ratios": ratios,
            "startup_profile": profile,
            "skipped": skipped_rows,
            "command": "python -m benchmarks.shard " + " ".join(argv or sys.argv[1:]),
        },
    )
    if profile:
        print_profile(profile)
    return record


def _floors(jpgs: list[bytes]) -> dict:
    """Per-image work alone, one core, bytes already in memory: name -> a call giving images/s."""
    import torch
    from PIL import Image

    from pipelines.images import prepare_image

    def one_thread(work):
        def rate() -> float:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the stage's tasks run with one thread (Ray: OMP_NUM_THREADS=1)
            try:
                t = time.perf_counter()
                for b in jpgs:
                    work(b)
                return len(jpgs) / (time.perf_counter() - t)
            finally:
                torch.set_num_threads(threads)

        return rate

    def pil(b: bytes) -> None:
        with Image.open(io.BytesIO(b)) as im:
            _pil_resize_crop_encode(im.convert("RGB"))

    for b in jpgs[:20]:  # first calls load codecs and kernels: not part of the steady state
        prepare_image(b, RESIZE, False, QUALITY)
    return {"floor": one_thread(lambda b: prepare_image(b, RESIZE, False, QUALITY)), "floor-pil": one_thread(pil)}


if __name__ == "__main__":
    if len(sys.argv) > 1 and "_run" in sys.argv:
        i = sys.argv.index("_run")
        kind, src, out, per_shard = sys.argv[i + 1 : i + 5]
        {"baseline": run_baseline, "ray-data": run_ray_data, "litdata": run_litdata}[kind](src, out, int(per_shard))
    else:
        main()
