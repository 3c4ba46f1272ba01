"""One frozen dataclass per stage: the single home of every default, each with its reason.

The CLI passes only the flags a user gave; everything else comes from here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IndexConfig:
    source: str                  # ImageNet as the user holds it: tarballs, Kaggle or folders
    data: str                    # dataset ROOT that every later stage reads and writes
    layout: str | None = None    # None: detect from the files (sources.detect)
    classes: int | None = None   # first N classes in sorted-WNID order, for small runs
    limit: int | None = None     # at most N images per class and split, for small runs
    seed: int = 0                # fixes which shard each image goes to
    samples_per_shard: int = 4096  # ~100 MB shards at 256 px q90: sequential reads, >= 300 train shards to spread
    strict: bool = False         # any rejected input fails the stage (after writing its outputs)
    force: bool = False          # redo even when the source and parameters are unchanged
    read_threads: int = 16       # hashing loose files is I/O-bound; threads overlap the reads


@dataclass(frozen=True)
class ShardConfig:
    data: str
    split: str = "all"           # train, val or all
    resize: int = 256            # paper section 2: shorter side to 256, then the central 256x256
    keep_aspect: bool = False    # keep the whole image (shorter side = resize) instead of the paper's crop
    quality: int = 90            # JPEG quality: visually lossless at 256 px, ~30 KB an image
    samples_per_shard: int | None = None  # None: the grouping the index stage chose
    strict: bool = False
    verify: bool = False         # re-checksum existing shards instead of trusting size (slow)
    num_cpus: float = 1.0        # per shard task: decode/resize/encode is one core's work


@dataclass(frozen=True)
class StatsConfig:
    data: str
    force: bool = False
    num_cpus: float = 1.0


@dataclass(frozen=True)
class StatusConfig:
    data: str
    check_source: bool = True    # re-list the source to see if the index is stale (slow on huge folders)


SPLITS = ("train", "val")
