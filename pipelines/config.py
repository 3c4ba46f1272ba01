"""One frozen dataclass per stage: the single home of every default, each with its reason, and of
every command-line flag, declared on its field with ``flag(default, help, ...)``.

The CLI (pipelines/cli.py) is built from these fields: a field's name gives its flag
(``keep_aspect`` -> ``--keep-aspect``), its type how the value is read, its default what
``--help`` shows. The CLI passes only the flags a user gave; everything else comes from here.
Fields without ``flag`` are settings for code and tests, not for the command line.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field

SPLITS = ("train", "val")
PARALLEL = ("auto", "ray", "local")
# Below this much source data a stage run on one machine skips starting a local Ray (~7 s of
# start-up and shut-down on 2 cores, more than hashing ~4 GB or sharding ~2,000 images takes).
RAY_MIN_BYTES = 4 << 30
ALLOW_STALE = "go on when `status` calls an input stale (the run records that it did)"


def flag(default=MISSING, help: str = "", **cli):
    """A field that is also a command-line flag: its default and its help side by side. ``cli``
    holds what the name and type do not say: ``flags`` (the flag's names, default --field-name),
    ``choices``, ``metavar``, ``parse`` (a value parser the CLI names: workers, size, list),
    ``group`` (a section of --help), ``one_of`` (the mutually exclusive group it belongs to;
    ``required``: one of the group must be given), ``off`` (the help of --no-NAME, for a field
    that is None unless set either way) and ``nargs`` (a positional argument). ``{field}`` in the
    help is that field's default, so a default is written once."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class SampleConfig:
    out: str = flag(help="output folder", metavar="DIR")  # a local path
    # enough for a visible learning curve, small enough to build in seconds
    classes: int = flag(10, "number of classes")
    # a small AlexNet learns these patterns from ~60 images in a few epochs
    train_per_class: int = flag(60, "train images per class")
    val_per_class: int = flag(10, "val images per class")  # 100 val images: accuracy in 1% steps
    # nominal W x H; real images vary, so each varies +-25%
    size: tuple[int, int] = flag((160, 120), "nominal image size WxH", parse="size", metavar="WxH")
    seed: int = flag(0, "random seed")  # every byte written is a function of the seed
    # also write damaged files, to test that readers report, not crash
    bad: bool = flag(False, "also write damaged files (truncated, empty, not an image)")
    # ILSVRC-2012's shape: 1,000 classes and the devkit's full synset tree (1,000 leaves and 860
    # WordNet nodes above them, 1,860 synsets), so scale is measured on the real class count.
    imagenet: bool = flag(
        False,
        "ILSVRC-2012's shape: 1000 classes, the devkit's 1860 synsets, 50 val images per class "
        "(50,000 ground-truth lines) unless --val-per-class says otherwise",
    )
    layouts: tuple[str, ...] = flag(
        ("tarballs", "kaggle", "folders"), "which layouts to write, comma-separated", parse="list", metavar="LIST"
    )
    # Processes encoding the images: each starts in ~1 s, so one is quickest for the demo's 700
    # images; the GPU check's tens of thousands of 256 px images want every core.
    workers: int = flag(1, "processes encoding the images (the bytes are the same for any number)")


@dataclass(frozen=True)
class IndexConfig:
    # ImageNet as the user holds it: tarballs, Kaggle or folders
    source: str = flag(help="ImageNet folder: original tarballs, Kaggle or train/<wnid>/", metavar="SRC")
    data: str = flag(help="dataset ROOT to write", metavar="ROOT")  # that every later stage reads and writes
    # None: detect from the files (sources.detect)
    layout: str | None = flag(
        None, "skip detection (default: detected from the files)", choices=["ilsvrc-tar", "kaggle", "folder"]
    )
    # first N classes in sorted-WNID order, for small runs
    classes: int | None = flag(None, "keep the first N classes (sorted WNIDs; default: all)")
    limit: int | None = flag(None, "at most N images per class and split (default: all)")  # for small runs
    seed: int = flag(0, "seed of the shard assignment")  # fixes which shard each image goes to
    # ~100 MB shards at 256 px q90: sequential reads, >= 300 train shards to spread
    samples_per_shard: int = flag(4096, "images per shard")
    # hashing loose files is I/O-bound; threads overlap the reads
    read_threads: int = flag(16, "parallel reads of loose files")
    # ray: one Ray task per class tar / 1,024 loose files; local: this process;
    # auto: ray on a cluster (RAY_ADDRESS) or for sources over ray_min_bytes
    parallel: str = flag(
        "auto", "read the source in Ray tasks (one per class tar / 1,024 files) or in this process", choices=PARALLEL
    )
    # any rejected input fails the stage (after writing its outputs)
    strict: bool = flag(False, "fail (exit 1) if any input is rejected")
    force: bool = flag(False, "redo even if nothing changed")  # even when the source and parameters are unchanged
    ray_min_bytes: int = RAY_MIN_BYTES


@dataclass(frozen=True)
class ShardConfig:
    data: str = flag(help="dataset ROOT", metavar="ROOT")
    split: str = flag("all", "which split", choices=["train", "val", "all"])
    resize: int = flag(256, "shorter side in px")  # paper section 2: shorter side to 256, then the central 256x256
    keep_aspect: bool = flag(
        False, "keep the whole image (shorter side = --resize) instead of the central square crop"
    )  # instead of the paper's crop
    quality: int = flag(90, "JPEG quality")  # visually lossless at 256 px, ~30 KB an image
    # ranged reads in flight per task: S3 latency overlaps the decoding
    read_threads: int = flag(8, "source reads in flight per shard task (merged ranged GETs on S3)")
    # None: the grouping the index stage chose
    samples_per_shard: int | None = flag(None, "regroup; default: the index's grouping")
    # ray: one Ray task per shard; local: a pool of this machine's processes; auto: ray on a
    # cluster (RAY_ADDRESS), inside a running Ray, or for sources over ray_min_bytes; else local
    parallel: str = flag(
        "auto",
        "run the shard tasks on Ray or in a pool of this machine's processes; auto: Ray on a cluster "
        "(RAY_ADDRESS) or for over 4 GB of source, else local processes (no Ray start-up)",
        choices=PARALLEL,
    )
    strict: bool = flag(False, "fail (exit 1) if any input is rejected")
    # re-checksum existing shards instead of trusting size (slow)
    verify: bool = flag(False, "re-checksum existing shards")
    allow_stale: bool = flag(False, ALLOW_STALE)
    num_cpus: float = 1.0  # per shard task: decode/resize/encode is one core's work
    ray_min_bytes: int = RAY_MIN_BYTES


@dataclass(frozen=True)
class StatsConfig:
    data: str = flag(help="dataset ROOT", metavar="ROOT")
    force: bool = flag(False, "recompute even if the shards are unchanged")
    allow_stale: bool = flag(False, ALLOW_STALE)
    # as ShardConfig's: Ray, or this machine's processes for small data
    parallel: str = flag(
        "auto",
        "one task per shard on Ray or in a pool of this machine's processes; auto as for shard",
        choices=PARALLEL,
    )
    num_cpus: float = 1.0
    ray_min_bytes: int = RAY_MIN_BYTES


def same_as(cls, name: str):
    """A field declared as ``cls``'s field ``name`` is: its default, flag and help, written once."""
    f = cls.__dataclass_fields__[name]
    return field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


@dataclass(frozen=True)
class PrepareConfig:
    # index, shard and stats in one process: each field is one of those stages' own
    source: str = same_as(IndexConfig, "source")
    data: str = same_as(IndexConfig, "data")
    layout: str | None = same_as(IndexConfig, "layout")
    classes: int | None = same_as(IndexConfig, "classes")
    limit: int | None = same_as(IndexConfig, "limit")
    seed: int = same_as(IndexConfig, "seed")
    samples_per_shard: int = same_as(IndexConfig, "samples_per_shard")
    resize: int = same_as(ShardConfig, "resize")
    keep_aspect: bool = same_as(ShardConfig, "keep_aspect")
    quality: int = same_as(ShardConfig, "quality")
    parallel: str = same_as(ShardConfig, "parallel")
    strict: bool = same_as(ShardConfig, "strict")
    # the index and the stats; the shard stage redoes what its inputs changed, as it always does
    force: bool = flag(False, "redo the index and the stats even if nothing changed")
    ray_min_bytes: int = RAY_MIN_BYTES


@dataclass(frozen=True)
class StatusConfig:
    data: str = flag(help="dataset ROOT", metavar="ROOT")
    # re-checksum every shard: catches damage that keeps a file's size (reads them all)
    verify: bool = flag(False, "re-checksum every shard (reads them all): finds damage that kept a file's size")
    # re-list the source to see if the index is stale (slow on huge folders)
    check_source: bool = flag(True, "do not re-list the source (faster on huge folders)", flags=("--no-source-check",))


GPU_RECIPE = "throughput on many GPUs (the defaults are the paper's recipe)"


@dataclass(frozen=True)
class TrainConfig:
    data: str = flag(help="dataset ROOT (shards, classes.json, stats.json)", metavar="ROOT")
    # Ray Train data-parallel workers (the paper trained on 2 GPUs)
    workers: int = flag(
        2,
        "data-parallel workers: N, or MIN-MAX for elastic training that goes on with fewer after a node loss",
        parse="workers",
        metavar="N|MIN-MAX",
    )
    min_workers: int | None = None  # --workers MIN-MAX: elastic, go on with as few as MIN after a node loss
    gpu: bool | None = flag(None, "train on GPUs (default: when the cluster has them)", off="train on CPUs")
    epochs: int = flag(90, "epochs")  # paper section 5: "roughly 90 cycles"
    batch_size: int = flag(128, "global batch size", one_of="batch")  # split across workers (section 5)
    # sets the global batch to N x workers (x MAX of --workers MIN-MAX)
    batch_per_worker: int | None = flag(
        None, "batch per worker: sets the global batch to N x workers (x MAX of an elastic MIN-MAX)", one_of="batch"
    )
    crop: int = flag(224, "training crop in px")  # random 224x224 patches of the 256x256 images (section 4.1)
    lr: float = flag(0.01, "initial learning rate")  # section 5
    momentum: float = flag(0.9, "SGD momentum")  # section 5
    weight_decay: float = flag(5e-4, "weight decay")  # section 5
    # section 5: lr / 10 when the validation error stops improving
    schedule: str = flag("plateau", "lr schedule", choices=["plateau", "step", "cosine"])
    # plateau: epochs without a better val error before dividing lr by 10
    patience: int = flag(2, "plateau: epochs without improvement")
    # step: lr / 10 every 30 epochs (torchvision's reference recipe)
    step_size: int = flag(30, "step: epochs between lr / 10")
    min_lr: float = 1e-5  # the paper divided 0.01 by 10 three times, then stopped
    # the paper's two-tower net; alexnet-torchvision for comparison
    arch: str = flag("alexnet2012", "network", choices=["alexnet2012", "alexnet-torchvision"])
    # section 5; 'kaiming' learns on small data (see model/__init__.py)
    init: str = flag("paper", "weight initialisation", choices=["paper", "kaiming"])
    lighting: float = flag(0.1, "PCA lighting alpha std (0 turns it off)")  # colour augmentation (section 4.1)
    seed: int = flag(0, "random seed")  # weights, shard order, shuffle buffers and crops
    # the run's name; rerunning a name resumes it (default: a timestamp)
    name: str | None = flag(None, "run name; rerunning a name resumes it", metavar="NAME")
    experiment: str = flag("alexnet", "MLflow experiment", metavar="EXP")
    storage: str | None = flag(None, "where checkpoints go (default: ROOT/runs)", metavar="DIR")
    # the best by val_top1 (Ray also keeps the latest, for resuming)
    keep_checkpoints: int = flag(2, "best checkpoints kept")
    # worker restarts from the last checkpoint before the run fails
    max_failures: int = flag(3, "worker restarts allowed")
    # per training worker; None: the worker's CPUs with a GPU, 1 on CPU
    loader_workers: int | None = flag(None, "data loader processes per worker")
    # samples a loader worker shuffles among; ~60 MB of JPEG bytes at 256 px
    shuffle_buffer: int = flag(2000, "shuffle buffer in samples")
    # steps between mid-epoch checkpoints; None: every ~checkpoint_interval_s
    checkpoint_every: int | None = flag(
        None, "steps between mid-epoch checkpoints (default: measured, about every {checkpoint_interval_s:.0f} s)"
    )
    # steps between progress lines inside an epoch; None: a tenth of an epoch
    progress_every: int | None = flag(
        None, "steps between progress lines inside an epoch (default: a tenth of an epoch)"
    )
    # 10 min: AlexNet's checkpoint (weights + momentum, ~0.5 GB) takes well under 30 s to write
    # to disk or S3, so under 5% of the time, and a preempted node loses at most 10 min of work.
    checkpoint_interval_s: float = 600.0
    # A stall: no rank finished a step for max(10 step times, this); 2 min outlasts a slow
    # checkpoint or validation and a worker group's restart, and is far below NCCL's 30 min.
    stall_after_s: float = flag(
        120.0, "report a stall after max(10 step times, S) without progress", flags=("--stall-after",), metavar="S"
    )
    # what a stall does after its report (pipelines/stall.py)
    stall_action: str = flag(
        "report",
        "after a stall's report: keep waiting, or kill the silent ranks and restart from the last checkpoint",
        choices=["report", "restart"],
    )
    # debug: a local folder where each rank records the sample keys of each step
    ledger: str | None = flag(
        None, "debug: a local folder where each rank records the keys of every step", metavar="DIR"
    )
    # JPEG decoding: auto = on the GPU (nvjpeg) when training on one, else worker
    decode: str = flag(
        "auto",
        "where JPEGs are decoded: device = in one batched call on the training device (nvjpeg on a GPU), "
        "worker = in the loader processes, auto = device on a GPU, else worker",
        choices=["auto", "worker", "device"],
    )
    # --- throughput on many GPUs (the paper's recipe is the defaults above; see docs/training.md, "Recipes") ---
    # autocast: auto = bf16 on a GPU (tensor cores, no loss scaling), off on CPUs
    amp: str = flag(
        "auto",
        "autocast: auto = bf16 on a GPU, off on CPUs; fp16 adds loss scaling (GPU only)",
        choices=["auto", "bf16", "fp16", "off"],
        group=GPU_RECIPE,
    )
    # torch.compile the network: minutes of compilation, then faster steps
    compile: bool = flag(
        False, "torch.compile the network (compiles for minutes at start, then faster steps)", group=GPU_RECIPE
    )
    # None: on GPUs, whose tensor-core convolutions read NHWC
    channels_last: bool | None = flag(
        None,
        "images and weights in NHWC memory order (default: on GPUs)",
        off="keep PyTorch's NCHW order",
        group=GPU_RECIPE,
    )
    # linear: lr = --lr x batch / lr_reference_batch (Goyal et al. 2017)
    lr_scaling: str = flag(
        "none",
        "linear: lr = --lr x global batch / --lr-reference-batch (Goyal et al. 2017)",
        choices=["none", "linear"],
        group=GPU_RECIPE,
    )
    # the batch the paper's lr 0.01 was set for (section 5)
    lr_reference_batch: int = flag(128, "the batch --lr was set for", group=GPU_RECIPE)
    # the lr rises step by step to its peak over the first N epochs
    warmup_epochs: int = flag(
        0, "the lr rises linearly, step by step, to its peak over the first N epochs", group=GPU_RECIPE
    )
    # fraction of the peak lr at the first step; None: see recipe.warmup_from
    warmup_start: float | None = flag(
        None,
        "the first step's fraction of the peak lr (default: --lr / peak when --lr-scaling raised it, else 0.1)",
        group=GPU_RECIPE,
    )
    # bf16 / fp16: DDP all-reduces gradients in half the bytes
    grad_compression: str = flag(
        "none",
        "all-reduce the gradients in half precision: half the bytes between workers",
        choices=["none", "bf16", "fp16"],
        group=GPU_RECIPE,
    )
    # CPUs reserved per training worker; None: on CPUs, the cluster's CPUs shared among the workers
    # (at most 8); on GPUs, the fewest CPUs per GPU of any GPU node (at most 8), so that a worker
    # fits one GPU's share of a 4-vCPU-per-GPU instance. The loader workers default to it on a GPU.
    cpus_per_worker: float | None = flag(
        None,
        "CPUs each training worker reserves (default: on GPUs, each GPU node's CPUs per GPU, at most "
        "{max_cpus_per_worker:g}; "
        "on CPUs, the cluster's CPUs shared among the workers)",
        group=GPU_RECIPE,
    )
    max_cpus_per_worker: float = 8.0  # the defaults' cap: a GPU worker's loader decodes with up to 8 processes
    # what one worker costs an hour (a GPU instance's price / its GPUs): the run logs cost/usd
    price_per_hour: float | None = flag(
        None, "price of one worker for an hour: the run logs cost/usd beside its worker-hours", metavar="USD"
    )
    # register the final model under this name in the registry
    register: str | None = flag(
        None,
        "register the model (the best epoch's, by val_top1) under this name in the MLflow registry",
        metavar="NAME",
    )
    # with --register: the registry alias moved to this run's model version
    alias: str = flag("champion", "with --register: the alias moved to the new version", metavar="ALIAS")
    allow_stale: bool = flag(
        False,
        "train on shards or stats `status` calls stale, or on val shards made unlike the train shards "
        "(the run records that it did)",
    )


SEARCH = "the search space (each: a grid a,b,c or a draw log:LO:HI / uniform:LO:HI; unsearched: train's flag)"


def searched(help: str):
    """A sweep's flag over one training setting: its space as text, None when not searched."""
    return flag(None, help, metavar="SPACE", group=SEARCH)


@dataclass(frozen=True)
class SweepConfig:
    data: str = same_as(TrainConfig, "data")
    # the parent run's name and the trials' prefix (NAME-trial-00, ...); a rerun resumes it
    name: str = flag(help="the sweep's name; rerunning a name resumes it", metavar="NAME")
    lr: str | None = searched("learning rates, e.g. 0.005,0.01,0.02 or log:0.001:0.05")
    weight_decay: str | None = searched("weight decays, e.g. 0,0.0005 or log:0.00001:0.001")
    batch_size: str | None = searched("global batch sizes, e.g. 64,128,256 or log:64:512")
    crop: str | None = searched("training crops in px, e.g. 192,224")
    schedule: str | None = searched("lr schedules, e.g. plateau,cosine")
    # None: every grid point once; draws need a count
    trials: int | None = flag(None, "trials in all: a multiple of the grid's points (default: each grid point once)")
    # None: as many as the cluster's GPUs (CPUs) hold at once, at most --trials
    max_concurrent: int | None = flag(None, "trials at a time (default: as many as the cluster holds at once)")
    # ASHA (Li et al. 2018): at each rung, a trial whose val_top1 trails the others' stops
    scheduler: str = flag(
        "asha",
        "asha: stop the trials that trail at each rung of epochs; fifo: train every trial to the end",
        choices=["asha", "fifo"],
    )
    grace_epochs: int = flag(1, "asha: epochs every trial trains before it may be stopped")
    # 2 keeps the better half at each rung (Ray Tune's default, 4, keeps a quarter): fitting small sweeps
    reduction_factor: int = flag(2, "asha: 1/N of the trials go on at each rung")
    register: str | None = flag(
        None, "register the best trial's model (by val_top1) under this name in the MLflow registry", metavar="NAME"
    )
    alias: str = same_as(TrainConfig, "alias")
    # every other training flag the user gave, as TrainConfig fields: the same for every trial
    train: dict = field(default_factory=dict)


SEARCHED = ("lr", "weight_decay", "batch_size", "crop", "schedule")  # SweepConfig's searched fields


@dataclass(frozen=True)
class EvaluateConfig:
    data: str = flag(help="dataset ROOT", metavar="ROOT")
    # the training run: its last checkpoint, metrics logged back to it
    run_id: str | None = flag(None, "MLflow run id of a training run", one_of="model", required=True)
    # or a checkpoint folder (holding state.pt)
    checkpoint: str | None = flag(None, "checkpoint folder (holds state.pt)", one_of="model")
    # or a model train logged: an epoch's checkpoint (models:/m-...) or the run's model, registered or not
    model: str | None = flag(
        None, "a model train logged: models:/NAME@ALIAS, models:/MODEL_ID (any epoch's)", one_of="model", metavar="URI"
    )
    # section 4.1: 4 corners + centre, each mirrored, softmax averaged
    ten_crop: bool = flag(False, "the paper's 10-crop test")
    batch_size: int = flag(64, "images per batch")
    loader_workers: int = flag(2, "data loader processes")
    gpu: bool | None = None  # None: a GPU when this process or the cluster has one
    allow_stale: bool = flag(
        False,
        "evaluate on val shards `status` calls stale, or made unlike the model's training shards "
        "(the evaluation records that it did)",
    )


@dataclass(frozen=True)
class SubmitConfig:
    address: str | None = flag(
        None, "Ray dashboard address, http://HEAD:8265 (default: RAY_ADDRESS)", metavar="URL"
    )  # the dashboard's HTTP address
    # follow the logs and exit with the job's status
    wait: bool = flag(True, "return once the job is submitted", flags=("--no-wait",))
    list: bool = flag(False, "list the cluster's jobs", one_of="job")
    logs: str | None = flag(None, "print a job's logs", one_of="job", metavar="JOB_ID")
    follow: str | None = flag(
        None, "follow a job's logs to its end and exit with its exit code", one_of="job", metavar="JOB_ID"
    )
    stop: str | None = flag(None, "stop a job", one_of="job", metavar="JOB_ID")
    # Ctrl-C while following a job leaves it running (it may hold hours of work), unless asked
    stop_on_interrupt: bool = flag(False, "Ctrl-C while following the job stops it too (default: it goes on)")
    # the stage and its arguments, as after `python -m pipelines`
    args: tuple[str, ...] = flag((), "-- <stage> <args...>", nargs="...")


@dataclass(frozen=True)
class PredictConfig:
    # image files (JPEG, PNG), local or s3://
    images: tuple[str, ...] = flag((), "image files (JPEG, PNG), local or s3://", nargs="*", metavar="IMAGE")
    # a model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model
    model: str | None = flag(
        None,
        "a model URI: models:/NAME@ALIAS (e.g. models:/alexnet-demo@champion), models:/NAME/VERSION",
        one_of="model",
        required=True,
        metavar="URI",
    )
    run_id: str | None = flag(None, "a training run: its logged model", one_of="model", metavar="ID")  # or a run
    # --- in bulk, on Ray Data ---
    source: str | None = flag(
        None,
        "predict every image of SRC on Ray Data: a folder, an s3:// prefix, a list file (a path or URL "
        "a line) or a dataset ROOT (its val shards); with --out",
        metavar="SRC",
        group="in bulk",
    )
    out: str | None = flag(
        None, "where the predictions go: a Parquet dataset (a folder or s3:// prefix)", metavar="OUT", group="in bulk"
    )
    # model actors: one per GPU of the cluster with --gpu; on CPUs one, next to the decode tasks
    workers: int | None = flag(None, "model actors (default: one per GPU, or 1 on CPUs)", group="in bulk")
    gpu: bool | None = flag(
        None, "the model on GPUs (default: when the cluster has them)", off="on CPUs", group="in bulk"
    )
    # each model actor's CPUs, its torch threads: on a GPU it only feeds the device. A lone actor
    # on CPUs shares every core with the decode tasks (inference.actor_cpus says why)
    cpus_per_worker: int | None = flag(
        None,
        "CPUs each model actor holds, its torch threads "
        "(default 1; a lone actor on CPUs holds none and runs a thread per CPU of its node)",
        group="in bulk",
    )
    # 256 crops of 224 px are ~40 MB in Ray's object store: small enough to stream, big enough
    # for one model call; also the unit a killed run loses and a rerun skips
    chunk_images: int = flag(256, "images a chunk: one decode task, one model call, one Parquet file", group="in bulk")
    experiment: str = flag("predict", "MLflow experiment of the run that records a bulk prediction", group="in bulk")
