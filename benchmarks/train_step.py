"""Train step: the Ray Train overhead, images/s of the project's loop against a plain loop.

    python -m benchmarks.train_step [--batch 64] [--crop 64] [--steps 12] [--epochs 4]

Contenders, the same model (alexnet2012, 1000 classes), optimiser, batch and synthetic data,
on the CPU with every core:

  pipelines   pipelines.worker.train_loop on one Ray Train worker holding all the cores: the
              project's loop (photometric step, metric accumulation, per-epoch evaluation,
              checkpoint and MLflow logging), fed one fixed random uint8 batch
              (data.synthetic_batches) so only the loop and Ray Train are measured. Its rate is
              the images_per_second the loop itself logs per epoch (steps only); the first epoch
              is warm-up and left out.
  plain       a plain PyTorch loop in this process: forward, cross-entropy, backward, SGD step
              on a fixed normalised float batch. Run before and after the Ray Train fit, so a
              drift in the machine's speed shows up rather than biasing the ratio.

Reported apart, as they do not scale with the epoch's length: Ray Train's start-up (from fit()
to the first step) and each epoch's fixed cost (evaluation, checkpoint, MLflow).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

from . import common
from .common import STATS


def plain_loop(arch: str, batch: int, crop: int, steps: int, warmup: int = 2) -> float:
    import torch
    import torch.nn.functional as F

    import model

    torch.manual_seed(0)
    net = model.build(arch, 1000, "kaiming").train()
    from pipelines.recipe import sgd

    opt = sgd(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)  # the project's (fused where torch has it)
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, 1000, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def ray_train_loop(arch: str, batch: int, crop: int, steps: int, epochs: int, store: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines import checkpoint, tracking, worker
    from pipelines.cluster import ensure_ray
    from pipelines.config import TrainConfig

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    ray = ensure_ray(dashboard=True)
    cores = int(ray.cluster_resources().get("CPU", 1))
    cfg = TrainConfig(
        data=store,
        workers=1,
        gpu=False,
        epochs=epochs,
        batch_size=batch,
        crop=crop,
        arch=arch,
        init="kaiming",
        name=f"train-step-{time.time():.0f}",
        decode="worker",
        storage=os.path.join(store, "runs"),
    )
    run_id = tracking.start_or_resume_run("benchmarks", cfg.name, tags={"pipelines.stage": "benchmark"})
    # As train.run() builds it, with no shards: the synthetic batch replaces the loader.
    loop_config = {
        **dataclasses.asdict(cfg),
        "train_shards": [],
        "val_shards": [],
        "stats": STATS,
        "num_classes": 1000,
        "classes_digest": "",
        "wnids": [],
        "resize": 256,
        "keep_aspect": False,
        "run_id": run_id,
        "tracking_uri": tracking.tracking_uri(),
        "synthetic_steps": steps,
    }
    trainer = TorchTrainer(
        worker.train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": cores}),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage),
    )
    t = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t
    tracking.end_run(run_id, "FINISHED")
    history = checkpoint.load(result.checkpoint.path)["history"]
    step_seconds = [h["samples"] / h["images_per_second"] for h in history]
    return {
        "rates": [h["images_per_second"] for h in history[1:]],
        "wall": wall,
        "step_seconds": step_seconds,
        "epochs": len(history),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="alexnet2012")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12, help="steps per epoch (and per plain-loop repeat)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="plain-loop repeats before and after the fit")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count())  # the worker gets every core; so does the plain loop
    plain = []
    for r in range(a.repeats):
        plain.append(plain_loop(a.arch, a.batch, a.crop, a.steps))
        print(f"  plain loop (before) {r + 1}/{a.repeats}: {plain[-1]:,.1f} images/s", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as store:
        rt = ray_train_loop(a.arch, a.batch, a.crop, a.steps, a.epochs, store)
    print(
        f"  Ray Train epochs 2..{rt['epochs']}: {', '.join(f'{r:,.1f}' for r in rt['rates'])} images/s",
        file=sys.stderr,
        flush=True,
    )
    for r in range(a.repeats):
        plain.append(plain_loop(a.arch, a.batch, a.crop, a.steps))
        print(f"  plain loop (after) {r + 1}/{a.repeats}: {plain[-1]:,.1f} images/s", file=sys.stderr, flush=True)

    ours, base = common.median(rt["rates"]), common.median(plain)
    fixed = rt["wall"] - sum(rt["step_seconds"])  # start-up + per-epoch evaluation/checkpoint/logging
    rows = [
        {"contender": "pipelines (Ray Train)", "images/s": ours, "vs plain": ours / base},
        {"contender": "plain PyTorch", "images/s": base, "vs plain": 1.0},
    ]
    return common.report(
        "train_step",
        f"train step: {a.arch}, batch {a.batch}, {a.crop} px, CPU, "
        f"{a.steps} steps/epoch; median of epochs 2..{a.epochs} against {2 * a.repeats} "
        "plain-loop repeats",
        rows,
        ["contender", "images/s", "vs plain"],
        {
            "ratios": {"ray_train_vs_plain": ours / base, "overhead": 1 - ours / base},
            "ray_train": rt,
            "plain": plain,
            "fixed_seconds": {"fit_wall_minus_steps": fixed, "epochs": rt["epochs"]},
            "command": "python -m benchmarks.train_step " + " ".join(argv or sys.argv[1:]),
        },
    )


if __name__ == "__main__":
    main()
