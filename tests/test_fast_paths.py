"""The fast paths give the plain paths' pixels, within JPEG tolerance.

Speed is measured by benchmarks/, never here: these tests only pin down that what the fast code
computes is what the straightforward code (PIL, torchvision transforms) computes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.common import photo_jpegs
from pipelines.images import prepare_image

from .helpers import write_shard_tar


def _plain_prepare(data: bytes, resize: int, keep_aspect: bool, quality: int = 90) -> Image.Image:
    """The textbook shard step: PIL decode, shorter side to ``resize`` (bilinear), centre crop."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = resize / min(w, h)
    im = im.resize((max(resize, round(w * s)), max(resize, round(h * s))), Image.Resampling.BILINEAR)
    if not keep_aspect:
        left, top = (im.width - resize) // 2, (im.height - resize) // 2
        im = im.crop((left, top, left + resize, top + resize))
    return im


def _px(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize(
    "size", [(500, 375), (375, 500), (333, 500), (1400, 1000), (200, 150), (256, 256)], ids=lambda s: f"{s[0]}x{s[1]}"
)
@pytest.mark.parametrize("keep_aspect", [False, True], ids=["crop", "keep-aspect"])
def test_shard_fast_path_matches_the_plain_pil_path(size, keep_aspect):
    # 1400x1000 takes the scaled-decode (PIL draft) branch, 200x150 upscales, the rest decode
    # through torchvision; odd widths put the centre square half a pixel off the grid.
    for src in photo_jpegs(2, size=size, seed=sum(size)):
        fast = Image.open(io.BytesIO(prepare_image(src, 256, keep_aspect, 90)))
        plain = _plain_prepare(src, 256, keep_aspect)
        assert fast.format == "JPEG" and fast.mode == "RGB" and fast.size == plain.size
        _assert_within_jpeg_tolerance(fast, plain, (size, keep_aspect))


def _assert_within_jpeg_tolerance(fast: Image.Image, plain: Image.Image, what) -> None:
    """``fast`` (a q90 JPEG) may differ from the unencoded ``plain`` pixels by about what a q90
    encode of ``plain`` itself costs (~35-40 dB PSNR on these noisy photo-like images)."""
    diff = np.abs(_px(fast) - _px(plain))
    enc = io.BytesIO()
    plain.save(enc, "JPEG", quality=90)
    own = np.abs(_px(Image.open(enc)) - _px(plain))
    psnr, own_psnr = (10 * np.log10(255**2 / np.mean(d**2)) for d in (diff, own))
    assert psnr > own_psnr - 3, (what, psnr, own_psnr)
    assert diff.mean() < 1.5 * own.mean() + 0.5, (what, diff.mean(), own.mean())


def test_shard_fast_path_keeps_the_plain_paths_quirk_handling():
    """CMYK and greyscale JPEGs decode to the same RGB as PIL's convert; a PNG goes through PIL."""
    base = Image.open(io.BytesIO(photo_jpegs(1, size=(320, 240), seed=7)[0])).convert("RGB")
    for mode, fmt in [("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG")]:
        b = io.BytesIO()
        base.convert(mode).save(b, fmt)
        fast = Image.open(io.BytesIO(prepare_image(b.getvalue(), 128)))
        plain = _plain_prepare(b.getvalue(), 128, False)
        _assert_within_jpeg_tolerance(fast, plain, mode)


def _shard(tmp_path, jpgs: list[bytes]) -> str:
    return write_shard_tar(tmp_path / "val-000000.tar", [(f"k{i:04d}", jpg, i % 3) for i, jpg in enumerate(jpgs)])


def test_loader_batches_match_torchvision_transforms_on_the_same_images(tmp_path):
    """Shards -> decode_jpeg -> uint8 crop -> fused normalisation, against torchvision's
    PIL loader + CenterCrop + ToTensor + Normalize on the same JPEG bytes."""
    import torchvision.transforms as T

    from model import EvalTransform
    from pipelines import data

    stats = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    jpgs = photo_jpegs(6, size=(256, 256), seed=3)
    tf = EvalTransform.from_stats(stats, crop=224)
    loader = data.eval_loader([(_shard(tmp_path, jpgs), len(jpgs))], tf, batch_size=4, num_workers=0)
    ours = torch.cat([tf.photometric(x) for x, _, _ in data.on_device(loader, "cpu")])
    ref_tf = T.Compose([T.CenterCrop(224), T.ToTensor(), T.Normalize(stats["mean"], stats["std"])])
    ref = torch.stack([ref_tf(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpgs])
    assert ours.shape == ref.shape == (6, 3, 224, 224)
    # Both decoders are libjpeg-turbo; allow one grey level of IDCT difference, normalised.
    assert (ours - ref).abs().amax() <= 1 / 255 / min(stats["std"]) + 1e-5


def test_the_codec_loaded_without_the_torchvision_package_gives_torchvision_ios_bytes_and_pixels():
    """Shard workers load torchvision's JPEG ops directly (no models, no torch._dynamo import); the
    bytes and pixels must be exactly the public torchvision.io calls', for every colour layout."""
    from pipelines import data

    direct, public = data._load_image_ops(), data._public_codec()
    assert direct is not None, "this torchvision's image extension could not be loaded directly"
    rgb = np.asarray(Image.open(io.BytesIO(photo_jpegs(1, size=(120, 90))[0])).convert("RGB"))
    for mode in ("RGB", "L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, "JPEG", quality=85)
        jpg = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        pixels = direct[0](jpg)
        assert pixels.shape == (3, 90, 120), mode
        assert torch.equal(pixels, public[0](jpg)), mode
        assert torch.equal(direct[1](pixels, 90), public[1](pixels, 90)), mode
