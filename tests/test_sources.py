"""Layout detection, the readers and one image's conversion: no Ray."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile

import pytest
from PIL import Image

from pipelines import contract, index, sources
from pipelines.config import IndexConfig
from pipelines.errors import StageError
from pipelines.images import decode_problem, prepare_image

from .conftest import LAYOUTS


def _jpeg(mode="RGB", size=(300, 200), fmt="JPEG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 40)[: len(mode)] if mode != "L" else 77).save(out, fmt)
    return out.getvalue()


def test_detects_each_layout(sample_src):
    for layout, folder in LAYOUTS.items():
        assert sources.detect(str(sample_src / folder)) == layout


def test_unknown_layout_says_what_was_looked_for(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(StageError) as err:
        sources.detect(str(tmp_path))
    msg = str(err.value)
    for expected in ("ILSVRC2012_img_train.tar", "LOC_synset_mapping.txt", "train/<wnid>/", str(tmp_path), "photos"):
        assert expected in msg
    with pytest.raises(StageError, match="does not exist"):
        sources.detect(str(tmp_path / "nope"))
    with pytest.raises(StageError, match="Unknown layout 'x'. Expected one of: ilsvrc-tar, kaggle, folder"):
        sources.open_source(str(tmp_path), "x")


def test_missing_devkit_is_named(sample_src, tmp_path):
    shutil.copy(sample_src / "tarballs" / sources.TRAIN_TAR, tmp_path)
    with pytest.raises(StageError, match="ILSVRC2012_devkit_t12.tar.gz' is missing"):
        sources.open_source(str(tmp_path))


def test_tar_members_are_read_in_place_by_byte_range(sample_src, truth):
    src = sources.open_source(str(sample_src / "tarballs"))
    wnids = {c["wnid"] for c in src.classes()}
    items = [i for split in ("train", "val") for i in src.items(split, wnids) if not i.reject]
    assert len(items) >= 40
    for item in items:
        data = sources.read_item(item.path, item.offset, item.size)
        assert hashlib.sha256(data).hexdigest() == item.sha256
        assert item.wnid == truth[item.split][item.key]
    # The classes' ILSVRC2012_IDs are not in sorted-WNID order, so this checks the mapping.
    ids = [c["ilsvrc2012_id"] for c in truth["classes"]]
    assert ids != sorted(ids)


def test_hostile_tar_entries_are_rejected_not_followed(sample_src, tmp_path):
    """A symlink or a '../' name inside the val tar is never read or extracted: it is quarantined."""
    tarballs = tmp_path / "tarballs"
    shutil.copytree(sample_src / "tarballs", tarballs)
    val = tarballs / sources.VAL_TAR
    with tarfile.open(val, "a") as tar:
        link = tarfile.TarInfo("ILSVRC2012_val_99999999.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        evil = tarfile.TarInfo("../../ILSVRC2012_val_00000001.JPEG")
        payload = b"\xff\xd8 not really"
        evil.size = len(payload)
        tar.addfile(evil, io.BytesIO(payload))
    src = sources.open_source(str(tarballs))
    items = list(src.items("val", {c["wnid"] for c in src.classes()}))
    rejected = {i.member: i.reject for i in items if i.reject}
    assert rejected == {
        "ILSVRC2012_val_99999999.JPEG": "tar entry is a symlink to '/etc/passwd', not an image",
        "../../ILSVRC2012_val_00000001.JPEG": "unsafe tar entry name '../../ILSVRC2012_val_00000001.JPEG' "
        "(absolute or with '..')",
    }


def test_classes_and_limit_take_a_subset(sample_src, tmp_path, truth):
    s = index.run(IndexConfig(source=str(sample_src / "folders"), data=str(tmp_path), classes=2, limit=3))
    rows = contract.read_index(str(tmp_path), "train").to_pylist()
    wnids = sorted(c["wnid"] for c in truth["classes"])[:2]
    assert {r["wnid"] for r in rows} == set(wnids)
    assert all(sum(r["wnid"] == w for r in rows) == 3 for w in wnids)
    assert s["classes"] == 2 and s["train"] == 6


def test_shard_assignment_is_seeded_and_independent_of_listing_order(sample_src, tmp_path):
    def assignment(root, **kw):
        data = tmp_path / str(len(list(tmp_path.iterdir())))
        index.run(IndexConfig(source=str(root), data=str(data), samples_per_shard=7, **kw))
        return {r["key"]: r["shard"] for r in contract.read_index(str(data), "train").to_pylist()}

    a = assignment(sample_src / "folders")
    assert a == assignment(sample_src / "tarballs")  # same seed, other layout, same shards
    assert a != assignment(sample_src / "folders", seed=1)
    assert max(a.values()) == (len(a) - 1) // 7


def test_index_rerun_with_nothing_changed_writes_nothing(sample_src, tmp_path):
    cfg = IndexConfig(source=str(sample_src / "kaggle"), data=str(tmp_path))
    assert not index.run(cfg)["skipped"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert index.run(cfg)["skipped"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG")])
def test_prepare_image_makes_rgb_baseline_jpegs(mode, fmt):
    out = Image.open(io.BytesIO(prepare_image(_jpeg(mode, (300, 200), fmt))))
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (256, 256))
    assert "progressive" not in out.info and "progression" not in out.info


def test_prepare_image_resizes_shorter_side_then_crops_the_centre():
    # Left third red, middle green, right third blue: the central crop of 600x200 is all green.
    im = Image.new("RGB", (600, 200))
    im.paste((255, 0, 0), (0, 0, 200, 200))
    im.paste((0, 255, 0), (200, 0, 400, 200))
    im.paste((0, 0, 255), (400, 0, 600, 200))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    out = Image.open(io.BytesIO(prepare_image(buf.getvalue(), resize=64))).convert("RGB")
    assert out.size == (64, 64)
    r, g, b = out.getpixel((32, 32))
    assert g > 200 and r < 40 and b < 40
    kept = Image.open(io.BytesIO(prepare_image(buf.getvalue(), resize=64, keep_aspect=True)))
    assert kept.size == (192, 64)


@pytest.mark.parametrize(
    "data,reason",
    [
        (_jpeg()[:300], "truncated"),
        (b"this is not an image\n" * 20, "not an image"),
        (_jpeg(size=(1, 1)), "sides under 8 px"),
    ],
)
def test_bad_images_raise_with_a_stable_reason(data, reason):
    with pytest.raises(Exception) as err:
        prepare_image(data)
    assert reason in decode_problem(err.value).lower()
    assert "0x" not in decode_problem(err.value)  # no object addresses: reasons compare across runs


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 300x200 header now claims too much
    with pytest.raises(Exception) as err:
        prepare_image(_jpeg())
    assert "decompression bomb" in decode_problem(err.value)
