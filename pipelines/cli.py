"""``python -m pipelines <stage> ...``: argparse subcommands only.

Each subcommand builds its stage's config from the flags given (defaults live in config.py),
calls ``<stage>.run(cfg)``, and prints the returned summary as one final JSON line.
Exit codes: 0 done, 1 ``--strict`` and inputs were rejected, 2 a usage or input error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from . import config
from .errors import StageError, StrictFailure

TRACKED = ("index", "shard", "stats")
RAY_STAGES = ("shard", "stats", "train", "demo")
_UNSET = argparse.SUPPRESS  # flags not given stay out of the config, so config.py's defaults win


def _default(cls, name):
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


METAVARS = {
    "name": "NAME",
    "experiment": "EXP",
    "storage": "DIR",
    "ledger": "DIR",
    "register": "NAME",
    "alias": "ALIAS",
    "address": "URL",
    "layout": None,
    "workers": "N|MIN-MAX",
    "size": "WxH",
}


def _add(p, cls, *flags, dest, help, **kw):
    kw.setdefault("default", _UNSET)
    flag_only = kw.get("action") in ("store_true", "store_false", "store_const")
    default = _default(cls, dest)
    # The default that is really used, once: none shown where the help says it or there is none.
    if not flag_only and default not in (dataclasses.MISSING, None) and "default:" not in help:
        shown = "x".join(map(str, default)) if isinstance(default, tuple) else default
        help = f"{help} (default: {shown})"
    if not flag_only and "choices" not in kw:
        kw.setdefault("metavar", METAVARS.get(dest) or {int: "N", float: "X"}.get(kw.get("type"), dest.upper()))
    p.add_argument(*flags, dest=dest, help=help, **kw)


def _workers(value: str):
    """--workers N or MIN-MAX -> N or (MIN, MAX)."""
    try:
        lo, _, hi = value.partition("-")
        return (int(lo), int(hi)) if hi else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{value}': expected a number of workers (8) or a range MIN-MAX (4-8)"
        ) from None


def _size(text: str):
    """--size WxH, with parse_size's message (argparse would replace a ValueError's by its own)."""
    from .sample import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _stage_parsers(sub):
    from .sample import SampleConfig

    p = sub.add_parser("sample", help="write a small ImageNet-format dataset in all three layouts")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add(p, SampleConfig, "--classes", dest="classes", type=int, help="number of classes")
    _add(p, SampleConfig, "--train-per-class", dest="train_per_class", type=int, help="train images per class")
    _add(p, SampleConfig, "--val-per-class", dest="val_per_class", type=int, help="val images per class")
    _add(p, SampleConfig, "--size", dest="size", type=_size, help="nominal image size WxH")
    _add(p, SampleConfig, "--seed", dest="seed", type=int, help="random seed")
    _add(
        p,
        SampleConfig,
        "--bad",
        dest="bad",
        action="store_true",
        help="also write damaged files (truncated, empty, not an image)",
    )
    _add(
        p,
        SampleConfig,
        "--imagenet",
        dest="imagenet",
        action="store_true",
        help="ILSVRC-2012's shape: 1000 classes, the devkit's 1860 synsets, 50 val images per class "
        "(50,000 ground-truth lines) unless --val-per-class says otherwise",
    )
    _add(
        p,
        SampleConfig,
        "--layouts",
        dest="layouts",
        type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
        metavar="LIST",
        help="which layouts to write, comma-separated (default: tarballs,kaggle,folders)",
    )
    _add(
        p,
        SampleConfig,
        "--workers",
        dest="workers",
        type=int,
        help="processes encoding the images (the bytes are the same for any number)",
    )
    p.set_defaults(config=SampleConfig, module="sample")

    C = config.IndexConfig
    p = sub.add_parser("index", help="source -> classes.json + index/{train,val}.parquet")
    p.add_argument(
        "--source", required=True, metavar="SRC", help="ImageNet folder: original tarballs, Kaggle or train/<wnid>/"
    )
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset ROOT to write")
    _add(
        p,
        C,
        "--layout",
        dest="layout",
        choices=["ilsvrc-tar", "kaggle", "folder"],
        help="skip detection (default: detected from the files)",
    )
    _add(p, C, "--classes", dest="classes", type=int, help="keep the first N classes (sorted WNIDs; default: all)")
    _add(p, C, "--limit", dest="limit", type=int, help="at most N images per class and split (default: all)")
    _add(p, C, "--seed", dest="seed", type=int, help="seed of the shard assignment")
    _add(p, C, "--samples-per-shard", dest="samples_per_shard", type=int, help="images per shard")
    _add(p, C, "--read-threads", dest="read_threads", type=int, help="parallel reads of loose files")
    _add(
        p,
        C,
        "--parallel",
        dest="parallel",
        choices=["auto", "ray", "local"],
        help="read the source in Ray tasks (one per class tar / 1,024 files) or in this process",
    )
    _add(p, C, "--strict", dest="strict", action="store_true", help="fail (exit 1) if any input is rejected")
    _add(p, C, "--force", dest="force", action="store_true", help="redo even if nothing changed")
    p.set_defaults(config=C, module="index")

    C = config.ShardConfig
    p = sub.add_parser("shard", help="index -> webdataset shards (one task per shard, on Ray or local processes)")
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset ROOT")
    _add(p, C, "--split", dest="split", choices=["train", "val", "all"], help="which split")
    _add(p, C, "--resize", dest="resize", type=int, help="shorter side in px")
    _add(
        p,
        C,
        "--keep-aspect",
        dest="keep_aspect",
        action="store_true",
        help="keep the whole image (shorter side = --resize) instead of the central square crop",
    )
    _add(p, C, "--quality", dest="quality", type=int, help="JPEG quality")
    _add(
        p,
        C,
        "--read-threads",
        dest="read_threads",
        type=int,
        help="source reads in flight per shard task (merged ranged GETs on S3)",
    )
    _add(p, C, "--samples-per-shard", dest="samples_per_shard", type=int, help="regroup; default: the index's grouping")
    _add(
        p,
        C,
        "--parallel",
        dest="parallel",
        choices=["auto", "ray", "local"],
        help="run the shard tasks on Ray or in a pool of this machine's processes; auto: Ray on a "
        "cluster (RAY_ADDRESS) or for over 4 GB of source, else local processes (no Ray start-up)",
    )
    _add(p, C, "--strict", dest="strict", action="store_true", help="fail (exit 1) if any input is rejected")
    _add(p, C, "--verify", dest="verify", action="store_true", help="re-checksum existing shards")
    _add(
        p,
        C,
        "--allow-stale",
        dest="allow_stale",
        action="store_true",
        help="go on when `status` calls an input stale (the run records that it did)",
    )
    p.set_defaults(config=C, module="shard")

    C = config.StatsConfig
    p = sub.add_parser("stats", help="training shards -> stats.json (mean, std, RGB eigen-decomposition)")
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset ROOT")
    _add(p, C, "--force", dest="force", action="store_true", help="recompute even if the shards are unchanged")
    _add(
        p,
        C,
        "--allow-stale",
        dest="allow_stale",
        action="store_true",
        help="go on when `status` calls an input stale (the run records that it did)",
    )
    _add(
        p,
        C,
        "--parallel",
        dest="parallel",
        choices=["auto", "ray", "local"],
        help="one task per shard on Ray or in a pool of this machine's processes; auto as for shard",
    )
    p.set_defaults(config=C, module="stats")

    C = config.StatusConfig
    p = sub.add_parser("status", help="each stage of a dataset: done, stale or missing")
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset ROOT")
    _add(
        p,
        C,
        "--verify",
        dest="verify",
        action="store_true",
        help="re-checksum every shard (reads them all): finds damage that kept a file's size",
    )
    _add(
        p,
        C,
        "--no-source-check",
        dest="check_source",
        action="store_false",
        help="do not re-list the source (faster on huge folders)",
    )
    p.set_defaults(config=C, module="status")

    C = config.TrainConfig
    p = sub.add_parser("train", help="the 2012 AlexNet on Ray Train workers, tracked in MLflow")
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset ROOT (shards, classes.json, stats.json)")
    _add(
        p,
        C,
        "--workers",
        dest="workers",
        type=_workers,
        help="data-parallel workers: N, or MIN-MAX for elastic training that goes on with fewer after a node loss",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--gpu",
        dest="gpu",
        action="store_const",
        const=True,
        default=_UNSET,
        help="train on GPUs (default: when the cluster has them)",
    )
    g.add_argument("--no-gpu", dest="gpu", action="store_const", const=False, default=_UNSET, help="train on CPUs")
    _add(p, C, "--epochs", dest="epochs", type=int, help="epochs")
    g = p.add_mutually_exclusive_group()
    _add(g, C, "--batch-size", dest="batch_size", type=int, help="global batch size")
    _add(
        g,
        C,
        "--batch-per-worker",
        dest="batch_per_worker",
        type=int,
        help="batch per worker: sets the global batch to N x workers (x MAX of an elastic MIN-MAX)",
    )
    _add(p, C, "--crop", dest="crop", type=int, help="training crop in px")
    _add(p, C, "--lr", dest="lr", type=float, help="initial learning rate")
    _add(p, C, "--momentum", dest="momentum", type=float, help="SGD momentum")
    _add(p, C, "--weight-decay", dest="weight_decay", type=float, help="weight decay")
    _add(p, C, "--schedule", dest="schedule", choices=["plateau", "step", "cosine"], help="lr schedule")
    _add(p, C, "--patience", dest="patience", type=int, help="plateau: epochs without improvement")
    _add(p, C, "--step-size", dest="step_size", type=int, help="step: epochs between lr / 10")
    _add(p, C, "--arch", dest="arch", choices=["alexnet2012", "alexnet-torchvision"], help="network")
    _add(p, C, "--init", dest="init", choices=["paper", "kaiming"], help="weight initialisation")
    _add(p, C, "--lighting", dest="lighting", type=float, help="PCA lighting alpha std (0 turns it off)")
    _add(p, C, "--seed", dest="seed", type=int, help="random seed")
    _add(p, C, "--name", dest="name", help="run name; rerunning a name resumes it")
    _add(p, C, "--experiment", dest="experiment", help="MLflow experiment")
    _add(p, C, "--storage", dest="storage", help="where checkpoints go (default: ROOT/runs)")
    _add(p, C, "--keep-checkpoints", dest="keep_checkpoints", type=int, help="best checkpoints kept")
    _add(p, C, "--max-failures", dest="max_failures", type=int, help="worker restarts allowed")
    _add(p, C, "--loader-workers", dest="loader_workers", type=int, help="data loader processes per worker")
    _add(p, C, "--shuffle-buffer", dest="shuffle_buffer", type=int, help="shuffle buffer in samples")
    _add(
        p,
        C,
        "--checkpoint-every",
        dest="checkpoint_every",
        type=int,
        help="steps between mid-epoch checkpoints (default: measured, about every "
        f"{_default(C, 'checkpoint_interval_s'):.0f} s)",
    )
    _add(
        p,
        C,
        "--progress-every",
        dest="progress_every",
        type=int,
        help="steps between progress lines inside an epoch (default: a tenth of an epoch)",
    )
    _add(p, C, "--ledger", dest="ledger", help="debug: a local folder where each rank records the keys of every step")
    _add(
        p,
        C,
        "--decode",
        dest="decode",
        choices=["auto", "worker", "device"],
        help="where JPEGs are decoded: device = in one batched call on the training device (nvjpeg "
        "on a GPU), worker = in the loader processes, auto = device on a GPU, else worker",
    )
    r = p.add_argument_group("throughput on many GPUs (the defaults are the paper's recipe)")
    _add(
        r,
        C,
        "--amp",
        dest="amp",
        choices=["auto", "bf16", "fp16", "off"],
        help="autocast: auto = bf16 on a GPU, off on CPUs; fp16 adds loss scaling (GPU only)",
    )
    _add(
        r,
        C,
        "--compile",
        dest="compile",
        action="store_const",
        const=True,
        help="torch.compile the network (compiles for minutes at start, then faster steps)",
    )
    g = r.add_mutually_exclusive_group()
    g.add_argument(
        "--channels-last",
        dest="channels_last",
        action="store_const",
        const=True,
        default=_UNSET,
        help="images and weights in NHWC memory order (default: on GPUs)",
    )
    g.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_const",
        const=False,
        default=_UNSET,
        help="keep PyTorch's NCHW order",
    )
    _add(
        r,
        C,
        "--lr-scaling",
        dest="lr_scaling",
        choices=["none", "linear"],
        help="linear: lr = --lr x global batch / --lr-reference-batch (Goyal et al. 2017)",
    )
    _add(r, C, "--lr-reference-batch", dest="lr_reference_batch", type=int, help="the batch --lr was set for")
    _add(
        r,
        C,
        "--warmup-epochs",
        dest="warmup_epochs",
        type=int,
        help="the lr rises linearly, step by step, to its peak over the first N epochs",
    )
    _add(
        r,
        C,
        "--warmup-start",
        dest="warmup_start",
        type=float,
        help="the first step's fraction of the peak lr (default: --lr / peak when --lr-scaling raised it, else 0.1)",
    )
    _add(
        r,
        C,
        "--grad-compression",
        dest="grad_compression",
        choices=["none", "bf16", "fp16"],
        help="all-reduce the gradients in half precision: half the bytes between workers",
    )
    _add(
        r,
        C,
        "--cpus-per-worker",
        dest="cpus_per_worker",
        type=float,
        help="CPUs each training worker reserves (default: on GPUs, each GPU node's CPUs per GPU, at most "
        f"{_default(C, 'max_cpus_per_worker'):g}; on CPUs, the cluster's CPUs shared among the workers)",
    )
    _add(
        p,
        C,
        "--register",
        dest="register",
        help="register the model (the best epoch's, by val_top1) under this name in the MLflow registry",
    )
    _add(p, C, "--alias", dest="alias", help="with --register: the alias moved to the new version")
    _add(
        p,
        C,
        "--allow-stale",
        dest="allow_stale",
        action="store_true",
        help="train on shards or stats `status` calls stale, or on val shards made unlike the train shards "
        "(the run records that it did)",
    )
    p.set_defaults(config=C, module="train")

    C = config.EvaluateConfig
    p = sub.add_parser("evaluate", help="a checkpoint on the val shards: top-1 / top-5")
    p.add_argument("--data", required=True, metavar="ROOT", help="dataset ROOT")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-id", dest="run_id", default=_UNSET, help="MLflow run id of a training run")
    g.add_argument("--checkpoint", dest="checkpoint", default=_UNSET, help="checkpoint folder (holds state.pt)")
    _add(p, C, "--ten-crop", dest="ten_crop", action="store_true", help="the paper's 10-crop test")
    _add(p, C, "--batch-size", dest="batch_size", type=int, help="images per batch")
    _add(p, C, "--loader-workers", dest="loader_workers", type=int, help="data loader processes")
    _add(
        p,
        C,
        "--allow-stale",
        dest="allow_stale",
        action="store_true",
        help="evaluate on val shards `status` calls stale, or made unlike the model's training shards "
        "(the evaluation records that it did)",
    )
    p.set_defaults(config=C, module="evaluate")

    C = config.PredictConfig
    p = sub.add_parser("predict", help="images -> their top 5 classes, with a logged or registered model")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--model",
        dest="model",
        default=_UNSET,
        metavar="URI",
        help="a model URI: models:/NAME@ALIAS (e.g. models:/alexnet-demo@champion), models:/NAME/VERSION",
    )
    g.add_argument("--run-id", dest="run_id", default=_UNSET, metavar="ID", help="a training run: its logged model")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG), local or s3://")
    p.set_defaults(config=C, module="predict")

    C = config.SubmitConfig
    p = sub.add_parser("submit", help="run a stage as a Ray job on a cluster and follow it")
    _add(p, C, "--address", dest="address", help="Ray dashboard address, http://HEAD:8265 (default: RAY_ADDRESS)")
    _add(p, C, "--no-wait", dest="wait", action="store_false", help="return once the job is submitted")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--list", dest="list", action="store_true", default=_UNSET, help="list the cluster's jobs")
    g.add_argument("--logs", dest="logs", default=_UNSET, metavar="JOB_ID", help="print a job's logs")
    g.add_argument("--stop", dest="stop", default=_UNSET, metavar="JOB_ID", help="stop a job")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- <stage> <args...>")
    p.set_defaults(config=C, module="submit")

    p = sub.add_parser("demo", help="sample data -> index -> shard -> stats -> train -> evaluate, all tracked")
    p.add_argument("--out", default="demo", metavar="DIR", help="folder for the demo's data (default: demo)")
    p.set_defaults(config=None, module="demo")


DESCRIPTION = """\
AlexNet (Krizhevsky, Sutskever and Hinton, 2012) on ImageNet: Ray jobs turn ImageNet as you hold
it into webdataset shards, Ray Train workers train the paper's network on them, and every stage
is a run in MLflow. Each stage reads and writes files under a dataset ROOT (a folder or
s3://bucket/prefix) and ends with one JSON line on stdout.

  index -> shard -> stats -> train -> evaluate      (status shows where a ROOT stands)

exit codes: 0 done, 1 --strict and inputs were rejected, 2 a usage or input error."""

EXAMPLES = {
    "sample": "python -m pipelines sample --out /tmp/sample --classes 10",
    "index": "python -m pipelines index --source /data/imagenet --data /data/alexnet\n"
    "  python -m pipelines index --source s3://bucket/ilsvrc2012 --data s3://bucket/alexnet --classes 100",
    "shard": "python -m pipelines shard --data /data/alexnet            # 256x256 q90, as the paper\n"
    "  python -m pipelines shard --data /data/alexnet --split val --verify",
    "stats": "python -m pipelines stats --data /data/alexnet",
    "status": "python -m pipelines status --data /data/alexnet 2>/dev/null | jq .states",
    "train": "python -m pipelines train --data /data/alexnet --gpu --workers 8 --name run1\n"
    "  python -m pipelines train --data /data/alexnet --gpu --workers 4-8 --name run1   # elastic",
    "evaluate": "python -m pipelines evaluate --data /data/alexnet --run-id RUN_ID --ten-crop",
    "submit": "python -m pipelines submit -- shard --data s3://bucket/alexnet\n  python -m pipelines submit --list",
    "demo": "python -m pipelines demo --out demo",
    "predict": "python -m pipelines predict --model models:/alexnet-demo@champion photo.jpg",
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`python -m pipelines STAGE --help` describes each stage.",
    )
    ap.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False,
        help="print only the final JSON line (and errors): no progress, no worker lines",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="STAGE")
    add_parser = sub.add_parser

    def described(name, help, **kw):  # each stage: its one-line help as description, an example
        return add_parser(
            name,
            help=help,
            description=help[:1].upper() + help[1:] + ".",
            epilog="example:\n  " + EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    sub.add_parser = described
    _stage_parsers(sub)
    return ap


def main(argv=None) -> int:
    import importlib

    args = vars(parser().parse_args(argv))
    errors = sys.stderr  # errors always reach the user, --quiet or not
    if args.pop("quiet", False):
        # Only the JSON line: progress, tables and the workers' lines (Ray sends them to this
        # process's stderr) go nowhere; a failure's message still comes.
        os.environ["PIPELINES_QUIET"] = "1"
        sys.stderr = open(os.devnull, "w")
    cls, module = args.pop("config"), importlib.import_module(f"pipelines.{args.pop('module')}")
    args.pop("command")
    if isinstance(args.get("workers"), tuple):  # train --workers MIN-MAX
        args["min_workers"], args["workers"] = args["workers"]
    if args.get("imagenet"):  # sample --imagenet: the real class count and val size, unless given
        args.setdefault("classes", 1000)
        args.setdefault("val_per_class", 50)
    if "images" in args:  # predict
        args["images"] = tuple(args["images"])
    if "args" in args:  # submit: everything after '--', as a tuple
        args["args"] = tuple(a for i, a in enumerate(args["args"]) if not (i == 0 and a == "--"))
    stage = module.__name__.rsplit(".", 1)[-1]
    try:
        cfg = cls(**args) if cls else args
        # A wrong or dead RAY_ADDRESS is named now, not after a run began (index and evaluate
        # run in this process unless RAY_ADDRESS names a cluster's Ray: they need no check).
        if stage in RAY_STAGES or (stage == "index" and cfg.parallel == "ray"):
            from .cluster import ray_address

            ray_address()
        if hasattr(module, "check"):  # flags and paths, before any MLflow run or store exists
            module.check(cfg)
        if hasattr(module, "warm_start"):  # the stage's local workers start while MLflow does
            module.warm_start(cfg)
        if stage in TRACKED:  # each preprocessing run is an MLflow run of its own (experiment 'preprocessing')
            from . import tracking

            tracking.check_reachable()  # before any work: a dead server is reported up front
            summary = tracking.track_stage(stage, cfg, module.run)
        else:
            summary = module.run(cfg)
    except StrictFailure as e:
        print(json.dumps(e.summary), flush=True)
        print(f"error: {e}", file=errors)
        return 1
    except StageError as e:
        print(f"error: {e}", file=errors)
        return 2
    if stage == "status":  # the table for people on stderr; stdout stays one JSON line for scripts
        print(module.format_table(summary), file=sys.stderr)
    print(json.dumps(summary), flush=True)
    # The interpreter's last garbage collection walks every object MLflow, Ray and torch made:
    # about a second on 2 cores, for memory the process gives back anyway. Frozen objects are skipped.
    import gc

    gc.freeze()
    return int(summary.get("exit_code", 0))  # submit: the job's own exit code
