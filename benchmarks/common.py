"""What every benchmark shares: photo-like test images, a timer, the table and the JSON record.

Absolute times on shared machines drift by tens of percent between minutes, so each benchmark
times its contenders side by side, interleaved (A, B, A, B, ...), and reports the median of
the repeats and the ratio of medians. The JSON goes to $BENCH_OUT (default bench-results/).
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

OUT = os.environ.get("BENCH_OUT", "bench-results")
# ImageNet's published RGB statistics (pixels in 0..1; the AlexNet-era PCA). Every contender
# uses the same numbers for the same arithmetic; the values do not change the speed.
STATS = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "eigval": [0.2175, 0.0188, 0.0045],
    "eigvec": [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
}


# --- test images --------------------------------------------------------------------------------
def _field(rng: np.random.Generator, n: int) -> np.ndarray:
    """An n x n x 3 random field with natural images' 1/f amplitude spectrum, colour-correlated."""
    fy, fx = np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0

    def noise():
        return rng.standard_normal((n, n // 2 + 1)) + 1j * rng.standard_normal((n, n // 2 + 1))

    shared = noise()
    chans = []
    for _ in range(3):
        c = np.fft.irfft2((0.8 * shared + 0.2 * noise()) / f, s=(n, n))
        chans.append((c - c.mean()) / c.std())
    return np.stack(chans, -1)


def photo_jpegs(
    n: int, size: tuple[int, int] = (500, 375), quality: int = 90, seed: int = 0, vary: float = 0.0
) -> list[bytes]:
    """``n`` JPEGs that cost what ImageNet's cost to decode.

    Decode time follows the entropy-coded size, so the pixels follow natural images' 1/f
    spectrum plus sensor noise: at 500x375 and quality 90 they average ~108 KB, ImageNet's
    average file size (~110 KB). ``vary`` scales each side by up to +-vary (ImageNet's sizes vary).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    w0, h0 = size
    big = int(max(w0, h0) * (1 + vary)) + 1
    n_field = 1 << int(np.ceil(np.log2(big * 1.5)))
    field = _field(rng, n_field)
    out = []
    for _ in range(n):
        s = 1 + rng.uniform(-vary, vary) if vary else 1.0
        w, h = int(w0 * s), int(h0 * s)
        y, x = rng.integers(0, n_field - h), rng.integers(0, n_field - w)
        px = field[y : y + h, x : x + w] * rng.uniform(35, 60) + rng.uniform(80, 170, 3)
        px += rng.standard_normal(px.shape) * 3
        b = io.BytesIO()
        Image.fromarray(np.clip(px, 0, 255).astype(np.uint8)).save(b, "JPEG", quality=quality)
        out.append(b.getvalue())
    return out


def write_folders(root: str, images: list[bytes], classes: int, val_per_class: int = 1) -> str:
    """ImageNet's folder layout, train/<wnid>/ and val/<wnid>/, images dealt round-robin."""
    wnids = [f"n{10000000 + i:08d}" for i in range(classes)]
    for split in ("train", "val"):
        for w in wnids:
            os.makedirs(os.path.join(root, split, w), exist_ok=True)
    for i, jpg in enumerate(images):
        w = wnids[i % classes]
        split = "val" if i // classes < val_per_class else "train"
        with open(os.path.join(root, split, w, f"{w}_{i}.JPEG"), "wb") as f:
            f.write(jpg)
    return root


# --- timing -----------------------------------------------------------------------------------
def interleaved(contenders: dict, repeats: int) -> dict[str, list[float]]:
    """Run each contender (a callable returning its work count) ``repeats`` times, interleaved.

    Returns name -> list of rates (work per second), one per repeat.
    """
    rates = {name: [] for name in contenders}
    for r in range(repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            work = fn()
            rate = work / (time.perf_counter() - t)
            rates[name].append(rate)
            print(f"  repeat {r + 1}/{repeats} {name}: {rate:,.1f}/s", file=sys.stderr, flush=True)
    return rates


def median(xs) -> float:
    return float(statistics.median(xs))


# --- the record ---------------------------------------------------------------------------------
def machine() -> dict:
    import PIL
    import torch
    import torchvision

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def report(name: str, title: str, rows: list[dict], columns: list[str], extra: dict | None = None) -> dict:
    """Print ``rows`` as a table and write {machine, rows, extra} to OUT/<name>.json."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    record = {
        "benchmark": name,
        "title": title,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "rows": rows,
        **(extra or {}),
    }
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"(written to {path})")
    return record


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
