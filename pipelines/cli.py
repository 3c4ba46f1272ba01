"""``python -m pipelines <stage> ...``: argparse subcommands only.

Each subcommand builds its stage's config from the flags given (defaults live in config.py),
calls ``<stage>.run(cfg)``, and prints the returned summary as one final JSON line.
Exit codes: 0 done, 1 ``--strict`` and inputs were rejected, 2 a usage or input error, 130
interrupted (Ctrl-C or SIGTERM: what was finished is kept, and the same command goes on).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

from . import config
from .errors import StageError, StrictFailure

TRACKED = ("index", "shard", "stats")
RAY_STAGES = ("shard", "stats", "prepare", "train", "sweep", "demo")
_UNSET = argparse.SUPPRESS  # flags not given stay out of the config, so config.py's defaults win


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


PARSERS = {"workers": _workers, "size": _size, "list": lambda t: tuple(x.strip() for x in t.split(",") if x.strip())}
TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def add_flags(p: argparse.ArgumentParser, cls, skip=(), group: str | None = None) -> None:
    """The flags of config class ``cls`` (its fields declared with config.flag), in field order;
    not those named in ``skip``; those of no section of their own in section ``group``."""
    sections, exclusive = {}, {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "help" not in m or f.name in skip:
            continue
        where = p
        if "group" in m or group:
            name = m.get("group", group)
            where = sections.setdefault(name, p.add_argument_group(name))
        if "one_of" in m:
            if m["one_of"] not in exclusive:
                exclusive[m["one_of"]] = where.add_mutually_exclusive_group(required=m.get("required", False))
            where = exclusive[m["one_of"]]
        _add_field(where, f, m["help"].format(**defaults))


def _shown(default) -> str:
    """A default as a user would type it: 160x120 for a size, tarballs,kaggle for a list."""
    if isinstance(default, tuple):
        return ("x" if all(isinstance(v, int) for v in default) else ",").join(map(str, default))
    return str(default)


def _add_field(where, f: dataclasses.Field, help: str) -> None:
    """One field's flag (or positional argument), as its metadata and type describe it."""
    m, kind = f.metadata, TYPES.get(str(f.type).split("|")[0].strip())
    if "nargs" in m:
        where.add_argument(f.name, nargs=m["nargs"], metavar=m.get("metavar"), help=help)
        return
    names = m.get("flags") or ("--" + f.name.replace("_", "-"),)
    if kind is bool and "off" in m:  # None unless given: --NAME or --no-NAME
        g = where.add_mutually_exclusive_group()
        g.add_argument(*names, dest=f.name, action="store_const", const=True, default=_UNSET, help=help)
        off = "--no-" + names[0].removeprefix("--")
        g.add_argument(off, dest=f.name, action="store_const", const=False, default=_UNSET, help=m["off"])
        return
    if kind is bool:
        action = "store_false" if f.default else "store_true"
        where.add_argument(*names, dest=f.name, action=action, default=_UNSET, help=help)
        return
    kw = {"dest": f.name, "default": _UNSET}
    if f.default is dataclasses.MISSING:
        kw.update(required=True)
    elif f.default is not None and "default:" not in help:  # the default that is really used, once
        help = f"{help} (default: {_shown(f.default)})"
    if "choices" in m:
        kw.update(choices=m["choices"])
    else:
        kw.update(metavar=m.get("metavar") or {int: "N", float: "X"}.get(kind, f.name.upper()))
    parse = PARSERS[m["parse"]] if "parse" in m else kind if kind in (int, float) else None
    if parse is not None:
        kw.update(type=parse)
    where.add_argument(*names, help=help, **kw)


STAGES = {  # each stage's config class and its one-line help, in the order --help lists them
    "sample": (config.SampleConfig, "write a small ImageNet-format dataset in all three layouts"),
    "index": (config.IndexConfig, "source -> classes.json + index/{train,val}.parquet"),
    "shard": (config.ShardConfig, "index -> webdataset shards (one task per shard, on Ray or local processes)"),
    "stats": (config.StatsConfig, "training shards -> stats.json (mean, std, RGB eigen-decomposition)"),
    "prepare": (config.PrepareConfig, "index, shard and stats in one process, each its own MLflow run under one"),
    "status": (config.StatusConfig, "each stage of a dataset: done, stale or missing"),
    "train": (config.TrainConfig, "the 2012 AlexNet on Ray Train workers, tracked in MLflow"),
    "evaluate": (config.EvaluateConfig, "a checkpoint on the val shards: top-1 / top-5"),
    "sweep": (config.SweepConfig, "Ray Tune over train: trials nested under one MLflow run, ASHA early stopping"),
    "predict": (config.PredictConfig, "images -> their top 5 classes, with a logged or registered model"),
    "submit": (config.SubmitConfig, "run a stage as a Ray job on a cluster and follow it"),
}


def _stage_parsers(sub):
    for name, (cls, help) in STAGES.items():
        p = sub.add_parser(name, help=help)
        add_flags(p, cls)
        if cls is config.SweepConfig:  # every train flag, for what is not searched
            own = {f.name for f in dataclasses.fields(cls)}
            add_flags(p, config.TrainConfig, skip=own, group="every trial's training (as train's flags)")
        p.set_defaults(config=cls, module=name)
    p = sub.add_parser("demo", help="sample data -> index -> shard -> stats -> train -> evaluate, all tracked")
    p.add_argument("--out", default="demo", metavar="DIR", help="folder for the demo's data (default: demo)")
    p.set_defaults(config=None, module="demo")


