"""Reading the source in bulk: the index deals runs of neighbouring images to shards, and the
shard stage reads each run with one ranged read (one GET on S3), several at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from pipelines import contract, index, shard
from pipelines.config import IndexConfig
from pipelines.sample import SampleConfig
from pipelines.sample import run as make_sample

from . import services as sv


def _row(path, offset, size, key="k"):
    return (key, 0, path, offset, size, key)


def test_neighbouring_ranges_merge_and_far_ones_do_not():
    gap, cap = shard.MERGE_GAP, shard.MAX_READ
    rows = [
        _row("a.tar", 1000, 100),
        _row("a.tar", 0, 500),  # out of order: sorted by offset
        _row("a.tar", 1100 + gap + 1, 10),  # just past the gap: a read of its own
        _row("b.tar", 0, 10),  # another file: another read
        _row("c.tar", 0, cap - 10),
        _row("c.tar", cap - 10, 20),
    ]  # would pass MAX_READ: split
    plan = shard.read_plan(rows)
    assert [(p, s, e, m) for p, s, e, m in plan] == [
        ("a.tar", 0, 1100, [1, 0]),
        ("a.tar", 1101 + gap, 1111 + gap, [2]),
        ("b.tar", 0, 10, [3]),
        ("c.tar", 0, cap - 10, [4]),
        ("c.tar", cap - 10, cap + 10, [5]),
    ]
    # Loose files (each its own object) are one read each, whatever their order.
    assert len(shard.read_plan([_row(f"f{i}.jpg", 0, 5) for i in range(5)])) == 5


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    out = tmp_path_factory.mktemp("bulk") / "src"
    make_sample(SampleConfig(out=str(out), classes=8, train_per_class=160, val_per_class=10, size=(64, 48)))
    return out


def _members(tarball):
    """Key -> position of the image in the train tarball, in the order its bytes are stored."""
    import tarfile

    order = {}
    with tarfile.open(tarball / "ILSVRC2012_img_train.tar") as outer:
        for m in outer:
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                for im in inner:
                    order[im.name.rsplit(".", 1)[0]] = len(order)
    return order


def test_shards_are_made_of_runs_of_neighbours_and_still_mix_classes(src, tmp_path):
    assignments = {}
    for layout in ("tarballs", "folders"):
        index.run(IndexConfig(source=str(src / layout), data=str(tmp_path / layout), samples_per_shard=1024))
        assignments[layout] = {
            r["key"]: (r["shard"], r["position"])
            for r in contract.read_index(str(tmp_path / layout), "train").to_pylist()
        }
    assert assignments["tarballs"] == assignments["folders"]  # members in key order: same shards
    rows = contract.read_index(str(tmp_path / "tarballs"), "train").to_pylist()
    assert index.run_length(1024) == 64
    stored = _members(src / "tarballs")
    by_shard: dict[int, list] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    assert sorted(len(v) for v in by_shard.values()) == [256, 1024]
    for members in by_shard.values():
        places = sorted(stored[r["key"]] for r in members)
        stretches = 1 + sum(b != a + 1 for a, b in zip(places, places[1:]))
        assert stretches <= len(members) // 64 + 1  # contiguous runs of 64 in the tarball
        assert len({r["wnid"] for r in members}) >= 3  # still a mix of classes
        # Inside a shard the images are shuffled: consecutive positions seldom come from one run.
        in_order = sorted(members, key=lambda r: r["position"])
        same_class = sum(a["wnid"] == b["wnid"] for a, b in zip(in_order, in_order[1:]))
        assert same_class < 0.6 * len(in_order)
    # The run layout needs no tuning at small sizes: tiny shards still take images one by one.
    assert index.run_length(30) == 1 and index.run_length(256) == 16


def test_the_index_read_as_ray_tasks_equals_the_index_read_in_this_process(src, tmp_path, ray_local):
    for layout, units in (("tarballs", 8 + 1), ("kaggle", 2 + 1)):  # class tars + val tar; 1,280 + 80 files
        got = {}
        for parallel in ("local", "ray"):
            root = str(tmp_path / layout / parallel)
            summary = index.run(
                IndexConfig(source=str(src / layout), data=root, samples_per_shard=1024, parallel=parallel)
            )
            assert summary["ray_tasks"] == (units if parallel == "ray" else 0)
            got[parallel] = (
                {split: contract.read_index(root, split).to_pylist() for split in ("train", "val")},
                json.loads((tmp_path / layout / parallel / "index" / "index.json").read_text())["digests"],
            )
        assert got["ray"] == got["local"]
        assert len(got["ray"][0]["train"]) == 8 * 160


@pytest.mark.slow
def test_shard_stage_reads_the_tarballs_in_s3_with_one_get_per_run(src, tmp_path, ray_local):
    """The same images from local tarballs, from the tarballs in S3 and from the Kaggle layout in
    S3 give byte-identical shards. From the tarballs in S3 the shard tasks send at most one GET
    per 50 images (runs of 64, merged ranges); the Kaggle layout's index downloads no image (the
    listing's ETags identify them) and the shard stage reads each image once."""
    import boto3

    with sv.seaweedfs(tmp_path / "s3") as s3:
        client = boto3.client(
            "s3",
            endpoint_url=s3["env"]["AWS_ENDPOINT_URL"],
            aws_access_key_id=sv.ACCESS_KEY,
            aws_secret_access_key=sv.SECRET_KEY,
            region_name="us-east-1",
        )
        for layout in ("tarballs", "kaggle"):
            for f in (src / layout).rglob("*"):
                if f.is_file():
                    client.upload_file(str(f), sv.BUCKET, f"{layout}/{f.relative_to(src / layout)}")
        env = dict(os.environ, **s3["env"], RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
        summaries = {}
        for where, source, root in (
            ("local", str(src / "tarballs"), str(tmp_path / "local")),
            ("s3", f"s3://{sv.BUCKET}/tarballs", f"s3://{sv.BUCKET}/root"),
            ("kaggle", f"s3://{sv.BUCKET}/kaggle", f"s3://{sv.BUCKET}/root-kaggle"),
        ):
            for stage in (["index", "--source", source, "--samples-per-shard", "1024"], ["shard", "--resize", "64"]):
                proc = subprocess.run(
                    [sys.executable, "-m", "pipelines", stage[0], "--data", root, *stage[1:]],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert proc.returncode == 0, proc.stderr[-3000:]
                summaries[where, stage[0]] = json.loads(proc.stdout.strip().splitlines()[-1])
        local, remote, kaggle = (summaries[w, "shard"] for w in ("local", "s3", "kaggle"))
        # The same bytes, however and wherever read.
        assert local["output_digest"] == remote["output_digest"] == kaggle["output_digest"]
        assert local["source_gets"] == 0
        images = 8 * 160 + 8 * 10
        assert remote["samples"] + remote["rejected_here"] == images
        assert 0 < remote["source_gets"] <= images / 50, remote
        assert remote["gets_per_image"] == round(remote["source_gets"] / images, 4)
        # Loose objects: the index reads the two label files and no image; the shards read each once.
        assert summaries["kaggle", "index"]["source_gets"] <= 3, summaries["kaggle", "index"]
        assert images <= kaggle["source_gets"] <= images + 8, kaggle
        # The index read the class tars as Ray tasks (a cluster is there), one GET each.
        assert summaries["s3", "index"]["ray_tasks"] == 8 + 1
        # Which node did the work: this test's one local Ray node did all of it.
        assert [(n["shards"], n["images"]) for n in remote["nodes"]] == [(remote["written"], images)]
        assert Counter(len(n["node"]) for n in remote["nodes"]) == Counter({56: 1})
