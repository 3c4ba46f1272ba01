"""One frozen dataclass per stage: the single home of every default, each with its reason.

The CLI passes only the flags a user gave; everything else comes from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleConfig:
    out: str  # output directory (local path)
    classes: int = 10  # enough for a visible learning curve, small enough to build in seconds
    train_per_class: int = 60  # a small AlexNet learns these patterns from ~60 images in a few epochs
    val_per_class: int = 10  # 100 val images: accuracy in 1% steps
    size: tuple[int, int] = (160, 120)  # nominal W x H; real images vary, so each varies +-25%
    seed: int = 0  # every byte written is a function of the seed
    bad: bool = False  # also write damaged files, to test that readers report, not crash
    # ILSVRC-2012's shape: 1,000 classes and the devkit's full synset tree (1,000 leaves and 860
    # WordNet nodes above them, 1,860 synsets), so scale is measured on the real class count.
    imagenet: bool = False
    layouts: tuple[str, ...] = ("tarballs", "kaggle", "folders")  # which of the three to write
    # Processes encoding the images: each starts in ~1 s, so one is quickest for the demo's 700
    # images; the GPU check's tens of thousands of 256 px images want every core.
    workers: int = 1


# Below this much source data a stage run on one machine skips starting a local Ray (~7 s of
# start-up and shut-down on 2 cores, more than hashing ~4 GB or sharding ~2,000 images takes).
RAY_MIN_BYTES = 4 << 30


@dataclass(frozen=True)
class IndexConfig:
    source: str  # ImageNet as the user holds it: tarballs, Kaggle or folders
    data: str  # dataset ROOT that every later stage reads and writes
    layout: str | None = None  # None: detect from the files (sources.detect)
    classes: int | None = None  # first N classes in sorted-WNID order, for small runs
    limit: int | None = None  # at most N images per class and split, for small runs
    seed: int = 0  # fixes which shard each image goes to
    samples_per_shard: int = 4096  # ~100 MB shards at 256 px q90: sequential reads, >= 300 train shards to spread
    strict: bool = False  # any rejected input fails the stage (after writing its outputs)
    force: bool = False  # redo even when the source and parameters are unchanged
    read_threads: int = 16  # hashing loose files is I/O-bound; threads overlap the reads
    parallel: str = "auto"  # ray: one Ray task per class tar / 1,024 loose files; local: this process;
    #                              auto: ray on a cluster (RAY_ADDRESS) or for sources over ray_min_bytes
    ray_min_bytes: int = RAY_MIN_BYTES


@dataclass(frozen=True)
class ShardConfig:
    data: str
    split: str = "all"  # train, val or all
    resize: int = 256  # paper section 2: shorter side to 256, then the central 256x256
    keep_aspect: bool = False  # keep the whole image (shorter side = resize) instead of the paper's crop
    quality: int = 90  # JPEG quality: visually lossless at 256 px, ~30 KB an image
    samples_per_shard: int | None = None  # None: the grouping the index stage chose
    strict: bool = False
    verify: bool = False  # re-checksum existing shards instead of trusting size (slow)
    allow_stale: bool = False  # read inputs `status` calls stale (the run records that it did)
    num_cpus: float = 1.0  # per shard task: decode/resize/encode is one core's work
    read_threads: int = 8  # ranged reads in flight per task: S3 latency overlaps the decoding
    parallel: str = "auto"  # ray: one Ray task per shard; local: a pool of this machine's processes;
    #                              auto: ray on a cluster (RAY_ADDRESS), inside a running Ray, or for
    #                              sources over ray_min_bytes; else local
    ray_min_bytes: int = RAY_MIN_BYTES


@dataclass(frozen=True)
class StatsConfig:
    data: str
    force: bool = False
    allow_stale: bool = False  # read inputs `status` calls stale (the run records that it did)
    num_cpus: float = 1.0
    parallel: str = "auto"  # as ShardConfig's: Ray, or this machine's processes for small data
    ray_min_bytes: int = RAY_MIN_BYTES


@dataclass(frozen=True)
class StatusConfig:
    data: str
    check_source: bool = True  # re-list the source to see if the index is stale (slow on huge folders)
    verify: bool = False  # re-checksum every shard: catches damage that keeps a file's size (reads them all)


SPLITS = ("train", "val")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    workers: int = 2  # Ray Train data-parallel workers (the paper trained on 2 GPUs)
    min_workers: int | None = None  # --workers MIN-MAX: elastic, go on with as few as MIN after a node loss
    gpu: bool | None = None  # None: use GPUs when the cluster has them
    epochs: int = 90  # paper section 5: "roughly 90 cycles"
    batch_size: int = 128  # global batch, split across workers (section 5)
    crop: int = 224  # random 224x224 patches of the 256x256 images (section 4.1)
    lr: float = 0.01  # section 5
    momentum: float = 0.9  # section 5
    weight_decay: float = 5e-4  # section 5
    schedule: str = "plateau"  # section 5: lr / 10 when the validation error stops improving
    patience: int = 2  # plateau: epochs without a better val error before dividing lr by 10
    step_size: int = 30  # step: lr / 10 every 30 epochs (torchvision's reference recipe)
    min_lr: float = 1e-5  # the paper divided 0.01 by 10 three times, then stopped
    arch: str = "alexnet2012"  # the paper's two-tower net; alexnet-torchvision for comparison
    init: str = "paper"  # section 5; 'kaiming' learns on small data (see model/__init__.py)
    lighting: float = 0.1  # PCA colour augmentation alpha std (section 4.1)
    seed: int = 0  # weights, shard order, shuffle buffers and crops
    name: str | None = None  # the run's name; rerunning a name resumes it (default: a timestamp)
    experiment: str = "alexnet"  # MLflow experiment
    storage: str | None = None  # checkpoints: default ROOT/runs
    keep_checkpoints: int = 2  # the best by val_top1 (Ray also keeps the latest, for resuming)
    max_failures: int = 3  # worker restarts from the last checkpoint before the run fails
    loader_workers: int | None = None  # per training worker; None: the worker's CPUs with a GPU, 1 on CPU
    shuffle_buffer: int = 2000  # samples a loader worker shuffles among; ~60 MB of JPEG bytes at 256 px
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints; None: every ~checkpoint_interval_s
    progress_every: int | None = None  # steps between progress lines inside an epoch; None: a tenth of an epoch
    # 10 min: AlexNet's checkpoint (weights + momentum, ~0.5 GB) takes well under 30 s to write
    # to disk or S3, so under 5% of the time, and a preempted node loses at most 10 min of work.
    checkpoint_interval_s: float = 600.0
    ledger: str | None = None  # debug: a local folder where each rank records the sample keys of each step
    decode: str = "auto"  # JPEG decoding: auto = on the GPU (nvjpeg) when training on one, else worker
    # --- throughput on many GPUs (the paper's recipe is the defaults above; see README "Recipes") ---
    amp: str = "auto"  # autocast: auto = bf16 on a GPU (tensor cores, no loss scaling), off on CPUs
    compile: bool = False  # torch.compile the network: minutes of compilation, then faster steps
    channels_last: bool | None = None  # None: on GPUs, whose tensor-core convolutions read NHWC
    batch_per_worker: int | None = None  # sets the global batch to N x workers (x MAX of --workers MIN-MAX)
    lr_scaling: str = "none"  # linear: lr = --lr x batch / lr_reference_batch (Goyal et al. 2017)
    lr_reference_batch: int = 128  # the batch the paper's lr 0.01 was set for (section 5)
    warmup_epochs: int = 0  # the lr rises step by step to its peak over the first N epochs
    warmup_start: float | None = None  # fraction of the peak lr at the first step; None: see train.warmup_from
    grad_compression: str = "none"  # bf16 / fp16: DDP all-reduces gradients in half the bytes
    # CPUs reserved per training worker; None: on CPUs, the cluster's CPUs shared among the workers
    # (at most 8); on GPUs, the fewest CPUs per GPU of any GPU node (at most 8), so that a worker
    # fits one GPU's share of a 4-vCPU-per-GPU instance. The loader workers default to it on a GPU.
    cpus_per_worker: float | None = None
    max_cpus_per_worker: float = 8.0  # the defaults' cap: a GPU worker's loader decodes with up to 8 processes
    allow_stale: bool = False  # read inputs `status` calls stale (the run records that it did)
    register: str | None = None  # register the final model under this name in the registry
    alias: str = "champion"  # with --register: the registry alias moved to this run's model version


@dataclass(frozen=True)
class EvaluateConfig:
    data: str
    run_id: str | None = None  # the training run: its last checkpoint, metrics logged back to it
    checkpoint: str | None = None  # or a checkpoint folder (holding state.pt)
    ten_crop: bool = False  # section 4.1: 4 corners + centre, each mirrored, softmax averaged
    batch_size: int = 64
    loader_workers: int = 2
    gpu: bool | None = None  # None: a GPU when this process or the cluster has one
    allow_stale: bool = False  # read inputs `status` calls stale (the run records that it did)


@dataclass(frozen=True)
class SubmitConfig:
    args: tuple[str, ...] = ()  # the stage and its arguments, as after `python -m pipelines`
    address: str | None = None  # the dashboard's HTTP address; default RAY_ADDRESS
    wait: bool = True  # follow the logs and exit with the job's status
    list: bool = False
    logs: str | None = None
    stop: str | None = None


@dataclass(frozen=True)
class PredictConfig:
    images: tuple[str, ...]  # image files (JPEG, PNG), local or s3://
    model: str | None = None  # a model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model
    run_id: str | None = None  # or a training run: its logged model
