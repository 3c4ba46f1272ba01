"""``python -m pipelines <stage> ...``: argparse subcommands only.

Each subcommand builds its stage's config from the flags given (defaults live in config.py),
calls ``<stage>.run(cfg)``, and prints the returned summary as one final JSON line.
Exit codes: 0 done, 1 ``--strict`` and inputs were rejected, 2 a usage or input error.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from . import config
from .common import StageError, StrictFailure

_UNSET = argparse.SUPPRESS  # flags not given stay out of the config, so config.py's defaults win


def _default(cls, name):
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def _add(p, cls, *flags, dest, help, **kw):
    kw.setdefault("default", _UNSET)
    if "action" not in kw or kw["action"] not in ("store_true", "store_false"):
        help = f"{help} (default: {_default(cls, dest)})" if _default(cls, dest) is not dataclasses.MISSING else help
    p.add_argument(*flags, dest=dest, help=help, **kw)


def _stage_parsers(sub):
    from .sample import SampleConfig, parse_size

    p = sub.add_parser("sample", help="write a small ImageNet-format dataset in all three layouts")
    p.add_argument("--out", required=True, help="output folder")
    _add(p, SampleConfig, "--classes", dest="classes", type=int, help="number of classes")
    _add(p, SampleConfig, "--train-per-class", dest="train_per_class", type=int, help="train images per class")
    _add(p, SampleConfig, "--val-per-class", dest="val_per_class", type=int, help="val images per class")
    _add(p, SampleConfig, "--size", dest="size", type=parse_size, help="nominal image size WxH")
    _add(p, SampleConfig, "--seed", dest="seed", type=int, help="random seed")
    _add(p, SampleConfig, "--bad", dest="bad", action="store_true",
         help="also write damaged files (truncated, empty, not an image)")
    p.set_defaults(config=SampleConfig, module="sample")

    C = config.IndexConfig
    p = sub.add_parser("index", help="source -> classes.json + index/{train,val}.parquet")
    p.add_argument("--source", required=True, help="ImageNet folder: original tarballs, Kaggle or train/<wnid>/")
    p.add_argument("--data", required=True, help="dataset ROOT to write")
    _add(p, C, "--layout", dest="layout", choices=["ilsvrc-tar", "kaggle", "folder"], help="skip detection")
    _add(p, C, "--classes", dest="classes", type=int, help="keep the first N classes (sorted WNIDs)")
    _add(p, C, "--limit", dest="limit", type=int, help="at most N images per class and split")
    _add(p, C, "--seed", dest="seed", type=int, help="seed of the shard assignment")
    _add(p, C, "--samples-per-shard", dest="samples_per_shard", type=int, help="images per shard")
    _add(p, C, "--read-threads", dest="read_threads", type=int, help="parallel reads of loose files")
    _add(p, C, "--strict", dest="strict", action="store_true", help="fail (exit 1) if any input is rejected")
    _add(p, C, "--force", dest="force", action="store_true", help="redo even if nothing changed")
    p.set_defaults(config=C, module="index")

    C = config.ShardConfig
    p = sub.add_parser("shard", help="index -> webdataset shards (one Ray task per shard)")
    p.add_argument("--data", required=True, help="dataset ROOT")
    _add(p, C, "--split", dest="split", choices=["train", "val", "all"], help="which split")
    _add(p, C, "--resize", dest="resize", type=int, help="shorter side in px")
    _add(p, C, "--keep-aspect", dest="keep_aspect", action="store_true",
         help="keep the whole image (shorter side = --resize) instead of the central square crop")
    _add(p, C, "--quality", dest="quality", type=int, help="JPEG quality")
    _add(p, C, "--samples-per-shard", dest="samples_per_shard", type=int,
         help="regroup; default: the index's grouping")
    _add(p, C, "--strict", dest="strict", action="store_true", help="fail (exit 1) if any input is rejected")
    _add(p, C, "--verify", dest="verify", action="store_true", help="re-checksum existing shards")
    p.set_defaults(config=C, module="shard")

    C = config.StatsConfig
    p = sub.add_parser("stats", help="training shards -> stats.json (mean, std, RGB eigen-decomposition)")
    p.add_argument("--data", required=True, help="dataset ROOT")
    _add(p, C, "--force", dest="force", action="store_true", help="recompute even if the shards are unchanged")
    p.set_defaults(config=C, module="stats")

    C = config.StatusConfig
    p = sub.add_parser("status", help="each stage of a dataset: done, stale or missing")
    p.add_argument("--data", required=True, help="dataset ROOT")
    _add(p, C, "--no-source-check", dest="check_source", action="store_false",
         help="do not re-list the source (faster on huge folders)")
    p.set_defaults(config=C, module="status")

    p = sub.add_parser("demo", help="sample data -> index -> shard -> stats -> status")
    p.add_argument("--out", default="demo", help="folder for the demo's data (default: demo)")
    p.set_defaults(config=None, module="demo")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="STAGE")
    _stage_parsers(sub)
    return ap


def main(argv=None) -> int:
    import importlib

    args = vars(parser().parse_args(argv))
    cls, module = args.pop("config"), importlib.import_module(f"pipelines.{args.pop('module')}")
    args.pop("command")
    try:
        summary = module.run(cls(**args) if cls else args)
    except StrictFailure as e:
        print(json.dumps(e.summary), flush=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if module.__name__ == "pipelines.status":
        print(module.format_table(summary))
    print(json.dumps(summary), flush=True)
    return 0
