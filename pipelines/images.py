"""Image operations the shard stage and the served model share: source bytes -> the RGB pixels
a shard holds (decode, shorter side to ``resize``, the central square), and the shards' JPEG.
Both import this module, so a model sees a photo exactly as training saw its shard.
"""

from __future__ import annotations

import io
import warnings

MIN_SIDE = 8  # smaller sources are icons or damage, not photos: upscaling them to 256 is noise


def prepare_image(data: bytes, resize: int = 256, keep_aspect: bool = False, quality: int = 90) -> bytes:
    """Source bytes -> an RGB baseline JPEG, resized as the paper does (section 2).

    Raises on anything that is not a decodable image; the caller quarantines it.
    Speed (benchmarks/shard.py, its two floor rows): JPEGs decode through torchvision
    (libjpeg-turbo, straight to a tensor: no PIL image object, no array copy) unless PIL's
    1/2-1/8 scaled decoding applies; torch's uint8 antialiased bilinear resize is about twice
    PIL's speed on one core. Geometry as the plain PIL path: resize, then crop the centre.
    """
    from .data import encode_jpeg

    return encode_jpeg(resized_rgb(data, resize, keep_aspect), quality).numpy().tobytes()


def resized_rgb(data: bytes, resize: int = 256, keep_aspect: bool = False):
    """Image bytes -> RGB 3 x H x W uint8, shorter side ``resize``, the central square unless
    ``keep_aspect``: the pixels a shard holds (before JPEG), and what the logged model does first."""
    from PIL import Image

    with warnings.catch_warnings():
        # A header claiming a huge size is a decompression bomb: refuse it rather than allocate.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))  # reads the header only
        w, h = im.size
        if min(w, h) < MIN_SIDE:
            raise ValueError(f"image is {w}x{h}; sides under {MIN_SIDE} px are not usable photos")
        x = _decode_rgb(im, data, _target(w, h, resize))  # 3 x H x W uint8
    return resize_rgb(x, resize, keep_aspect)


def _target(w: int, h: int, resize: int) -> tuple[int, int]:
    scale = resize / min(w, h)
    return max(resize, round(w * scale)), max(resize, round(h * scale))


def resize_rgb(x, resize: int = 256, keep_aspect: bool = False):
    """RGB 3 x H x W uint8 -> shorter side ``resize`` (antialiased bilinear), then the central
    ``resize`` square unless ``keep_aspect``. An image already that size comes back unchanged."""
    import torch

    size = _target(x.shape[2], x.shape[1], resize)
    if (x.shape[2], x.shape[1]) != size:
        x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # torch's fast uint8 path
        x = torch.nn.functional.interpolate(
            x, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False
        )[0]
    if not keep_aspect:
        left, top = (size[0] - resize) // 2, (size[1] - resize) // 2
        x = x[:, top : top + resize, left : left + resize]
    return x.contiguous()


def _decode_rgb(im, data: bytes, size: tuple[int, int]):
    """Decode to RGB as a 3 x H x W uint8 tensor.

    EXIF orientation is ignored on purpose: ImageNet's labels and every reference pipeline
    (torchvision's PIL loader) use the pixels as stored.
    """
    import numpy as np
    import torch

    if im.format == "JPEG" and (im.size[0] < 2 * size[0] or im.size[1] < 2 * size[1]):
        from .data import decode_rgb

        try:  # CMYK and greyscale come out as the same RGB as PIL's convert (tested)
            return decode_rgb(data)
        except RuntimeError:
            pass  # damaged or unusual (12-bit, arithmetic coding): PIL decodes it or says why not
    # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target size.
    # That skips most of the IDCT work for large photos.
    im.draft("RGB", size)
    rgb = np.array(im.convert("RGB"))  # CMYK, greyscale, palette, PNG: all become 3-channel RGB
    return torch.from_numpy(rgb).permute(2, 0, 1)


def decode_problem(e: Exception) -> str:
    """A reject reason for people, stable across runs (no object addresses)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image: no known image format in the bytes"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a decompression bomb: {e}"
    if "truncat" in str(e).lower():  # PIL says 'image file is truncated' or 'Truncated File Read'
        return f"truncated image: the file ends before its image data does ({e})"
    return f"cannot decode: {type(e).__name__}: {e}"
