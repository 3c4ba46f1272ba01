"""pipelines/sample.py: the generated dataset matches the real ImageNet layouts and quirks.

.venv/bin/python -m pytest -q tests/test_sample.py
"""

import csv
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image, UnidentifiedImageError

from pipelines.sample import SampleConfig, parse_size, run

CLASSES, TRAIN, VAL = 4, 6, 3
SMALL = dict(classes=CLASSES, train_per_class=TRAIN, val_per_class=VAL, size=(64, 48))
KAGGLE_DATA = "kaggle/ILSVRC/Data/CLS-LOC"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """One small sample with bad files, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("sample")
    summary = run(SampleConfig(out=str(out), bad=True, **SMALL))
    truth = json.loads((out / "truth.json").read_text())
    return out, truth, summary


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def train_tar_images(out: Path) -> dict[str, bytes]:
    """key -> bytes from the tar of per-class tars."""
    outer = tar_members((out / "tarballs/ILSVRC2012_img_train.tar").read_bytes())
    images = {}
    for inner_name, inner in outer.items():
        for name, data in tar_members(inner).items():
            assert "/" not in name and name.startswith(inner_name[: -len(".tar")] + "_")
            images[name[: -len(".JPEG")]] = data
    return images


def val_tar_images(out: Path) -> dict[str, bytes]:
    members = tar_members((out / "tarballs/ILSVRC2012_img_val.tar").read_bytes())
    return {name[: -len(".JPEG")]: data for name, data in members.items()}


def devkit(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "tarballs/ILSVRC2012_devkit_t12.tar.gz", "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def parse_meta_like_torchvision(meta_bytes: bytes, tmp_path: Path):
    """torchvision.datasets.imagenet.parse_meta_mat, line for line."""
    path = tmp_path / "meta.mat"
    path.write_bytes(meta_bytes)
    meta = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
    nums_children = list(zip(*meta))[4]
    leaves = [meta[i] for i, n in enumerate(nums_children) if n == 0]
    idcs, wnids, classes = list(zip(*leaves))[:3]
    return meta, idcs, wnids, classes


def test_summary_and_counts(sample):
    out, truth, summary = sample
    assert summary["classes"] == CLASSES
    assert summary["train"] == CLASSES * TRAIN and summary["val"] == CLASSES * VAL
    assert summary["bad"] == 4 and summary["seconds"] > 0
    assert len(truth["classes"]) == CLASSES
    assert len(truth["train"]) == CLASSES * TRAIN and len(truth["val"]) == CLASSES * VAL

    outer = tar_members((out / "tarballs/ILSVRC2012_img_train.tar").read_bytes())
    assert sorted(outer) == [f"{c['wnid']}.tar" for c in truth["classes"]]
    assert all(len(tar_members(inner)) == TRAIN for inner in outer.values())
    assert sorted(val_tar_images(out)) == [f"ILSVRC2012_val_{i:08d}" for i in range(1, CLASSES * VAL + 1)]

    assert len(list((out / KAGGLE_DATA / "train").glob("n*/n*_*.JPEG"))) == CLASSES * TRAIN
    assert len(list((out / KAGGLE_DATA / "val").glob("ILSVRC2012_val_*.JPEG"))) == CLASSES * VAL
    assert len(list((out / "folders/train").glob("n*/n*_*.JPEG"))) == CLASSES * TRAIN
    assert len(list((out / "folders/val").glob("n*/ILSVRC2012_val_*.JPEG"))) == CLASSES * VAL
    assert not (out / ".sample-staging").exists()


def test_wnids_and_file_numbers_look_real(sample):
    _, truth, _ = sample
    wnids = [c["wnid"] for c in truth["classes"]]
    assert wnids == sorted(set(wnids))
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    for wnid in wnids:
        numbers = sorted(int(k.split("_")[1]) for k, w in truth["train"].items() if w == wnid)
        assert numbers != list(range(numbers[0], numbers[0] + TRAIN))  # not contiguous


def test_same_bytes_in_all_layouts(sample):
    out, truth, _ = sample
    tars = {**train_tar_images(out), **val_tar_images(out)}
    assert set(tars) == set(truth["train"]) | set(truth["val"])
    for split in ("train", "val"):
        for key, wnid in truth[split].items():
            kaggle = out / KAGGLE_DATA / split / (wnid if split == "train" else "") / f"{key}.JPEG"
            folder = out / "folders" / split / wnid / f"{key}.JPEG"
            assert kaggle.read_bytes() == tars[key], key
            assert folder.read_bytes() == tars[key], key


def test_train_tar_classes_match_truth(sample):
    out, truth, _ = sample
    outer = tar_members((out / "tarballs/ILSVRC2012_img_train.tar").read_bytes())
    for inner_name, inner in outer.items():
        for name in tar_members(inner):
            assert truth["train"][name[: -len(".JPEG")]] == inner_name[: -len(".tar")]


def test_devkit_parses_like_torchvision(sample, tmp_path):
    out, truth, _ = sample
    files = devkit(out)
    meta, idcs, wnids, classes = parse_meta_like_torchvision(files["ILSVRC2012_devkit_t12/data/meta.mat"], tmp_path)
    assert len(meta) > CLASSES  # internal WordNet nodes are there, and were skipped
    assert sorted(idcs) == list(range(1, CLASSES + 1))
    by_wnid = {c["wnid"]: c for c in truth["classes"]}
    assert sorted(wnids) == sorted(by_wnid)
    for idx, wnid, name in zip(idcs, wnids, classes):
        assert by_wnid[wnid]["ilsvrc2012_id"] == idx and by_wnid[wnid]["name"] == name
    # The trap the real devkit sets: ID order is not sorted-WNID order.
    in_id_order = [w for _, w in sorted(zip(idcs, wnids))]
    assert in_id_order != sorted(wnids)


def test_ground_truth_maps_val_images_through_meta(sample, tmp_path):
    out, truth, _ = sample
    files = devkit(out)
    _, idcs, wnids, _ = parse_meta_like_torchvision(files["ILSVRC2012_devkit_t12/data/meta.mat"], tmp_path)
    idx_to_wnid = dict(zip(idcs, wnids))
    lines = files["ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"].decode().split()
    assert len(lines) == CLASSES * VAL
    for i, line in enumerate(lines, start=1):
        assert idx_to_wnid[int(line)] == truth["val"][f"ILSVRC2012_val_{i:08d}"]


def test_val_is_interleaved(sample):
    _, truth, _ = sample
    labels = [truth["val"][k] for k in sorted(truth["val"])]
    assert labels != sorted(labels)


def test_kaggle_csv_and_synset_mapping(sample):
    out, truth, _ = sample
    with open(out / "kaggle/LOC_val_solution.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ImageId", "PredictionString"]
    assert sorted(r["ImageId"] for r in rows) == sorted(truth["val"])
    two_boxes = 0
    for r in rows:
        tokens = r["PredictionString"].split()
        assert len(tokens) % 5 == 0 and tokens[0] == truth["val"][r["ImageId"]]
        assert set(tokens[::5]) == {tokens[0]}
        two_boxes += len(tokens) == 10
    assert two_boxes == 1

    mapping = (out / "kaggle/LOC_synset_mapping.txt").read_text().splitlines()
    assert mapping == [f"{c['wnid']} {c['name']}" for c in truth["classes"]]


def test_quirks(sample):
    out, truth, _ = sample
    images = {**train_tar_images(out), **val_tar_images(out)}
    q = truth["quirks"]
    assert {k.startswith("ILSVRC2012_val_") for k in q["cmyk"]} == {True, False}
    assert {k.startswith("ILSVRC2012_val_") for k in q["grey"]} == {True, False}
    for key in q["cmyk"]:
        assert Image.open(io.BytesIO(images[key])).mode == "CMYK"
        assert Image.open(io.BytesIO(images[key])).format == "JPEG"
    for key in q["png"]:
        assert key in truth["train"] and images[key][:8] == b"\x89PNG\r\n\x1a\n"
    for key in q["grey"]:
        assert Image.open(io.BytesIO(images[key])).mode == "L"


def test_bad_files(sample):
    out, truth, _ = sample
    images = {**train_tar_images(out), **val_tar_images(out)}
    bad = truth["bad"]
    assert sorted(bad.values()) == ["empty", "not-image", "truncated", "truncated"]
    assert any(k in truth["val"] for k in bad) and all(k in {**truth["train"], **truth["val"]} for k in bad)
    for key, kind in bad.items():
        if kind == "empty":
            assert images[key] == b""
        elif kind == "not-image":
            with pytest.raises(UnidentifiedImageError):
                Image.open(io.BytesIO(images[key]))
        else:
            img = Image.open(io.BytesIO(images[key]))  # the header is intact...
            with pytest.raises(OSError):
                img.load()  # ...the scan data is cut off


def test_good_images_decode_and_classes_are_separable(sample):
    """Every good image decodes; class mean colours alone classify the val set."""
    _, truth, _ = sample
    out = sample[0]
    images = {**train_tar_images(out), **val_tar_images(out)}
    skip = set(truth["bad"]) | set(truth["quirks"]["grey"])
    sizes = []

    def mean_rgb(key):
        img = Image.open(io.BytesIO(images[key])).convert("RGB")
        sizes.append(img.size)
        return np.asarray(img, np.float32).reshape(-1, 3).mean(0)

    wnids = [c["wnid"] for c in truth["classes"]]
    centroids = np.stack(
        [np.mean([mean_rgb(k) for k, w in truth["train"].items() if w == wnid and k not in skip], 0) for wnid in wnids]
    )
    val = [k for k in truth["val"] if k not in skip]
    predicted = [wnids[np.argmin(((centroids - mean_rgb(k)) ** 2).sum(1))] for k in val]
    assert predicted == [truth["val"][k] for k in val]
    # Nominal 64x48 +-25%, some portrait, as real sizes vary.
    assert all(36 <= min(wh) and max(wh) <= 80 for wh in sizes)
    assert len(set(sizes)) > len(sizes) // 2 and any(w < h for w, h in sizes)


def sha256s(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "tarballs").iterdir())}


def test_deterministic_and_seed_dependent(tmp_path):
    tiny = dict(classes=3, train_per_class=2, val_per_class=1, size=(40, 32))
    a = run(SampleConfig(out=str(tmp_path / "a"), **tiny))
    b = run(SampleConfig(out=str(tmp_path / "b"), **tiny))
    c = run(SampleConfig(out=str(tmp_path / "c"), seed=1, **tiny))
    assert len(sha256s(Path(a["out"]))) == 3
    assert sha256s(Path(a["out"])) == sha256s(Path(b["out"]))
    assert (Path(a["out"]) / "truth.json").read_bytes() == (Path(b["out"]) / "truth.json").read_bytes()
    assert all(x != y for x, y in zip(sha256s(Path(a["out"])).values(), sha256s(Path(c["out"])).values()))
    truth = json.loads((Path(a["out"]) / "truth.json").read_text())
    assert truth["bad"] == {}


def test_encoding_processes_write_the_same_bytes_as_one(tmp_path):
    """--workers spreads the encoding over processes; quirks and damaged files included, every
    layout is byte for byte what one process writes."""
    small = dict(classes=3, train_per_class=4, val_per_class=3, size=(40, 32), bad=True)
    one = run(SampleConfig(out=str(tmp_path / "one"), **small))
    two = run(SampleConfig(out=str(tmp_path / "two"), workers=2, **small))
    assert sha256s(Path(one["out"])) == sha256s(Path(two["out"]))


def test_archive_metadata_is_pinned(sample):
    """Clock-dependent metadata would break byte-identical reruns, even if two quick runs agree."""
    out = sample[0]
    day_ago = time.time() - 86400
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"):
        with tarfile.open(out / "tarballs" / name) as tar:
            members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        for m in members:
            assert m.mtime < day_ago and (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", ""), m.name
    gz = (out / "tarballs/ILSVRC2012_devkit_t12.tar.gz").read_bytes()
    assert gz[4:8] == b"\0\0\0\0"  # gzip header MTIME
    meta = devkit(out)["ILSVRC2012_devkit_t12/data/meta.mat"]
    assert meta.startswith(b"MATLAB 5.0 MAT-file") and b"Created on" not in meta[:116]


def test_rerun_replaces_earlier_sample_but_not_foreign_dirs(tmp_path):
    tiny = dict(classes=2, val_per_class=1, size=(40, 32))
    run(SampleConfig(out=str(tmp_path / "s"), train_per_class=3, **tiny))
    run(SampleConfig(out=str(tmp_path / "s"), train_per_class=2, **tiny))
    assert len(list((tmp_path / "s/folders/train").glob("*/*.JPEG"))) == 4  # no stale files

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        run(SampleConfig(out=str(tmp_path / "mine"), **tiny))
    assert (tmp_path / "mine/notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(classes=1), "classes=1"),
        (dict(classes=2, train_per_class=2, bad=True), "train_per_class=2"),
        (dict(classes=2, val_per_class=1, bad=True), "val_per_class=1"),
        (dict(size=(4, 100)), "size="),
        (dict(workers=0), "--workers 0"),
    ],
)
def test_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(SampleConfig(out=str(tmp_path / "x"), **kwargs))
    assert not (tmp_path / "x").exists()


def test_parse_size():
    assert parse_size("160x120") == (160, 120)
    assert parse_size(" 64X48 ") == (64, 48)
    for bad in ["160", "160x", "x120", "axb", "0x10", "160x-1", "160*120", ""]:
        with pytest.raises(ValueError, match=r"Bad --size '.*': expected WxH, e.g. 160x120"):
            parse_size(bad)


@pytest.mark.fault
def test_ctrl_c_stops_the_encoding_processes_at_once_and_leaves_no_sample(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while --workers 2
    encode: the pool's processes are gone at once, not after the chunks already sent to them,
    and no half-written sample is left under --out."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "s"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines",
            "sample",
            "--out",
            str(out),
            "--classes",
            "50",
            "--train-per-class",
            "200",
            "--size",
            "320x256",
            "--workers",
            "2",
        ],
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def encoders():
        return [c for c in psutil.Process(p.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]

    deadline = time.monotonic() + 60
    while len(encoders()) < 2:
        assert p.poll() is None and time.monotonic() < deadline, "the encoding processes never started"
        time.sleep(0.1)
    workers = psutil.Process(p.pid).children(recursive=True)
    os.killpg(p.pid, signal.SIGINT)
    p.communicate(timeout=10)  # 10,000 images take ~40 s on 2 cores: this is not the work finishing
    assert p.returncode != 0
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, alive
    assert not out.exists() and not [f for f in tmp_path.iterdir() if f.name != "s"]
