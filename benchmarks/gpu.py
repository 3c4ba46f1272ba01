"""GPU training throughput: the model alone, and end to end from shards.

    python -m benchmarks.gpu [--batch 256] [--loader-workers 12] [--steps 40]
    python -m benchmarks.gpu --device cpu --tiny --compile-backend eager   # wiring check (tests)

Model alone: model.build("alexnet2012", 1000, "paper") on random inputs already on the device,
the training step of pipelines/recipe.py (bf16 autocast, channels_last, SGD), contenders
  eager          the network as train_loop runs it
  compiled       torch.compile(network)
with the model FLOP utilisation: training FLOPs per image (torch.utils.flop_counter on one
forward + backward) x images/s / the GPU's dense bf16 peak (null for a GPU not in PEAK_BF16).

End to end: photo-like 256x256 q90 JPEGs in tar shards (the layout pipelines/shard.py writes)
-> pipelines.data.train_loader -> data.on_device -> the same training step, contenders
  decode=worker  the loader workers decode on the CPU (libjpeg-turbo) and crop
  decode=device  the workers read headers and draw crops; one nvjpeg call decodes each batch
  (and decode=device with only --few-workers loader workers: how many CPU cores it still needs)
reporting images/s and the data-wait fraction: time train_loop would spend blocked in
next(batches) / total. With decode=device the batch's decode runs inside that call, so it
counts as waiting. Warm-up steps (loader start-up, cudnn, compilation) are not timed.
Each contender runs --steps steps per repeat, interleaved; the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time

from pipelines import tarindex
from pipelines.config import TrainConfig
from pipelines.shard import add_member

from . import common
from .common import STATS

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, matched in order
# against torch.cuda.get_device_name(); an H100 name without PCIe/NVL is the SXM part ("HBM3").
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", None), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
CLASSES = 1000


def log(msg: str) -> None:
    print(f"[gpu] {msg}", file=sys.stderr, flush=True)


def peak_flops(name: str | None) -> float | None:
    for part, peak in PEAK_BF16:
        if name and part in name:
            return peak
    return None


# --- the training step, as pipelines/worker.py trains with it ------------------------------
def make_step(net, opt, device):
    """train_loop's own step on a normalised float batch (channels_last on a GPU, as there)."""
    import torch

    from pipelines.recipe import train_step

    gpu = device.type == "cuda"

    def step(x, y):
        if gpu:
            x = x.contiguous(memory_format=torch.channels_last)
        train_step(net, opt, x, y, torch.bfloat16 if gpu else None)

    return step


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(step, x, y) -> float:
    """Training FLOPs (forward + backward; matmuls and convolutions) of one image."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(x, y)
    return counter.get_total_flops() / len(x)


# --- model alone ------------------------------------------------------------------------------------
def bench_model(net, opt, device, a) -> tuple[list[dict], dict]:
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(a.batch, 3, a.crop, a.crop, device=device, generator=gen)
    y = torch.randint(CLASSES, (a.batch,), device=device, generator=gen)
    eager = make_step(net, opt, device)
    fpi = flops_per_image(eager, x, y)
    compiled = make_step(torch.compile(net, backend=a.compile_backend), opt, device)
    steps = {"eager": eager, "compiled": compiled}
    for name, step in steps.items():
        log(f"model: warming up {name} ({a.warmup} steps{', compiling' if name == 'compiled' else ''}) ...")
        t = time.perf_counter()
        for _ in range(a.warmup):
            step(x, y)
        sync(device)
        log(f"model: {name} warm in {time.perf_counter() - t:.1f} s")

    def timed(step):
        def go():
            for _ in range(a.steps):
                step(x, y)
            sync(device)
            return a.steps * a.batch

        return go

    rates = common.interleaved({k: timed(v) for k, v in steps.items()}, a.repeats)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    rows = []
    for name, r in rates.items():
        ips = common.median(r)
        rows.append(
            {
                "part": "model",
                "contender": name,
                "images/s": ips,
                "TFLOP/s": ips * fpi / 1e12,
                "MFU": ips * fpi / peak if peak else None,
            }
        )
    return rows, {"flops_per_image": fpi, "peak_flops": peak, "model_rates": rates}


# --- end to end -------------------------------------------------------------------------------------
def write_shards(folder: str, images: int, shards: int) -> list[tuple[str, int]]:
    """``images`` photo-like 256x256 q90 JPEGs dealt into ``shards`` tars: {key}.jpg + {key}.cls,
    the layout of pipelines.shard.write_shard. Built once per size, then reused."""
    tag = os.path.join(folder, f"gpu-{images}x256-{shards}")
    names = [os.path.join(tag, f"train-{i:06d}.tar") for i in range(shards)]
    counts = [len(range(i, images, shards)) for i in range(shards)]
    if not os.path.exists(os.path.join(tag, "ready")):
        log(f"making {images} photo-like 256x256 JPEGs in {shards} shards under {tag} ...")
        os.makedirs(tag, exist_ok=True)
        jpgs = common.photo_jpegs(images, size=(256, 256), quality=90, seed=2)
        for i, name in enumerate(names):
            with tarfile.open(name + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
                for k in range(i, images, shards):
                    add_member(tar, f"img{k:08d}.jpg", jpgs[k])
                    add_member(tar, f"img{k:08d}.cls", str(k % CLASSES).encode())
            os.replace(name + ".tmp", name)
        open(os.path.join(tag, "ready"), "w").close()
    for name in names:  # the loader reads through each shard's sample index, as the shard stage writes it
        if tarindex.read(name) is None:
            tarindex.write(name, tarindex.scan(name))
    return list(zip(names, counts))


def bench_end_to_end(net, opt, device, shards, a) -> tuple[list[dict], dict]:
    import model
    from pipelines import data, plan

    tf = model.TrainTransform.from_stats(STATS, crop=a.crop, alphastd=0.1)
    step = make_step(net, opt, device)

    def run(decode: str, workers: int, epoch: int) -> tuple[float, float]:
        """(images/s, data-wait fraction) over the timed steps of one fresh loader."""
        # The synthetic shards listed as often as one epoch of warm-up + timed steps needs: the
        # plan sees distinct samples, the reads go to the same files.
        need = (a.warmup + a.steps) * a.batch
        listed = shards * -(-need // sum(n for _, n in shards))
        seg = plan.epoch_plan(
            [n for _, n in listed],
            seed=0,
            epoch=epoch,
            batch_size=a.batch,
            world=1,
            loader_workers=workers,
            buffer=a.shuffle_buffer,
        )
        loader = data.train_loader(listed, tf, segment=seg, rank=0, pin_memory=device.type == "cuda", decode=decode)
        batches = data.on_device(loader, device)
        for _ in range(a.warmup):  # loader start-up and the first window's reads are not timed
            x, y, _ = next(batches)
            step(tf.photometric(x), y)
        sync(device)
        waited, t0 = 0.0, time.perf_counter()
        for _ in range(a.steps):
            tw = time.perf_counter()
            x, y, _ = next(batches)
            waited += time.perf_counter() - tw
            step(tf.photometric(x), y)
        sync(device)
        total = time.perf_counter() - t0
        batches.close()  # stops this loader's workers before the next contender starts its own
        return a.steps * a.batch / total, waited / total

    contenders = {"decode=worker": ("worker", a.loader_workers), "decode=device": ("device", a.loader_workers)}
    if a.few_workers < a.loader_workers:
        contenders[f"decode=device, {a.few_workers} workers"] = ("device", a.few_workers)
    log(
        f"end to end: {', '.join(contenders)}; {a.warmup} warm-up + {a.steps} timed steps each, "
        f"{a.repeats} repeat(s), interleaved"
    )
    rates = {k: [] for k in contenders}
    waits = {k: [] for k in contenders}
    for r in range(a.repeats):
        for name, (decode, workers) in contenders.items():
            rate, wait = run(decode, workers, epoch=r)
            rates[name].append(rate)
            waits[name].append(wait)
            log(f"  repeat {r + 1}/{a.repeats} {name}: {rate:,.1f} images/s, data wait {wait:.0%}")
    rows = [
        {
            "part": "end-to-end",
            "contender": k,
            "loader workers": contenders[k][1],
            "images/s": common.median(rates[k]),
            "data wait": common.median(waits[k]),
        }
        for k in contenders
    ]
    return rows, {"end_to_end_rates": rates, "data_wait": waits}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the point) or cpu (with --tiny: a wiring check)")
    ap.add_argument("--batch", type=int, default=256, help="images per step")
    ap.add_argument("--crop", type=int, default=224, help="training crop in px")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per contender and repeat")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before each timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader-workers", type=int, default=12, help="loader processes (both decode paths)")
    ap.add_argument("--few-workers", type=int, default=2, help="loader processes of the extra decode=device row")
    ap.add_argument("--images", type=int, default=2048, help="JPEGs in the synthetic shards (listed again as needed)")
    ap.add_argument("--shards", type=int, default=24, help="tar shards")
    ap.add_argument(
        "--shuffle-buffer", type=int, default=None, help="samples per loader worker (default: TrainConfig's)"
    )
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend; 'eager' traces without compiling (the CPU test)",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="seconds, not minutes: crop 64, batch 8, 2 steps, 1 repeat, 32 images"
    )
    ap.add_argument("--cache", default=os.path.join(common.OUT, "cache"))
    a = ap.parse_args(argv)
    if a.tiny:
        a.crop, a.batch, a.steps, a.warmup, a.repeats = 64, 8, 2, 1, 1
        a.images, a.shards, a.loader_workers, a.few_workers, a.shuffle_buffer = 32, 4, 2, 2, 16
    if a.shuffle_buffer is None:
        a.shuffle_buffer = TrainConfig.shuffle_buffer  # what training uses (one place per default)

    import torch

    import model

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: no CUDA device here. This benchmark measures GPU training; to check its wiring "
            "on a CPU run: python -m benchmarks.gpu --device cpu --tiny --compile-backend eager",
            file=sys.stderr,
        )
        raise SystemExit(2)
    t0 = time.perf_counter()
    shards = write_shards(a.cache, a.images, a.shards)
    torch.manual_seed(0)
    net = model.build("alexnet2012", CLASSES, "paper").to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    net.train()
    # train.py's optimiser (TrainConfig's lr, momentum, weight decay: the same update work).
    from pipelines.recipe import sgd

    opt = sgd(net.parameters(), lr=TrainConfig.lr, momentum=TrainConfig.momentum, weight_decay=TrainConfig.weight_decay)
    model_rows, model_extra = bench_model(net, opt, device, a)
    e2e_rows, e2e_extra = bench_end_to_end(net, opt, device, shards, a)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return common.report(
        "gpu",
        f"AlexNet (alexnet2012) training on {name}: batch {a.batch}, crop {a.crop}, "
        f"{'bf16 autocast + channels_last' if device.type == 'cuda' else 'float32'}; median of {a.repeats} "
        f"x {a.steps} steps",
        model_rows + e2e_rows,
        ["part", "contender", "loader workers", "images/s", "TFLOP/s", "MFU", "data wait"],
        {
            "device": str(device),
            "batch": a.batch,
            "crop": a.crop,
            "steps": a.steps,
            "warmup": a.warmup,
            "repeats": a.repeats,
            "compile_backend": a.compile_backend,
            "images": a.images,
            "shards": a.shards,
            **model_extra,
            **e2e_extra,
            "command": "python -m benchmarks.gpu " + " ".join(argv or sys.argv[1:]),
        },
    )


if __name__ == "__main__":
    main()
