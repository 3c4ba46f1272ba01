"""Damaged and hostile inputs: each one is quarantined with its reason or
stops the stage with a clear error; the job never crashes and never writes outside ROOT."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipelines import contract, index, shard, sources
from pipelines.config import IndexConfig, ShardConfig
from pipelines.errors import StageError

from .helpers import read_shards, rejects


def _jpeg(size=(120, 90), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _bomb() -> bytes:
    """A 20000x20000 PNG (400M pixels, over twice PIL's limit) that is only a few KB on disk."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


WANT = {  # key -> what its reject reason must say
    "n00000001_trunc": "truncated",
    "n00000001_empty": "empty file (0 bytes)",
    "n00000001_text": "not an image",
    "n00000001_tiny": "sides under 8 px",
    "n00000001_bomb": "decompression bomb",
    "n00000001_link": "symlink",
    "n00000002_dup": "duplicate key",
    "n00000003": "empty class folder",
    "n00000001_notes": "not an image file name",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """An ImageFolder copy with one of every kind of bad input beside good images."""
    top = tmp_path_factory.mktemp("hostile")
    src = top / "src"
    secret = top / "outside.txt"
    secret.write_text("a file outside the dataset\n")
    for wnid in ("n00000001", "n00000002", "n00000003"):
        (src / "train" / wnid).mkdir(parents=True)
        (src / "val" / wnid).mkdir(parents=True)
    c1, c2 = src / "train" / "n00000001", src / "train" / "n00000002"
    for i in range(4):
        (c1 / f"n00000001_good{i}.JPEG").write_bytes(_jpeg(color=(200, 30 * i, 30)))
        (c2 / f"n00000002_good{i}.JPEG").write_bytes(_jpeg(color=(30, 30 * i, 200)))
    (c1 / "n00000001_trunc.JPEG").write_bytes(_jpeg()[:400])
    (c1 / "n00000001_empty.JPEG").write_bytes(b"")
    (c1 / "n00000001_text.JPEG").write_bytes(b"this is not an image\n" * 20)
    (c1 / "n00000001_tiny.JPEG").write_bytes(_jpeg(size=(1, 1)))
    (c1 / "n00000001_bomb.JPEG").write_bytes(_bomb())
    (c1 / "n00000001_notes.txt").write_text("not an image at all")
    os.symlink(secret, c1 / "n00000001_link.JPEG")
    (c1 / "n00000002_dup.JPEG").write_bytes(_jpeg(color=(1, 2, 3)))
    (c2 / "n00000002_dup.JPEG").write_bytes(_jpeg(color=(3, 2, 1)))  # same key in another class
    (src / "val" / "n00000001" / "ILSVRC2012_val_00000001.JPEG").write_bytes(_jpeg())
    (src / "val" / "n00000002" / "ILSVRC2012_val_00000002.JPEG").write_bytes(_jpeg(color=(0, 0, 250)))
    return top


def _snapshot(top: Path, root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in top.rglob("*") if not p.is_relative_to(root) and not p.is_symlink()}


def test_every_bad_input_is_quarantined_with_its_reason(hostile, ray_local):
    root = hostile / "root"
    before = _snapshot(hostile, root)
    summary = index.run(IndexConfig(source=str(hostile / "src"), data=str(root), samples_per_shard=5))
    shard.run(ShardConfig(data=str(root), resize=64))
    got = {r["key"]: r["reason"] for r in rejects(root)}
    for key, reason in WANT.items():
        assert key in got, f"{key} was not quarantined; rejected: {sorted(got)}"
        assert reason in got[key], (key, got[key])
    assert summary["rejected"] >= 4
    samples = read_shards(root, "train")
    assert {k for k in samples if "good" in k} == {f"n0000000{c}_good{i}" for c in (1, 2) for i in range(4)}
    # Exactly one of the two duplicate-keyed images made it in; the other is quarantined.
    assert "n00000002_dup" in samples
    assert _snapshot(hostile, root) == before  # nothing outside ROOT was written
    assert (hostile / "outside.txt").read_text() == "a file outside the dataset\n"


def test_strict_turns_any_reject_into_a_failure(hostile, ray_local, tmp_path):
    root = tmp_path / "root"
    index.run(IndexConfig(source=str(hostile / "src"), data=str(root), samples_per_shard=5))
    with pytest.raises(StageError, match="--strict"):
        shard.run(ShardConfig(data=str(root), resize=64, strict=True))


def _tar_add(tar: tarfile.TarFile, info: tarfile.TarInfo, payload: bytes = b"") -> None:
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload) if payload else None)


