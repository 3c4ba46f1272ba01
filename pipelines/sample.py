"""Build a small ImageNet-format dataset for the demo and the tests.

    python -m pipelines sample --out /tmp/imagenet-sample

One run writes the same images in the three layouts people hold ILSVRC-2012 in (each
described in docs/stages.md, "Sources"), so every reader in `pipelines/sources.py` can be
tested on identical bytes:

    out/tarballs/ILSVRC2012_img_train.tar        tar of per-class tars n0xxxxxxx.tar
    out/tarballs/ILSVRC2012_img_val.tar          flat ILSVRC2012_val_00000001.JPEG ..., no labels
    out/tarballs/ILSVRC2012_devkit_t12.tar.gz    data/meta.mat + validation ground truth
    out/kaggle/                                  LOC_synset_mapping.txt, LOC_val_solution.csv,
                                                 ILSVRC/Data/CLS-LOC/{train,val}/...
    out/folders/{train,val}/<wnid>/*.JPEG        ImageFolder layout
    out/truth.json                               what the generator made (the test oracle)

``imagenet=True`` (``--imagenet``) gives the real shape: 1,000 classes, the devkit's 1,860 synsets
(860 WordNet nodes above the leaves, with every field meta.mat has), val ground truth lines
(50,000 at the default 50 per class) whose ILSVRC2012_IDs are not in sorted-WNID order; with a
small ``--size`` it builds 100,000+ images in minutes. ``layouts`` picks which of the three
layouts to write (the scale benchmark writes only the tarballs).

The images are easy on purpose: each class has its own hue and stripe orientation/period,
so a small AlexNet learns them in a few epochs; per-image size, phase, brightness and noise
keep the images distinct. The real files' quirks are reproduced (CMYK JPEGs, a PNG named
.JPEG, greyscale images) and, with `bad=True`, damaged files (truncated, empty, not an image).
Everything is a function of `seed`: two runs give byte-identical tarballs.
"""

from __future__ import annotations

import colorsys
import gzip
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time

import numpy as np
import scipy.io
from PIL import Image

from .config import SampleConfig  # noqa: F401 - re-exported: callers build it from here too
from .errors import StageError


class SampleError(StageError, ValueError):
    """A sample setting that cannot work: the CLI shows the message and exits 2."""


# --- fixed facts of the formats ---------------------------------------------------------

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT_TAR = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"
# The layouts this module writes under `out`; only these are replaced on a rerun.
LAYOUTS = ("tarballs", "kaggle", "folders")
OUTPUTS = (*LAYOUTS, "truth.json")
# ILSVRC-2012's devkit: 1,000 leaf classes (ILSVRC2012_ID 1-1000) and 860 WordNet synsets above
# them (1001-1860), the root among them.
IMAGENET_CLASSES, IMAGENET_NODES = 1000, 860

# Fixed tar/gzip metadata so reruns are byte-identical (2012-07-04, the devkit's era).
TAR_MTIME = 1341360000
JPEG_QUALITY = 90  # close to the real files; high enough that stripes survive compression
NOT_AN_IMAGE = b"this is not an image\n" * 20

HUE_NAMES = (
    "red",
    "orange",
    "yellow",
    "lime",
    "green",
    "spring green",
    "cyan",
    "azure",
    "blue",
    "violet",
    "magenta",
    "rose",
)  # 30 degrees apart
# (angle in degrees, name): stripes 45 degrees apart are easy to tell apart at 64 px.
ORIENTATIONS = ((0, "vertical"), (45, "diagonal"), (90, "horizontal"), (135, "anti-diagonal"))
# Stripe periods, as a fraction of the image's short side, so they survive rescaling.
PERIODS = ((1 / 3, "wide"), (1 / 7, "narrow"))


