"""index -> shard -> stats -> status on generated data, with a real local Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines import contract, index, shard, stats, status
from pipelines.config import IndexConfig, ShardConfig, StatsConfig, StatusConfig
from pipelines.errors import StrictFailure

from .conftest import LAYOUTS
from .helpers import image, mtimes, read_shards, rejects

SPS = 10  # samples per shard: 4 train shards and 2 val shards from the session sample


def _build(src: Path, root: Path, **shard_kw) -> tuple[dict, dict]:
    i = index.run(IndexConfig(source=str(src), data=str(root), samples_per_shard=SPS))
    s = shard.run(ShardConfig(data=str(root), **shard_kw))
    return i, s


@pytest.fixture(scope="module")
def built(sample_src, ray_local, tmp_path_factory) -> dict[str, Path]:
    """Each layout indexed and sharded into its own ROOT."""
    roots = {}
    for layout, folder in LAYOUTS.items():
        root = tmp_path_factory.mktemp(layout)
        i, _ = _build(sample_src / folder, root)
        assert i["layout"] == layout
        roots[layout] = root
    return roots


def _states(root: Path) -> dict[str, str]:
    return status.run(StatusConfig(data=str(root)))["states"]


def test_three_layouts_give_the_same_samples(built, truth):
    per_layout = {
        layout: {split: read_shards(root, split) for split in ("train", "val")} for layout, root in built.items()
    }
    reference = per_layout["ilsvrc-tar"]
    for layout, samples in per_layout.items():
        for split in ("train", "val"):
            got = {k: (label, jpg) for k, (label, jpg, _) in samples[split].items()}
            want = {k: (label, jpg) for k, (label, jpg, _) in reference[split].items()}
            assert got == want, f"{layout} {split} differs from ilsvrc-tar"
    # Same bytes in, same shards out: the manifests agree checksum for checksum.
    manifests = [json.loads((root / "shards" / "train.json").read_text()) for root in built.values()]
    assert len({m["digest"] for m in manifests}) == 1


def test_every_source_image_is_in_one_shard_or_rejected_with_its_true_label(built, truth):
    for layout, root in built.items():
        classes = json.loads((root / "classes.json").read_text())
        assert [c["wnid"] for c in classes] == sorted(c["wnid"] for c in truth["classes"])
        assert [c["index"] for c in classes] == list(range(len(classes)))
        rejected = {r["key"]: r for r in rejects(root)}
        assert set(rejected) == set(truth["bad"]), layout
        for split in ("train", "val"):
            samples = read_shards(root, split)  # fails on a key in two shards
            assert not set(samples) & set(rejected)
            assert set(samples) | {k for k, r in rejected.items() if r["split"] == split} == set(truth[split])
            for key, (label, _, _) in samples.items():
                # val labels went through the devkit's ILSVRC2012_ID -> WNID mapping (ilsvrc-tar)
                # or LOC_val_solution.csv (kaggle): both must land on the generator's truth.
                assert classes[label]["wnid"] == truth[split][key], (layout, split, key)


def test_shards_mix_classes_and_follow_the_manifest(built):
    root = built["ilsvrc-tar"]
    manifest = json.loads((root / "shards" / "train.json").read_text())
    samples = read_shards(root, "train")
    assert manifest["complete"] and manifest["samples"] == len(samples)
    for entry in manifest["shards"]:
        labels = {label for label, _, name in samples.values() if name == entry["name"]}
        assert entry["samples"] == sum(1 for *_, name in samples.values() if name == entry["name"])
        assert entry["bytes"] == (root / "shards" / "train" / entry["name"]).stat().st_size
        assert entry["checksum"] == contract.file_checksum(str(root / "shards" / "train" / entry["name"]))
        if entry["samples"] >= 5:
            assert len(labels) > 1, f"{entry['name']} holds a single class"


def test_quirky_inputs_come_out_as_rgb_baseline_jpegs(built, truth):
    root = built["ilsvrc-tar"]
    samples = {**read_shards(root, "train"), **read_shards(root, "val")}
    quirky = [k for keys in truth["quirks"].values() for k in keys]
    assert len(quirky) >= 5
    for key, (_, jpg, _) in samples.items():
        im = image(jpg)
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256)), key
        assert not im.info.get("progressive") and not im.info.get("progression"), key
    assert set(quirky) <= set(samples)


def test_damaged_inputs_are_rejected_with_reasons(built, truth):
    want = {"empty": "empty file (0 bytes)", "truncated": "truncated", "not-image": "not an image"}
    for layout, root in built.items():
        got = {r["key"]: r for r in rejects(root)}
        for key, kind in truth["bad"].items():
            assert want[kind] in got[key]["reason"], (layout, key, got[key])
            assert got[key]["source"], got[key]
        summary = shard.run(ShardConfig(data=str(root)))  # nothing to redo; counts still reported
        assert summary["rejected"] == len(truth["bad"]) and summary["written"] == 0


def test_strict_fails_after_writing_everything(built, sample_src, ray_local, tmp_path):
    root = built["folder"]
    with pytest.raises(StrictFailure, match="4 inputs were rejected") as err:
        shard.run(ShardConfig(data=str(root), strict=True))
    assert err.value.summary["rejected"] == 4
    assert json.loads((root / "shards" / "train.json").read_text())["complete"]
    # The CLI turns it into exit code 1 with the summary as the last line (index needs no Ray).
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "index",
            "--source",
            str(sample_src / "folders"),
            "--data",
            str(tmp_path / "d"),
            "--strict",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rejected"] == 1
    assert "--strict: 1 inputs were rejected" in proc.stderr
    assert (tmp_path / "d" / "index" / "train.parquet").exists()


def test_rerun_delete_resize_and_status(sample_src, ray_local, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_src / "folders", src)
    root = tmp_path / "root"
    assert set(_states(root).values()) == {"missing"}

    _build(src, root)
    assert _states(root) == {"index": "done", "shard train": "done", "shard val": "done", "stats": "missing"}
    stats.run(StatsConfig(data=str(root)))
    assert set(_states(root).values()) == {"done"}

    # Nothing changed: no file is rewritten.
    before = mtimes(root)
    again = shard.run(ShardConfig(data=str(root)))
    assert again["written"] == 0 and again["skipped"] == again["shards"] == 6
    assert stats.run(StatsConfig(data=str(root)))["skipped"]
    assert mtimes(root) == before

    # One shard deleted: status sees it, the rerun rewrites that shard only, byte for byte.
    victim = root / "shards" / "train" / "train-000002.tar"
    checksum = contract.file_checksum(str(victim))
    victim.unlink()
    st = _states(root)
    assert st["shard train"] == "stale" and st["shard val"] == "done" and st["stats"] == "done"
    again = shard.run(ShardConfig(data=str(root)))
    assert again["written"] == 1
    after = mtimes(root)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {"shards/train/train-000002.tar", "shards/train/train-000002.idx.json"}
    assert contract.file_checksum(str(victim)) == checksum
    assert set(_states(root).values()) == {"done"}

    # A shard damaged in place, its size unchanged: only the checksum sees it. `status --verify`
    # reports it, `shard --verify` rewrites that shard alone (the default checks compare sizes).
    victim = root / "shards" / "val" / "val-000001.tar"
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[2000:2100] = bytes(100)
    victim.write_bytes(bytes(bad))
    assert _states(root)["shard val"] == "done"  # the size matches: not seen without --verify
    verified = status.run(StatusConfig(data=str(root), verify=True))
    [row] = [r for r in verified["stages"] if r["stage"] == "shard val"]
    assert row["state"] == "stale" and "val-000001.tar" in row["reason"]
    before = mtimes(root)
    again = shard.run(ShardConfig(data=str(root), verify=True))
    assert again["written"] == 1 and victim.read_bytes() == good
    after = mtimes(root)
    assert {p for p in after if after[p] != before.get(p)} == {
        "shards/val/val-000001.tar",
        "shards/val/val-000001.idx.json",
    }

    # Shards made before sample indexes existed (no index in the manifest, no sidecar): the rerun
    # scans each tar for its index and rewrites no tar, except one damaged in place (its size
    # kept): the scan hashes what it reads, so that tar is remade from the source, not indexed.
    damaged = root / "shards" / "train" / "train-000001.tar"
    good = damaged.read_bytes()
    indexes = {p: p.read_bytes() for p in (root / "shards").rglob("*.idx.json")}
    assert len(indexes) == 6
    for split in ("train", "val"):
        mpath = root / "shards" / f"{split}.json"
        m = json.loads(mpath.read_text())
        for entry in m["shards"]:
            del entry["index"]
        mpath.write_text(json.dumps(m))
    for p in indexes:
        p.unlink()
    bad = bytearray(good)
    bad[3000:3100] = bytes(100)  # inside the first image's JPEG bytes: the tar headers still read
    damaged.write_bytes(bytes(bad))
    before = mtimes(root)
    again = shard.run(ShardConfig(data=str(root)))
    assert again["remade_damaged"] == ["train/train-000001.tar"]
    assert again["indexed"] == 5 and again["written"] == 1 and damaged.read_bytes() == good
    after = mtimes(root)
    assert {p for p in before if p.endswith(".tar") and after[p] != before[p]} == {"shards/train/train-000001.tar"}
    assert {p: p.read_bytes() for p in indexes} == indexes  # the same index as the shard stage wrote
    _assert_indexes_locate_every_sample(root)

    # A parameter change redoes every shard, and the stats become stale.
    again = shard.run(ShardConfig(data=str(root), resize=128))
    assert again["written"] == again["shards"] == 6 and again["skipped"] == 0
    after = mtimes(root)
    assert all(after[p] != before[p] for p in before if p.startswith("shards/") and p.endswith(".tar"))
    assert image(read_shards(root, "val").popitem()[1][1]).size == (128, 128)
    st = _states(root)
    assert st["shard train"] == "done" and st["stats"] == "stale"
    stats.run(StatsConfig(data=str(root)))
    assert set(_states(root).values()) == {"done"}

    # A new source image makes the index stale; reindexing makes the shards stale.
    wnid = sorted(p.name for p in (src / "train").iterdir())[0]
    first = sorted((src / "train" / wnid).iterdir())[0]
    shutil.copy(first, src / "train" / wnid / f"{wnid}_999999.JPEG")
    assert _states(root)["index"] == "stale"
    index.run(IndexConfig(source=str(src), data=str(root), samples_per_shard=SPS))
    st = _states(root)
    assert st["index"] == "done" and st["shard train"] == "stale" and st["shard val"] == "done"


def test_a_codec_upgrade_makes_the_shards_stale_and_a_rerun_remakes_them(sample_src, ray_local, tmp_path, monkeypatch):
    root = tmp_path / "root"
    _build(sample_src / "folders", root, split="val", resize=64)
    real = contract.codec_versions()
    assert json.loads((root / "shards" / "val.json").read_text())["params"]["codecs"] == real
    assert _states(root)["shard val"] == "done"
    newer = {**real, "torchvision": real["torchvision"] + ".post1"}
    monkeypatch.setattr(contract, "codec_versions", lambda: newer)  # as if torchvision were upgraded
    st = status.run(StatusConfig(data=str(root)))
    [row] = [r for r in st["stages"] if r["stage"] == "shard val"]
    assert (
        row["state"] == "stale" and f"torchvision {real['torchvision']} (here {newer['torchvision']})" in row["reason"]
    )
    again = shard.run(ShardConfig(data=str(root), split="val", resize=64))
    assert again["written"] == again["shards"] == 2 and again["skipped"] == 0
    assert _states(root)["shard val"] == "done"


def _assert_indexes_locate_every_sample(root: Path) -> None:
    """Each sample's (offset, size) in the index is exactly that sample's bytes in the tar."""
    from pipelines import storage, tarindex

    for split in ("train", "val"):
        want = read_shards(root, split)
        got = {}
        for entry in json.loads((root / "shards" / f"{split}.json").read_text())["shards"]:
            url = str(root / "shards" / split / entry["name"])
            doc = tarindex.read(url)
            assert doc["samples"] == entry["samples"] and doc["checksum"] == entry["checksum"]
            assert entry["index"] == entry["name"].replace(".tar", ".idx.json")
            for key, label, off, size in zip(doc["keys"], doc["labels"], doc["offsets"], doc["sizes"]):
                [(k, jpg, lab)] = tarindex.parse_run(storage.read_range(url, off, size))
                got[k] = (lab, jpg, entry["name"])
                assert (k, lab) == (key, label)
            whole = tarindex.parse_run(storage.read_range(url, 0, doc["offsets"][-1] + doc["sizes"][-1]))
            assert [k for k, _, _ in whole] == doc["keys"]  # a run of samples is one read
        assert got == want


def test_keep_aspect_keeps_the_whole_image(sample_src, ray_local, tmp_path):
    root = tmp_path / "root"
    _build(sample_src / "folders", root, split="val", keep_aspect=True, resize=64)
    rows = {r["key"]: r for r in contract.read_index(str(root), "val").to_pylist()}
    for key, (_, jpg, _) in read_shards(root, "val").items():
        src_size = image(Path(rows[key]["path"]).read_bytes()).size
        got = image(jpg).size
        assert min(got) == 64
        assert abs(got[0] / got[1] - src_size[0] / src_size[1]) < 0.03, (key, src_size, got)
    assert not (root / "shards" / "train.json").exists()  # --split val made only val


def test_stats_match_a_direct_computation(built):
    root = built["ilsvrc-tar"]
    stats.run(StatsConfig(data=str(root)))
    got = json.loads((root / "stats.json").read_text())
    pixels = np.concatenate(
        [
            np.asarray(image(jpg), dtype=np.float64).reshape(-1, 3) / 255
            for _, jpg, _ in read_shards(root, "train").values()
        ]
    )
    mean, cov = pixels.mean(0), np.cov(pixels, rowvar=False, bias=True)
    eigval, eigvec = np.array(got["eigval"]), np.array(got["eigvec"])
    assert got["images"] == len(read_shards(root, "train"))
    assert np.allclose(got["mean"], mean, atol=1e-9) and np.allclose(got["std"], np.sqrt(np.diag(cov)), atol=1e-9)
    assert all(0 < m < 1 for m in got["mean"]) and all(0 < s < 1 for s in got["std"])
    assert np.all(eigval > 0) and np.all(np.diff(eigval) <= 0)
    assert np.allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-9)
    assert np.allclose(eigvec @ np.diag(eigval) @ eigvec.T, cov, atol=1e-9)  # columns are eigenvectors


def test_shard_cli_reports_progress_and_a_json_summary(built, ray_local):
    """The CLI path inside a process of its own, joined to the running Ray through RAY_ADDRESS."""
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    root = built["kaggle"]
    (root / "shards" / "val" / "val-000001.tar").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "shard", "--data", str(root), "--split", "val"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "shard: 1/1 shards" in proc.stderr and "img/s" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["written"] == 1 and summary["skipped"] == 1


def test_a_small_job_runs_in_local_processes_and_makes_what_ray_makes(built, sample_src, tmp_path):
    """Below 4 GB of source, the CLI's shard and stats run their tasks in a pool of this machine's
    processes instead of starting a local Ray: the same shards byte for byte, the same stats."""
    root = tmp_path / "local"
    index.run(IndexConfig(source=str(sample_src / "tarballs"), data=str(root), samples_per_shard=SPS))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = {}
    for stage in ("shard", "stats"):
        p = subprocess.run(
            [sys.executable, "-m", "pipelines", "-q", stage, "--data", str(root)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        out[stage] = json.loads(p.stdout.strip().splitlines()[-1])
    assert [n["node"].startswith("local:") for n in out["shard"]["nodes"]] == [True]  # no Ray node
    for split in ("train", "val"):
        local = json.loads((root / "shards" / f"{split}.json").read_text())
        on_ray = json.loads((built["ilsvrc-tar"] / "shards" / f"{split}.json").read_text())
        assert [s["checksum"] for s in local["shards"]] == [s["checksum"] for s in on_ray["shards"]]
    with_ray = stats.run(StatsConfig(data=str(built["ilsvrc-tar"]), parallel="ray", force=True))
    assert out["stats"]["images"] == with_ray["images"]
    mine, theirs = (json.loads((r / "stats.json").read_text()) for r in (root, built["ilsvrc-tar"]))
    assert np.allclose(mine["mean"], theirs["mean"], atol=1e-9) and np.allclose(
        mine["eigval"], theirs["eigval"], atol=1e-9
    )


def test_local_workers_start_before_the_mlflow_run_only_when_they_will_work(sample_src, tmp_path):
    """The CLI calls a stage's warm_start before it opens the MLflow run, so the local workers'
    imports overlap MLflow's. They start only when the run will use them, and the stage's pool
    takes them: none is left behind, none starts for a rerun with nothing to make, nor for Ray."""
    from pipelines import cluster

    root = tmp_path / "warm"
    index.run(IndexConfig(source=str(sample_src / "tarballs"), data=str(root), samples_per_shard=SPS))
    try:
        for module, cfg in (
            (shard, ShardConfig(data=str(root), parallel="local")),
            (stats, StatsConfig(data=str(root), parallel="local")),
        ):
            module.warm_start(cfg)
            assert list(cluster._prestarted) == [(cfg.num_cpus, module.__name__)], module
            pool = cluster._prestarted[(cfg.num_cpus, module.__name__)][0]
            summary = module.run(cfg)
            assert not cluster._prestarted and pool._shutdown_thread, "the stage did not take the started workers"
            assert not summary.get("skipped")
            module.warm_start(cfg)  # a rerun: everything is made already
            assert not cluster._prestarted, f"{module.__name__}: workers started for a rerun with nothing to do"
        (root / "shards" / "val.json").unlink()  # a split to make again, but on Ray: no local workers
        shard.warm_start(ShardConfig(data=str(root), parallel="ray"))
        assert not cluster._prestarted
        shard.warm_start(ShardConfig(data=str(root), parallel="auto", ray_min_bytes=1))  # big enough for Ray
        assert not cluster._prestarted
    finally:
        cluster._drop_prestarted()


def _mlflow_runs(experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def test_prepare_makes_what_the_three_stages_make_in_one_process_each_its_own_run(built, sample_src, tmp_path):
    """`prepare` runs index, shard and stats in one process: the same shards byte for byte and
    the same stats as the stages run one by one, each stage an MLflow run of its own nested under
    one 'prepare' run; a rerun redoes nothing; --strict judges every rejected input at the end."""
    root = tmp_path / "prepared"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def prepare(*extra) -> tuple[int, dict, str]:
        p = subprocess.run(
            [sys.executable, "-m", "pipelines", "prepare", "--source", str(sample_src / "tarballs")]
            + ["--data", str(root), "--samples-per-shard", str(SPS), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        return p.returncode, json.loads(p.stdout.strip().splitlines()[-1]), p.stderr

    code, first, err = prepare()
    assert code == 0, err[-3000:]
    assert [n["node"].startswith("local:") for n in first["shard"]["nodes"]] == [True]  # one process, no Ray
    for split in ("train", "val"):
        mine = json.loads((root / "shards" / f"{split}.json").read_text())
        theirs = json.loads((built["ilsvrc-tar"] / "shards" / f"{split}.json").read_text())
        assert mine["digest"] == theirs["digest"] and [s["checksum"] for s in mine["shards"]] == [
            s["checksum"] for s in theirs["shards"]
        ]
    by_stages = stats.run(StatsConfig(data=str(built["ilsvrc-tar"]), parallel="ray"))
    assert first["stats"]["images"] == by_stages["images"]
    mine, theirs = (json.loads((r / "stats.json").read_text()) for r in (root, built["ilsvrc-tar"]))
    for k in ("mean", "std", "eigval"):  # sums in another order: equal to the last bits
        assert np.allclose(mine[k], theirs[k], rtol=1e-9, atol=1e-12), k
    assert set(_states(root).values()) == {"done"}

    runs = {r.info.run_id: r for r in _mlflow_runs("preprocessing")}
    parent = runs[first["mlflow_run_id"]]
    assert (parent.info.run_name, parent.info.status) == ("prepare", "FINISHED")
    for stage in ("index", "shard", "stats"):
        child = runs[first[stage]["mlflow_run_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (child.data.tags["pipelines.stage"], child.info.status) == (stage, "FINISHED")

    code, again, err = prepare("--strict")  # the sample's damaged files were rejected
    assert code == 1 and "--strict: " in err and f"{first['shard']['rejected']} inputs were rejected" in err
    assert again["index"]["skipped"] and again["shard"]["written"] == 0 and again["stats"]["skipped"]
    assert first["shard"]["rejected"] == len(rejects(root)) > 0
    assert _mlflow_runs("preprocessing")[-4].info.status == "FAILED"  # the strict run's 'prepare'


def test_stages_in_one_process_share_their_local_workers():
    """Inside local_workers_shared a stage's pool of local processes is handed to the next stage
    instead of being shut down, and shut down on leaving; a pool a failure may have broken is
    shut down at once, not handed on."""
    from pipelines import cluster

    with cluster.local_workers_shared():
        with cluster.TaskPool(False, 1.0, "pipelines.shard") as pool:
            pid = pool.result(pool.submit(os.getpid, ()))["result"]
            first = pool._pool
        with cluster.TaskPool(False, 1.0, "pipelines.stats") as pool:
            assert pool._pool is first and pid in first._processes  # the same workers
        assert list(cluster._prestarted) == [(1.0, "pipelines.stats")]
    assert not cluster._prestarted and first._shutdown_thread

    with cluster.local_workers_shared():
        with pytest.raises(RuntimeError), cluster.TaskPool(False, 1.0, "pipelines.shard") as pool:
            raise RuntimeError("a task failed")
        assert not cluster._prestarted and pool._pool._shutdown_thread
