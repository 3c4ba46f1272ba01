"""ILSVRC-2012's shape, small: 1,000 classes, the devkit's 1,860 synsets, val ground truth in
ILSVRC2012_ID order (the real file's 50,000 lines, trimmed to the images generated). Every image
must come out of index -> shard -> stats with its true label, through the devkit's mapping."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipelines import contract, index, sample, shard, stats
from pipelines.config import IndexConfig, ShardConfig, StatsConfig
from pipelines.sample import SampleConfig

from .helpers import read_shards, rejects

TRAIN, VAL = 2, 1  # per class: 3,000 images in all


@pytest.fixture(scope="module")
def inet(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imagenet-shape") / "src"
    summary = sample.run(
        SampleConfig(
            out=str(out), classes=1000, imagenet=True, train_per_class=TRAIN, val_per_class=VAL, size=(40, 32), bad=True
        )
    )
    assert summary["synsets"] == 1860 and summary["classes"] == 1000 and summary["val"] == 1000 * VAL
    return out


def _devkit(src: Path) -> tuple[list, list[int]]:
    with tarfile.open(src / "tarballs" / sample.DEVKIT_TAR) as tar:
        meta = tar.extractfile(f"{sample.DEVKIT_DIR}/data/meta.mat").read()
        gt = tar.extractfile(f"{sample.DEVKIT_DIR}/data/ILSVRC2012_validation_ground_truth.txt").read()
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    return list(synsets), [int(x) for x in gt.split()]


def test_the_devkit_has_the_real_shape(inet):
    synsets, gt = _devkit(inet)
    assert [int(s["ILSVRC2012_ID"]) for s in synsets] == list(range(1, 1861))
    assert set(synsets[0].dtype.names) == {
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    }
    leaves = [s for s in synsets if int(s["num_children"]) == 0]
    nodes = [s for s in synsets if int(s["num_children"]) > 0]
    assert len(leaves) == 1000 and len(nodes) == 860
    assert [int(s["ILSVRC2012_ID"]) for s in leaves] == list(range(1, 1001))  # leaves first, as in the real file
    assert len({str(s["WNID"]) for s in synsets}) == 1860
    # ILSVRC2012_ID order is not sorted-WNID order (the bug a reader must not have).
    assert [str(s["WNID"]) for s in leaves] != sorted(str(s["WNID"]) for s in leaves)
    # One tree: every synset but the root is the child of exactly one node; the root reaches every leaf.
    children = {int(s["ILSVRC2012_ID"]): [int(c) for c in np.atleast_1d(s["children"])] for s in nodes}
    assert all(len(c) == int(s["num_children"]) for s, c in zip(nodes, children.values()))
    parents = [c for cs in children.values() for c in cs]
    assert sorted(parents) == list(range(1, 1860))  # the root (1860) has no parent
    seen, todo = set(), [1860]
    while todo:
        n = todo.pop()
        seen.add(n)
        todo += children.get(n, [])
    assert seen == set(range(1, 1861))
    heights = {int(s["ILSVRC2012_ID"]): int(s["wordnet_height"]) for s in synsets}
    assert all(heights[n] == 1 + max(heights[c] for c in cs) for n, cs in children.items())
    # The ground truth: one line per val image, in ILSVRC2012_val_ order, interleaved classes.
    assert len(gt) == 1000 * VAL and set(gt) <= set(range(1, 1001)) and gt != sorted(gt)


def test_index_shard_and_stats_label_every_image_through_the_devkit(inet, ray_local, tmp_path):
    truth = json.loads((inet / "truth.json").read_text())
    root = tmp_path / "data"
    i = index.run(IndexConfig(source=str(inet / "tarballs"), data=str(root), samples_per_shard=500))
    assert i["layout"] == "ilsvrc-tar" and i["classes"] == 1000
    shard.run(ShardConfig(data=str(root), resize=32))
    st = stats.run(StatsConfig(data=str(root)))

    classes = json.loads((root / "classes.json").read_text())
    by_wnid = {c["wnid"]: c for c in truth["classes"]}
    assert [c["wnid"] for c in classes] == sorted(by_wnid)  # labels are sorted-WNID positions
    assert all(c["name"] == by_wnid[c["wnid"]]["name"] for c in classes)  # names from meta.mat
    rejected = {r["key"] for r in rejects(root)}
    assert rejected == set(truth["bad"])
    for split in ("train", "val"):
        samples = read_shards(root, split)
        assert set(samples) == set(truth[split]) - rejected
        wrong = [k for k, (label, _, _) in samples.items() if classes[label]["wnid"] != truth[split][k]]
        assert not wrong, f"{len(wrong)} {split} images mislabelled, e.g. {wrong[:3]}"
    assert st["images"] == len(truth["train"]) - len(rejected & set(truth["train"]))

    # The other two layouts index to the same rows and labels (no shard needed to compare).
    want = {split: _labels(root, split) for split in ("train", "val")}
    for folder in ("kaggle", "folders"):
        other = tmp_path / folder
        index.run(IndexConfig(source=str(inet / folder), data=str(other), samples_per_shard=500))
        assert {split: _labels(other, split) for split in ("train", "val")} == want, folder


def _labels(root: Path, split: str) -> dict[str, int]:
    import pyarrow.parquet as pq

    t = pq.read_table(root / "index" / f"{split}.parquet", columns=["key", "label"]).to_pydict()
    return dict(zip(t["key"], t["label"]))


def test_a_layout_subset_replaces_the_others(tmp_path):
    out = tmp_path / "s"
    sample.run(SampleConfig(out=str(out), classes=3, train_per_class=2, val_per_class=1))
    assert (out / "kaggle").is_dir()
    s = sample.run(SampleConfig(out=str(out), classes=3, train_per_class=3, val_per_class=1, layouts=("tarballs",)))
    assert s["layouts"] == ["tarballs"] and sorted(p.name for p in out.iterdir()) == ["tarballs", "truth.json"]
    with pytest.raises(sample.SampleError, match="--layouts tarbals"):
        sample.run(SampleConfig(out=str(out), layouts=("tarbals",)))
    with pytest.raises(sample.SampleError, match="--imagenet with --classes 10"):
        sample.run(SampleConfig(out=str(out), imagenet=True))


def test_the_split_digest_hashed_in_batches_is_the_digest_of_the_whole_list(monkeypatch):
    """The index hashes its rows a batch at a time (no list of every row in memory); the digest
    must stay the one recorded in existing indexes and shard manifests."""
    import pyarrow as pa

    from pipelines import index
    from pipelines.common import digest

    rows = [
        {
            "key": f"n0000000{i % 7}_{i}",
            "label": i % 7,
            "sha256": None if i % 5 == 0 else f"{i:064x}",
            "etag": f'"{i:032x}"' if i % 5 == 0 else None,
            "shard": i // 10,
        }
        for i in range(95)
    ]
    want = digest([(r["key"], r["label"], r["sha256"] or f"etag:{r['etag']}", r["shard"]) for r in rows])
    monkeypatch.setattr(index, "BATCH", 8)  # 12 batches
    assert index.split_digest(pa.Table.from_pylist(rows)) == want == index.split_digest(rows)
    assert index.split_digest([]) == digest([])


def test_the_index_written_in_batches_is_the_index_written_at_once(sample_src, tmp_path, monkeypatch):
    """The index stage builds, orders, writes and hashes its rows a batch at a time; with batches
    of 7 rows it must write the same rows, positions, shards and digests as in one batch."""
    from pipelines import index as index_stage

    whole = tmp_path / "whole"
    index_stage.run(IndexConfig(source=str(sample_src / "tarballs"), data=str(whole), samples_per_shard=5))
    monkeypatch.setattr(index_stage, "BATCH", 7)
    batched = tmp_path / "batched"
    index_stage.run(IndexConfig(source=str(sample_src / "tarballs"), data=str(batched), samples_per_shard=5))
    for split in ("train", "val"):
        assert (
            contract.read_index(str(batched), split).to_pylist() == contract.read_index(str(whole), split).to_pylist()
        )
    record = [json.loads((r / "index" / "index.json").read_text()) for r in (whole, batched)]
    assert record[0]["digests"] == record[1]["digests"]
    assert (whole / "index" / "rejected.jsonl").read_text() == (batched / "index" / "rejected.jsonl").read_text()