def parse_size(text: str) -> tuple[int, int]:
    """'160x120' -> (160, 120); the CLI's --size."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise SampleError(f"Bad --size {text!r}: expected WxH, e.g. 160x120")
    return int(match[1]), int(match[2])


def run(cfg: SampleConfig) -> dict:
    """Write the sample dataset under cfg.out; return a summary."""
    start = time.perf_counter()
    _check(cfg)
    plan = _plan(cfg)
    images = _encode_all([*plan["train"], *plan["val"]], plan, cfg.workers)

    _progress(f"{len(images):,} images encoded in {time.perf_counter() - start:.1f} s")

    out = os.path.abspath(cfg.out)
    stage = _prepare_out(out)
    writers = {"tarballs": _write_tarballs, "kaggle": _write_kaggle, "folders": _write_folders}
    for layout in cfg.layouts:
        writers[layout](os.path.join(stage, layout), plan, images)
        _progress(f"{layout} -> {out}/{layout}")
    _write_file(os.path.join(stage, "truth.json"), json.dumps(_truth(plan), indent=1).encode())
    _publish(stage, out)  # the staging dir keeps a half-written sample out of sight

    return {
        "out": out,
        "classes": len(plan["classes"]),
        "train": len(plan["train"]),
        "val": len(plan["val"]),
        "bad": len(plan["bad"]),
        "synsets": len(plan["classes"]) + len(plan["nodes"]),
        "layouts": list(cfg.layouts),
        "seconds": round(time.perf_counter() - start, 3),
    }


def write_tarballs(root: str, cfg: SampleConfig, images: list[bytes]) -> dict:
    """The original tarball layout (train tar of class tars, val tar, devkit) of ``cfg``'s classes,
    holding the given JPEGs instead of generated ones: train images in key order, then val. The
    benchmarks use it with photo-like JPEGs of ImageNet's size. Returns {"train": n, "val": n}."""
    plan = _plan(cfg)
    keys = [*plan["train"], *plan["val"]]
    if len(images) < len(keys):
        raise ValueError(f"{len(keys)} images needed, {len(images)} given")
    os.makedirs(root, exist_ok=True)
    _write_tarballs(root, plan, dict(zip(keys, images)))
    return {"train": len(plan["train"]), "val": len(plan["val"])}


def _check(cfg: SampleConfig) -> None:
    # Quirks and bad files each take a distinct image, so small configs need enough images.
    need_train, need_val = (6, 3) if cfg.bad else (3, 2)
    if cfg.classes < 2:
        raise SampleError(
            f"--classes {cfg.classes} (classes={cfg.classes}): need at least 2, so that "
            "ILSVRC2012_ID order can differ from sorted-WNID order."
        )
    if cfg.train_per_class < 1 or cfg.classes * cfg.train_per_class < need_train:
        raise SampleError(
            f"--train-per-class {cfg.train_per_class} (train_per_class={cfg.train_per_class}): need >= 1 and at least "
            f"{need_train} train images in all for the quirks"
            f"{' and bad files' if cfg.bad else ''}."
        )
    if cfg.val_per_class < 1 or cfg.classes * cfg.val_per_class < need_val:
        raise SampleError(
            f"--val-per-class {cfg.val_per_class} (val_per_class={cfg.val_per_class}): need >= 1 and at least "
            f"{need_val} val images in all for the quirks"
            f"{' and bad files' if cfg.bad else ''}."
        )
    if cfg.imagenet and cfg.classes != IMAGENET_CLASSES:
        raise SampleError(
            f"--imagenet with --classes {cfg.classes}: ILSVRC-2012 has {IMAGENET_CLASSES} "
            "classes; drop --classes (or drop --imagenet for a smaller sample)."
        )
    unknown = [l for l in cfg.layouts if l not in LAYOUTS]
    if unknown or not cfg.layouts:
        raise SampleError(
            f"--layouts {','.join(cfg.layouts)}: expected a comma-separated list of {', '.join(LAYOUTS)}."
        )
    if cfg.workers < 1:
        raise SampleError(f"--workers {cfg.workers}: need at least 1 encoding process.")
    if len(cfg.size) != 2 or min(cfg.size) < 8:
        raise SampleError(f"--size {cfg.size[0]}x{cfg.size[1]} (size={cfg.size!r}): expected (W, H), each >= 8 pixels.")


# --- the plan: every random choice, made up front from the seed ----------------------------