DESCRIPTION = """\
AlexNet (Krizhevsky, Sutskever and Hinton, 2012) on ImageNet: Ray jobs turn ImageNet as you hold
it into webdataset shards, Ray Train workers train the paper's network on them, and every stage
is a run in MLflow. Each stage reads and writes files under a dataset ROOT (a folder or
s3://bucket/prefix) and ends with one JSON line on stdout.

  index -> shard -> stats -> train -> evaluate      (status shows where a ROOT stands)
  prepare = index -> shard -> stats, in one process
  sweep = train over a search space, with Ray Tune

exit codes: 0 done, 1 --strict and inputs were rejected, 2 a usage or input error, 130 interrupted."""

EXAMPLES = {
    "sample": "python -m pipelines sample --out /tmp/sample --classes 10",
    "index": "python -m pipelines index --source /data/imagenet --data /data/alexnet\n"
    "  python -m pipelines index --source s3://bucket/ilsvrc2012 --data s3://bucket/alexnet --classes 100",
    "shard": "python -m pipelines shard --data /data/alexnet            # 256x256 q90, as the paper\n"
    "  python -m pipelines shard --data /data/alexnet --split val --verify",
    "stats": "python -m pipelines stats --data /data/alexnet",
    "prepare": "python -m pipelines prepare --source /data/imagenet --data /data/alexnet\n"
    "  python -m pipelines prepare --source /data/imagenet --data /tmp/small --classes 100 --resize 144",
    "status": "python -m pipelines status --data /data/alexnet 2>/dev/null | jq .states",
    "train": "python -m pipelines train --data /data/alexnet --gpu --workers 8 --name run1\n"
    "  python -m pipelines train --data /data/alexnet --gpu --workers 4-8 --name run1   # elastic",
    "evaluate": "python -m pipelines evaluate --data /data/alexnet --run-id RUN_ID --ten-crop",
    "submit": "python -m pipelines submit -- shard --data s3://bucket/alexnet\n  python -m pipelines submit --list\n"
    "  python -m pipelines submit --follow JOB_ID",
    "demo": "python -m pipelines demo --out demo",
    "predict": "python -m pipelines predict --model models:/alexnet-demo@champion photo.jpg\n"
    "  python -m pipelines predict --model models:/alexnet@champion --source s3://photos/ --out s3://labels/photos/",
    "sweep": "python -m pipelines sweep --data /data/alexnet --name lr-wd --lr log:0.001:0.05 "
    "--weight-decay 0,0.0005 --trials 8 --epochs 30 --gpu --workers 4\n"
    "  python -m pipelines sweep --data /data/alexnet --name lr-wd ...   # the same command resumes it",
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


# What an interrupted stage leaves, for the one line it prints (a stage may say more itself)
INTERRUPTED = {
    "": "what was finished is kept; the same command goes on from there.",
    "train": "the run keeps its checkpoints; the same command (same --name) resumes from the last one.",
    "sweep": "the trials keep their checkpoints; the same command (same --name) resumes the sweep.",
    "demo": "what was finished is kept; `make demo` goes on from there.",
    "submit": "",  # submit says itself whether the job goes on
}


def _stop_on_sigterm() -> None:
    """SIGTERM (a cluster stopping a job, `kill`) stops a stage as Ctrl-C does: cleanly."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)


def _shape(args: dict, cls=None) -> None:
    """The parsed flags in the shape the config fields take."""
    if isinstance(args.get("workers"), tuple):  # train --workers MIN-MAX
        args["min_workers"], args["workers"] = args["workers"]
    if args.get("imagenet"):  # sample --imagenet: the real class count and val size, unless given
        args.setdefault("classes", 1000)
        args.setdefault("val_per_class", 50)
    if "images" in args:  # predict
        args["images"] = tuple(args["images"])
    if "args" in args:  # submit: everything after '--', as a tuple
        args["args"] = tuple(a for i, a in enumerate(args["args"]) if not (i == 0 and a == "--"))
    if cls is config.SweepConfig:  # the train flags given, as one field
        own = {f.name for f in dataclasses.fields(cls)}
        args["train"] = {k: args.pop(k) for k in list(args) if k not in own}


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
    _shape(args, cls)
    stage = module.__name__.rsplit(".", 1)[-1]
    _stop_on_sigterm()
    try:
        cfg = cls(**args) if cls else args
        # A wrong or dead RAY_ADDRESS is named now, not after a run began (index and evaluate
        # run in this process unless RAY_ADDRESS names a cluster's Ray: they need no check).
        if stage in RAY_STAGES or (stage == "index" and cfg.parallel == "ray") or (stage == "predict" and cfg.source):
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
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM from a cluster stopping the job
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C while Ray and MLflow close: at once
        said = [str(e)] if str(e) else []  # the signal, or what the stage had done
        said += [INTERRUPTED.get(stage, INTERRUPTED[""])]
        print(f"{stage}: interrupted: {'; '.join(x for x in said if x)}", file=errors, flush=True)
        return 130
    if stage == "status":  # the table for people on stderr; stdout stays one JSON line for scripts
        print(module.format_table(summary), file=sys.stderr)
    print(json.dumps(summary), flush=True)
    # The interpreter's last garbage collection walks every object MLflow, Ray and torch made:
    # about a second on 2 cores, for memory the process gives back anyway. Frozen objects are skipped.
    import gc

    gc.freeze()
    return int(summary.get("exit_code", 0))  # submit: the job's own exit code
