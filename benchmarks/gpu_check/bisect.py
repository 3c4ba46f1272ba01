"""Which part of the GPU training recipe makes the loss go NaN: one factor flipped at a time.

    python -m benchmarks.gpu_check.bisect --data ROOT [--steps 100] [--batch 256] [--crop 224]
    python -m benchmarks.gpu_check.bisect --data ROOT --device cpu --steps 2 --batch 8 --crop 64 \
        --variants "as-run-eager"   # the GPU check's CPU rehearsal

On one H200, `train --gpu` (paper init, lr 0.01, bf16 autocast, channels_last, --decode device,
fused SGD, --compile) had a NaN training loss from its first epoch, while the same recipe in
float32 on a CPU kept a finite loss. This runs train.py's own step on the real shards in one
process, without Ray: first the recipe as it ran (eager), then each variant with one factor
changed, every variant from the same seed and the same batches. For each it records the first
step with a non-finite loss (null if none) and the loss at a few steps, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

# The recipe as it ran, without torch.compile (the slowest to build); each variant changes one thing.
RECIPE = {
    "init": "paper",
    "amp": "bf16",
    "decode": "device",
    "fused": True,
    "channels_last": True,
    "compile": False,
    "lr": 0.01,
}
VARIANTS = {
    "as-run-eager": {},
    "float32": {"amp": "off"},
    "decode-worker": {"decode": "worker"},
    "plain-sgd": {"fused": False},
    "no-channels-last": {"channels_last": False},
    "kaiming-init": {"init": "kaiming"},
    "lr-0.001": {"lr": 0.001},
    "compiled": {"compile": True},
}


def run_variant(v: dict, inputs: dict, a, device) -> dict:
    import torch

    import model
    from pipelines import recipe

    torch.manual_seed(0)
    net = model.build("alexnet2012", inputs["num_classes"], v["init"]).to(device)
    if v["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    step_net = torch.compile(net) if v["compile"] else net
    params = dict(lr=v["lr"], momentum=0.9, weight_decay=5e-4)
    opt = recipe.sgd(net.parameters(), **params) if v["fused"] else torch.optim.SGD(net.parameters(), **params)
    amp = recipe.amp_dtype(v["amp"], gpu=device.type == "cuda")
    tf = model.TrainTransform.from_stats(inputs["stats"], crop=a.crop, alphastd=0.1)
    losses, t0 = [], time.perf_counter()
    epoch = 0
    while len(losses) < a.steps:  # as many epochs as the steps need, each a fresh loader as in training
        epoch += 1
        for x, y in batches_of(inputs["train_shards"], tf, a, epoch, v["decode"], device, a.steps - len(losses)):
            if v["channels_last"]:
                x = x.contiguous(memory_format=torch.channels_last)
            _, loss = recipe.train_step(step_net, opt, tf.photometric(x), y, amp)
            losses.append(loss.detach().float())
    values = torch.stack(losses).cpu().tolist()  # one read at the end: the steps stay asynchronous
    bad = next((i + 1 for i, x in enumerate(values) if not math.isfinite(x)), None)
    return {
        "first_non_finite_step": bad,
        "steps": len(values),
        "seconds": round(time.perf_counter() - t0, 1),
        "loss": {str(s): values[s - 1] for s in (1, 2, 5, 10, 20, 50, 100, 200) if s <= len(values)},
    }


def batches_of(shards, tf, a, epoch: int, decode: str, device, most: int):
    """Up to ``most`` (uint8 images, labels) batches of one epoch on the device, as train_loop reads them."""
    from pipelines import data, plan

    seg = plan.epoch_plan(
        [n for _, n in shards],
        seed=0,
        epoch=epoch,
        batch_size=a.batch,
        world=1,
        loader_workers=a.loader_workers,
        buffer=2000,
    )
    batches = data.on_device(
        data.train_loader(shards, tf, segment=seg, rank=0, pin_memory=device.type == "cuda", decode=decode), device
    )
    for _ in range(min(most, seg.steps)):
        x, y, _ = next(batches)
        yield x, y
    batches.close()  # stops this loader's workers before the next starts its own


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, metavar="ROOT", help="a sharded dataset ROOT with stats")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=100, help="steps per variant")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--loader-workers", type=int, default=8)
    ap.add_argument(
        "--variants",
        type=lambda t: t.split(","),
        default=list(VARIANTS),
        metavar="NAMES",
        help="comma-separated names from VARIANTS (default: all)",
    )
    a = ap.parse_args(argv)

    import torch

    from pipelines import train
    from pipelines.config import TrainConfig

    device = torch.device(a.device)
    inputs = train._inputs(TrainConfig(data=a.data, crop=a.crop))
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "recipe": RECIPE,
        "batch": a.batch,
        "crop": a.crop,
        "variants": {},
    }
    for name in a.variants:
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}; expected some of: {', '.join(VARIANTS)}")
        change = VARIANTS[name]
        result = run_variant({**RECIPE, **change}, inputs, a, device)
        out["variants"][name] = {"change": change, **result}
        print(
            f"[bisect] {name}: first non-finite step {result['first_non_finite_step']}, loss {result['loss']}",
            file=sys.stderr,
            flush=True,
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