def _rng(cfg: SampleConfig, *stream: int) -> np.random.Generator:
    # One independent stream per purpose, so adding a choice doesn't shift the others.
    return np.random.default_rng([cfg.seed, *stream])


def _plan(cfg: SampleConfig) -> dict:
    classes = _make_classes(cfg)
    wnids = [c["wnid"] for c in classes]

    # Train file numbers are not contiguous in the real set (n01440764_10026, ...).
    rng = _rng(cfg, 1)
    train = {}
    for wnid in wnids:
        for n in sorted(rng.choice(np.arange(1, 20000), cfg.train_per_class, replace=False)):
            train[f"{wnid}_{n}"] = wnid

    # Real val images are interleaved across classes; make sure ours are not in blocks.
    labels = np.repeat(np.arange(len(wnids)), cfg.val_per_class)
    shuffled = labels
    while np.array_equal(shuffled, np.sort(shuffled)):
        shuffled = rng.permutation(labels)
    val = {f"ILSVRC2012_val_{i + 1:08d}": wnids[c] for i, c in enumerate(shuffled)}

    quirks, bad = _pick_quirks(cfg, list(train), list(val))
    # Each image's size: +-25% of nominal, one in five turned portrait (real sizes vary).
    rng = _rng(cfg, 2)
    sizes = {}
    for key in [*train, *val]:
        w, h = (np.array(cfg.size) * rng.uniform(0.75, 1.25, 2)).round().astype(int)
        if rng.random() < 0.2:
            w, h = min(w, h), max(w, h)
        sizes[key] = (int(w), int(h))

    return {
        "cfg": cfg,
        "classes": classes,
        "by_wnid": {c["wnid"]: c for c in classes},
        "nodes": _wordnet_nodes(cfg, classes),
        "train": train,
        "val": val,
        "quirks": quirks,
        "bad": bad,
        "sizes": sizes,
    }