def test_hostile_tar_entries_in_the_train_tar(sample_src, tmp_path):
    """Hard links, symlinks, absolute and '../' names inside a per-class tar are quarantined."""
    tarballs = tmp_path / "tarballs"
    shutil.copytree(sample_src / "tarballs", tarballs)
    src = sources.open_source(str(tarballs))
    wnid = src.classes()[0]["wnid"]
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        _tar_add(tar, tarfile.TarInfo(f"{wnid}_good.JPEG"), _jpeg())
        _tar_add(tar, tarfile.TarInfo(f"/etc/{wnid}_abs.JPEG"), _jpeg())
        _tar_add(tar, tarfile.TarInfo(f"../../{wnid}_up.JPEG"), _jpeg())
        hard = tarfile.TarInfo(f"{wnid}_hard.JPEG")
        hard.type, hard.linkname = tarfile.LNKTYPE, f"{wnid}_good.JPEG"
        _tar_add(tar, hard)
        sym = tarfile.TarInfo(f"{wnid}_sym.JPEG")
        sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
        _tar_add(tar, sym)
    with tarfile.open(tarballs / sources.TRAIN_TAR, "a") as outer:
        _tar_add(outer, tarfile.TarInfo("n99999999.tar"), inner.getvalue())  # not a devkit class
        _tar_add(outer, tarfile.TarInfo(f"{wnid}.tar"), inner.getvalue())  # a second tar of a real class
    root = tmp_path / "root"
    index.run(IndexConfig(source=str(tarballs), data=str(root)))
    got = {r["key"]: r["reason"] for r in rejects(root)}
    assert "unsafe tar entry name" in got[f"{wnid}_abs"]
    assert "unsafe tar entry name" in got[f"{wnid}_up"]
    assert "hard link" in got[f"{wnid}_hard"]
    assert "symlink to '/etc/passwd'" in got[f"{wnid}_sym"]
    assert "not among the devkit's" in got["n99999999"]
    rows = {r["key"] for r in contract.read_index(str(root), "train").to_pylist()}
    assert f"{wnid}_good" in rows


def _retar_devkit(tarballs: Path, edit) -> None:
    path = tarballs / sources.DEVKIT
    with tarfile.open(path, "r:gz") as tf:
        members = [(m, tf.extractfile(m).read() if m.isfile() else None) for m in tf]
    with tarfile.open(path, "w:gz") as tf:
        for m, data in members:
            if data is not None and m.name.endswith("ground_truth.txt"):
                data = edit(data)
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data) if data is not None else None)


def test_val_ground_truth_with_the_wrong_number_of_lines_is_a_clear_error(sample_src, tmp_path):
    tarballs = tmp_path / "tarballs"
    shutil.copytree(sample_src / "tarballs", tarballs)
    _retar_devkit(tarballs, lambda d: b"\n".join(d.split(b"\n")[:-3]) + b"\n")  # drop the last lines
    with pytest.raises(StageError, match="ground_truth.txt in the devkit has only"):
        index.run(IndexConfig(source=str(tarballs), data=str(tmp_path / "root")))
    _retar_devkit(tarballs, lambda d: d + b"1\n1\n1\n1\n1\n")  # more lines than images
    with pytest.raises(StageError, match="must match one to one"):
        index.run(IndexConfig(source=str(tarballs), data=str(tmp_path / "root2")))


def test_kaggle_label_outside_the_synset_mapping_is_quarantined(sample_src, tmp_path):
    kaggle = tmp_path / "kaggle"
    shutil.copytree(sample_src / "kaggle", kaggle)
    csv = kaggle / sources.KAGGLE_VAL_CSV
    lines = csv.read_text().splitlines()
    key = lines[1].split(",")[0]
    lines[1] = f"{key},n12345678 1 2 3 4"
    csv.write_text("\n".join(lines) + "\n")
    root = tmp_path / "root"
    index.run(IndexConfig(source=str(kaggle), data=str(root)))
    got = {r["key"]: r["reason"] for r in rejects(root)}
    assert "'n12345678', which is not in LOC_synset_mapping.txt" in got[key]


def test_missing_devkit_and_missing_labels_are_named(sample_src, tmp_path):
    tarballs = tmp_path / "tarballs"
    shutil.copytree(sample_src / "tarballs", tarballs)
    (tarballs / sources.DEVKIT).unlink()
    with pytest.raises(StageError, match="ILSVRC2012_devkit_t12.tar.gz' is missing"):
        index.run(IndexConfig(source=str(tarballs), data=str(tmp_path / "a")))
    kaggle = tmp_path / "kaggle"
    shutil.copytree(sample_src / "kaggle", kaggle)
    (kaggle / sources.KAGGLE_VAL_CSV).unlink()
    with pytest.raises(StageError, match="LOC_val_solution.csv' is missing"):
        index.run(IndexConfig(source=str(kaggle), data=str(tmp_path / "b")))
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.parquet"))
