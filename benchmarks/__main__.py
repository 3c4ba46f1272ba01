"""`make bench`: the CPU benchmarks in one go (~45 minutes on 2 cores, ~20 of them bulk predict), then a summary.

    python -m benchmarks [--quick]

Each benchmark prints its table and writes bench-results/<name>.json; the GPU benchmark
(`python -m benchmarks.gpu`) runs separately, on a machine with a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import common, loader, predict, s3, shard, train_step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="one repeat each, fewer images: checks it runs, not a measurement"
    )
    a = ap.parse_args(argv)
    small = ["--repeats", "1"] if a.quick else []
    t0 = time.monotonic()
    results = [
        shard.main(small + (["--images", "600"] if a.quick else [])),
        # From a cold start at a size where the work outweighs the fixed cost: one repeat (~10 min)
        shard.main(
            ["--repeats", "1", "--name", "shard-20000", "--no-profile"]
            + (["--images", "600"] if a.quick else ["--images", "20000"])
        ),
        loader.main(small + (["--images", "600", "--take", "512"] if a.quick else [])),
        train_step.main(small + (["--steps", "4"] if a.quick else [])),
        s3.main(small + (["--images", "512"] if a.quick else [])),
        predict.main(small + (["--val-per-class", "30", "--images", "300", "--lines", "1000,2000"] if a.quick else [])),
    ]
    print("\nsummary (pipelines against each baseline, ratio of medians):")
    for r in results:
        for k, v in r.get("ratios", {}).items():
            print(f"  {r['benchmark']:<11} {k:<24} {v:.2f}x" if v is not None else f"  {r['benchmark']} {k}: -")
    print(
        f"machine: {common.machine()['cpu']}, {common.machine()['cores']} cores; {time.monotonic() - t0:.0f} s in all",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