def _make_classes(cfg: SampleConfig) -> list[dict]:
    """Made-up but real-looking WNIDs, sorted; each class's look and its ILSVRC2012_ID."""
    rng = _rng(cfg, 0)
    numbers = rng.choice(np.arange(1_000_000, 15_000_000), cfg.classes, replace=False)
    wnids = sorted(f"n{n:08d}" for n in numbers)

    # The devkit numbers classes in its own (WordNet) order, not sorted-WNID order; readers
    # that assume otherwise mislabel every val image, so the sample must not hide that bug.
    ids = np.arange(1, cfg.classes + 1)
    while np.array_equal(ids, np.arange(1, cfg.classes + 1)):
        ids = rng.permutation(cfg.classes) + 1

    classes = []
    for index, wnid in enumerate(wnids):
        hue = index / cfg.classes  # evenly spaced hues: the easiest cue to learn
        angle, angle_name = ORIENTATIONS[index % len(ORIENTATIONS)]
        period, period_name = PERIODS[(index // len(ORIENTATIONS)) % len(PERIODS)]
        colour = HUE_NAMES[round(hue * len(HUE_NAMES)) % len(HUE_NAMES)]
        classes.append(
            {
                "wnid": wnid,
                "name": f"class {index}: {colour} {period_name} {angle_name} stripes",
                "ilsvrc2012_id": int(ids[index]),
                "hue": hue,
                "angle": angle,
                "period": period,
            }
        )
    return classes


def _wordnet_nodes(cfg: SampleConfig, classes: list[dict]) -> list[dict]:
    """The synsets above the leaves, as meta.mat lists them after the leaves: a tree whose root
    (the last) covers every class. Two for a small sample; with ``imagenet`` 860, as in the
    real devkit (chains of one child included, as WordNet has them), every WNID distinct."""
    n = len(classes)
    if not cfg.imagenet:
        # Real WordNet WNIDs, below every leaf's n01000000+.
        half, rest = list(range(1, n // 2 + 1)), list(range(n // 2 + 1, n + 1))
        return [
            {
                "id": n + 1,
                "wnid": "n00021939",
                "words": "artifact, artefact",
                "gloss": "a man-made object",
                "children": half,
                "height": 1,
            },
            {
                "id": n + 2,
                "wnid": "n00001740",
                "words": "entity",
                "gloss": "the WordNet root",
                "children": [n + 1, *rest],
                "height": 2,
            },
        ]
    rng = _rng(cfg, 6)
    taken = {c["wnid"] for c in classes}
    wnids = [
        w
        for w in (f"n{x:08d}" for x in rng.choice(np.arange(1_000_000, 15_000_000), 2 * IMAGENET_NODES, replace=False))
        if w not in taken
    ][:IMAGENET_NODES]
    # Children per node: 1 each, plus the n - 1 extra that joining n leaves into one root takes.
    fan = 1 + rng.multinomial(n - 1, np.full(IMAGENET_NODES, 1 / IMAGENET_NODES))
    height = {c["ilsvrc2012_id"]: 0 for c in classes}
    free = list(rng.permutation(sorted(height)))  # synsets without a parent yet
    nodes = []
    for i, k in enumerate(fan):
        # Each node adopts k parentless synsets; the last one adopts all that are left (the root).
        picks = sorted(
            int(free.pop(int(rng.integers(len(free))))) for _ in range(len(free) if i == len(fan) - 1 else k)
        )
        node = n + 1 + i
        height[node] = 1 + max(height[c] for c in picks)
        nodes.append(
            {
                "id": node,
                "wnid": wnids[i],
                "words": f"synset {i + 1} above the classes",
                "gloss": "a WordNet synset grouping the ones below it",
                "children": picks,
                "height": height[node],
            }
        )
        free.append(node)
    return nodes


def _pick_quirks(cfg: SampleConfig, train: list[str], val: list[str]) -> tuple[dict, dict]:
    """Which keys get a real-data quirk or (with cfg.bad) damage; all distinct keys."""
    rng = _rng(cfg, 3)
    t = [train[i] for i in rng.permutation(len(train))]
    v = [val[i] for i in rng.permutation(len(val))]
    quirks = {"cmyk": sorted([t[0], v[0]]), "png": [t[1]], "grey": sorted([t[2], v[1]])}
    bad = {}
    if cfg.bad:
        bad = {t[3]: "truncated", t[4]: "empty", t[5]: "not-image", v[2]: "truncated"}
    return quirks, bad


# --- pixels and bytes -----------------------------------------------------------------------


def _pixels(key: str, plan: dict) -> np.ndarray:
    """One HxWx3 uint8 image: the class's hue and stripes, with per-image jitter."""
    cfg = plan["cfg"]
    wnid = plan["train"].get(key) or plan["val"][key]
    cls = plan["by_wnid"][wnid]
    w, h = plan["sizes"][key]
    # Seeded by the key, so an image doesn't change when other images are added.
    rng = np.random.default_rng([cfg.seed, 4, *key.encode()])

    angle = np.deg2rad(cls["angle"] + rng.uniform(-8, 8))
    period = cls["period"] * min(w, h) * rng.uniform(0.85, 1.15)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    along = x * np.cos(angle) + y * np.sin(angle)
    # tanh sharpens the sine into stripes with soft edges; the phase moves them per image.
    wave = np.tanh(3 * np.sin(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi)))
    mix = (0.5 + 0.5 * wave)[..., None]

    hue = (cls["hue"] + rng.uniform(-0.02, 0.02)) % 1.0
    value = rng.uniform(0.65, 1.0)  # brightness jitter
    light = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 0.95), value)) * 255
    dark = light * rng.uniform(0.2, 0.4)
    img = dark + (light - dark) * mix + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode_all(keys: list[str], plan: dict, workers: int) -> dict[str, bytes]:
    """key -> file bytes; with several workers, processes encode chunks of keys. Each image is a
    function of (seed, key) alone, so the bytes are the same for any number of workers."""
    if workers <= 1:
        return {key: _encode(key, plan) for key in keys}
    import multiprocessing

    chunk = max(1, len(keys) // (workers * 8))  # a few chunks a worker: balance without per-image IPC
    parts = [keys[i : i + chunk] for i in range(0, len(keys), chunk)]
    # A multiprocessing pool, not concurrent.futures': leaving its block (Ctrl-C, an error)
    # terminates the workers at once instead of waiting for the chunks already sent to them.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(plan,)) as pool:
        return dict(zip(keys, (data for part in pool.map(_encode_part, parts) for data in part)))


_PLAN: dict | None = None  # an encoding worker's copy of the plan, set once when it starts


def _start_worker(plan: dict) -> None:
    """Keep the plan; leave Ctrl-C to the parent, which stops the pool (no traceback per worker)."""
    import signal

    global _PLAN
    _PLAN = plan
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_part(keys: list[str]) -> list[bytes]:
    return [_encode(key, _PLAN) for key in keys]


def _encode(key: str, plan: dict) -> bytes:
    """The file's bytes: a JPEG, or the quirk or damage chosen for this key."""
    damage = plan["bad"].get(key)
    if damage == "empty":
        return b""
    if damage == "not-image":
        return NOT_AN_IMAGE
    img = Image.fromarray(_pixels(key, plan), "RGB")
    buf = io.BytesIO()
    if key in plan["quirks"]["png"]:
        img.save(buf, "PNG")  # like n02105855_2933.JPEG: a PNG behind a .JPEG name
    elif key in plan["quirks"]["cmyk"]:
        img.convert("CMYK").save(buf, "JPEG", quality=JPEG_QUALITY)
    elif key in plan["quirks"]["grey"]:
        img.convert("L").save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    if damage == "truncated":
        return data[: len(data) // 2]  # an interrupted download: headers fine, scan cut off
    return data


# --- the three layouts ----------------------------------------------------------------------


def _tar_bytes(members: dict[str, bytes], compress: bool = False) -> bytes:
    """A tar of name -> bytes, in sorted order with fixed metadata: reruns are byte-identical."""
    buf = io.BytesIO()
    # gzip stores a timestamp and a file name in its header: pin both.
    fileobj = gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) if compress else buf
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mtime = TAR_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))
    if compress:
        fileobj.close()
    return buf.getvalue()


def _write_tarballs(root: str, plan: dict, images: dict[str, bytes]) -> None:
    inner = {}
    for c in plan["classes"]:
        wnid = c["wnid"]
        inner[f"{wnid}.tar"] = _tar_bytes({f"{key}.JPEG": images[key] for key, w in plan["train"].items() if w == wnid})
    _write_file(os.path.join(root, TRAIN_TAR), _tar_bytes(inner))
    _write_file(os.path.join(root, VAL_TAR), _tar_bytes({f"{key}.JPEG": images[key] for key in plan["val"]}))
    _write_file(
        os.path.join(root, DEVKIT_TAR),
        _tar_bytes(
            {
                f"{DEVKIT_DIR}/data/meta.mat": _meta_mat(plan),
                f"{DEVKIT_DIR}/data/ILSVRC2012_validation_ground_truth.txt": _ground_truth(plan),
            },
            compress=True,
        ),
    )


def _meta_mat(plan: dict) -> bytes:
    """meta.mat as the devkit has it: a `synsets` struct array, leaves then WordNet nodes."""
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    cfg = plan["cfg"]
    rows = [
        (
            c["ilsvrc2012_id"],
            c["wnid"],
            c["name"],
            f"synthetic images of {c['name']}",
            0,
            np.zeros(0, np.int32),
            0,
            cfg.train_per_class,
        )
        for c in plan["classes"]
    ]
    # The synsets above the leaves (IDs after theirs; the real file has 860): a reader must skip
    # entries with num_children > 0.
    rows += [
        (
            d["id"],
            d["wnid"],
            d["words"],
            d["gloss"],
            len(d["children"]),
            np.array(d["children"], np.int32),
            d["height"],
            0,
        )
        for d in plan["nodes"]
    ]
    rows.sort(key=lambda r: r[0])  # the real file lists synsets in ILSVRC2012_ID order

    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        for f, value in zip(fields, row):
            synsets[f][i, 0] = np.int32(value) if isinstance(value, int) else value
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    data = bytearray(buf.getvalue())
    # savemat writes "Created on: <now>" into the 116-byte text header; pin it for reruns.
    data[:116] = b"MATLAB 5.0 MAT-file, written by pipelines/sample.py".ljust(116)
    return bytes(data)


def _ground_truth(plan: dict) -> bytes:
    ids = {c["wnid"]: c["ilsvrc2012_id"] for c in plan["classes"]}
    return "".join(f"{ids[wnid]}\n" for wnid in plan["val"].values()).encode()


def _write_kaggle(root: str, plan: dict, images: dict[str, bytes]) -> None:
    for key, wnid in plan["train"].items():
        _write_file(os.path.join(root, KAGGLE_DATA, "train", wnid, f"{key}.JPEG"), images[key])
    for key in plan["val"]:
        _write_file(os.path.join(root, KAGGLE_DATA, "val", f"{key}.JPEG"), images[key])
    _write_file(
        os.path.join(root, "LOC_synset_mapping.txt"),
        "".join(f"{c['wnid']} {c['name']}\n" for c in plan["classes"]).encode(),
    )
    _write_file(os.path.join(root, "LOC_val_solution.csv"), _val_solution(plan))


def _val_solution(plan: dict) -> bytes:
    """LOC_val_solution.csv: WNID first, then a box; unsorted rows, one image with two boxes."""
    rng = _rng(plan["cfg"], 5)
    keys = list(plan["val"])
    two_boxes = keys[int(rng.integers(len(keys)))]
    rows = []
    for i in rng.permutation(len(keys)):  # the real file's rows are not in image order
        key = keys[i]
        w, h = plan["sizes"][key]
        boxes = []
        for _ in range(2 if key == two_boxes else 1):
            x0, x1 = sorted(rng.integers(0, w, 2))
            y0, y1 = sorted(rng.integers(0, h, 2))
            boxes.append(f"{plan['val'][key]} {x0} {y0} {x1} {y1}")
        rows.append(f"{key},{' '.join(boxes)}\n")
    return ("ImageId,PredictionString\n" + "".join(rows)).encode()


def _write_folders(root: str, plan: dict, images: dict[str, bytes]) -> None:
    for split in ("train", "val"):
        for key, wnid in plan[split].items():
            _write_file(os.path.join(root, split, wnid, f"{key}.JPEG"), images[key])


def _truth(plan: dict) -> dict:
    return {
        "classes": [
            {"wnid": c["wnid"], "name": c["name"], "ilsvrc2012_id": c["ilsvrc2012_id"]} for c in plan["classes"]
        ],
        "train": plan["train"],
        "val": plan["val"],
        "quirks": plan["quirks"],
        "bad": plan["bad"],
    }


# --- files ----------------------------------------------------------------------------------


def _prepare_out(out: str) -> str:
    """Check `out` is safe to write into; return an empty staging dir inside it."""
    if os.path.isdir(out):
        ours = set(OUTPUTS) | {".sample-staging"}
        foreign = sorted(set(os.listdir(out)) - ours)
        # Only replace what a previous run wrote: never delete a user's unrelated files.
        if foreign and not os.path.exists(os.path.join(out, "truth.json")):
            raise SampleError(
                f"Output dir {out!r} is not empty and holds no earlier sample "
                f"(found {foreign[:3]}); pass an empty or new directory."
            )
    elif os.path.exists(out):
        raise SampleError(f"Output {out!r} is a file; pass a directory.")
    stage = os.path.join(out, ".sample-staging")
    shutil.rmtree(stage, ignore_errors=True)  # left by an interrupted run
    os.makedirs(stage)
    return stage


def _publish(stage: str, out: str) -> None:
    """Move the staged layouts into place; truth.json last, so it marks a complete sample."""
    if os.path.exists(os.path.join(out, "truth.json")):
        os.remove(os.path.join(out, "truth.json"))
    for name in OUTPUTS:  # a layout not written this time goes too: it would hold other images
        target = os.path.join(out, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
        if os.path.exists(os.path.join(stage, name)):
            os.replace(os.path.join(stage, name), target)
    os.rmdir(stage)


def _write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _progress(message: str) -> None:
    print(f"sample: {message}", file=sys.stderr)
