"""The paper's data augmentation and test-time crops (section 4.1), as two preset classes.

    stats = json.load(open("ROOT/stats.json"))
    train_tf = TrainTransform.from_stats(stats, crop=224)
    eval_tf = EvalTransform.from_stats(stats, crop=224, ten_crop=True)
    x = train_tf(torchvision.io.decode_jpeg(data))        # uint8 3x256x256 -> float 3x224x224

Units: inputs are uint8 CHW tensors (what torchvision.io.decode_jpeg returns). Every statistic
(mean, std, eigval, eigvec) is for pixel values scaled to 0..1, and eigvec holds the
eigenvectors as COLUMNS (what numpy.linalg.eigh returns), so eigvec[:, i] goes with eigval[i].

geometric(img) = apply(img, params(h, w)): params() makes every random draw from the image's
size alone and apply() cuts the patches on whatever device the image is on, so a loader can
draw in its workers and decode + crop a whole batch on the GPU (pipelines/data.py, decode="device").
"""

import torch
from torch import nn


def _as3(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.shape != (3,):
        raise ValueError(f"{name} must have 3 values (R, G, B), got shape {tuple(t.shape)}.")
    return t


def _require(stats: dict, keys) -> None:
    missing = [k for k in keys if k not in stats]
    if missing:
        raise ValueError(
            f"stats is missing {', '.join(missing)}; expected keys {', '.join(keys)} "
            "(as written to ROOT/stats.json by the stats stage)."
        )


class Lighting:
    """PCA colour augmentation (section 4.1): add sum_i alpha_i * lambda_i * p_i to every pixel.

    alpha_i ~ N(0, alphastd) is drawn once per image per call, so a batch N x 3 x H x W gets N
    independent draws and one 3 x H x W image gets one. Apply to float images in 0..1, before
    normalisation (that is the scale eigval/eigvec were computed in). The result is not clamped:
    the paper does not clamp, and the shift is small (0.1 * the largest eigenvalue).
    """

    def __init__(self, eigval, eigvec, alphastd: float = 0.1, generator: torch.Generator | None = None):
        self.eigval = _as3(eigval, "eigval")
        self.eigvec = torch.as_tensor(eigvec, dtype=torch.float32)
        if self.eigvec.shape != (3, 3):
            raise ValueError(f"eigvec must be 3x3 (eigenvectors as columns), got {tuple(self.eigvec.shape)}.")
        self.alphastd = alphastd
        self.generator = generator

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not img.is_floating_point() or img.ndim not in (3, 4) or img.shape[-3] != 3:
            raise ValueError(
                f"Lighting expects a float 3xHxW image or Nx3xHxW batch in 0..1, "
                f"got {img.dtype} of shape {tuple(img.shape)}."
            )
        if self.alphastd == 0:
            return img
        shift = self.shift(img.shape[0] if img.ndim == 4 else 1, img.device).to(img.dtype)[:, :, None, None]
        return img + (shift[0] if img.ndim == 3 else shift)

    def shift(self, n: int, device) -> torch.Tensor:
        """The N x 3 RGB offsets for N images (zeros when alphastd is 0, without a random draw)."""
        if self.alphastd == 0:
            return torch.zeros(n, 3, device=device)
        g = self.generator
        alpha = torch.randn(n, 3, generator=g, device=g.device if g is not None else device)
        alpha = alpha.to(device) * self.alphastd
        # Row j of (alpha * lambda) @ P^T is sum_i alpha_ji * lambda_i * p_i, with p_i = P[:, i].
        return (alpha * self.eigval.to(device)) @ self.eigvec.to(device).T


class _Normalize:
    """(x - mean) / std per channel, for CHW or NCHW float tensors in 0..1."""

    def __init__(self, mean, std):
        self.mean, self.std = _as3(mean, "mean"), _as3(std, "std")
        if (self.mean > 1).any():
            raise ValueError(
                f"mean {self.mean.tolist()} looks like 0..255 pixel values; "
                "these transforms expect statistics of pixels scaled to 0..1."
            )
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {self.std.tolist()}.")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)[:, None, None]) / self.std.to(x.device)[:, None, None]

    def from_uint8(
        self, x: torch.Tensor, shift: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 pixels -> normalise(x / 255 + shift) as one multiply-add per pixel.

        The same arithmetic as /255, Lighting and __call__ in sequence, fused:
        x * 1/(255 std) + (shift - mean)/std. ``shift`` is N x 3 for an N x 3 x H x W batch.
        ``out``: a float32 tensor of x's shape to write into. On a CPU a fresh 77 MB batch costs
        more in page faults than the arithmetic (48 ms against 6 ms to fill a reused one, batch
        128 at 224 px); the training loop passes the previous step's batch back.
        """
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if out is None or out.shape != x.shape or out.device != x.device:
            out = torch.empty_like(x, dtype=torch.float32)  # keeps channels_last
        out.copy_(x).mul_((1 / (255 * std))[:, None, None])
        if shift is None:
            return out.sub_((mean / std)[:, None, None])
        return out.add_(((shift.to(x.device) - mean) / std)[:, :, None, None])


def _check_size(h: int, w: int, crop: int) -> None:
    if h < crop or w < crop:
        raise ValueError(
            f"image is {h}x{w}, smaller than the {crop} px crop; the shards should hold 256x256 images (section 2)."
        )


def _check_image(img: torch.Tensor, crop: int) -> tuple[int, int]:
    if img.dtype != torch.uint8 or img.ndim != 3:
        raise ValueError(
            f"expected a uint8 CxHxW image (torchvision.io.decode_jpeg), got {img.dtype} of shape {tuple(img.shape)}."
        )
    h, w = img.shape[-2:]
    _check_size(h, w, crop)
    return h, w


class TrainTransform:
    """Section 4.1: a random crop x crop patch, a random horizontal reflection, PCA lighting.

    uint8 3xHxW (256x256 from the shards) -> normalised float32 3 x crop x crop. Pass a
    (CPU) torch.Generator to make the crops, flips and lighting reproducible.
    """

    def __init__(
        self,
        crop: int = 224,
        *,
        mean,
        std,
        eigval,
        eigvec,
        alphastd: float = 0.1,
        generator: torch.Generator | None = None,
    ):
        self.crop = crop
        self.generator = generator
        self.lighting = Lighting(eigval, eigvec, alphastd, generator)
        self.normalize = _Normalize(mean, std)

    @classmethod
    def from_stats(cls, stats: dict, crop: int = 224, **kwargs) -> "TrainTransform":
        _require(stats, ("mean", "std", "eigval", "eigvec"))
        return cls(crop, mean=stats["mean"], std=stats["std"], eigval=stats["eigval"], eigvec=stats["eigvec"], **kwargs)

    def geometric(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 3xHxW -> uint8 3 x crop x crop: the random patch and reflection.

        Split from photometric() so data loader workers do only this cheap uint8 step and the
        float work runs on whole batches on the device (4x less data to move than float32).
        """
        h, w = _check_image(img, self.crop)
        return self.apply(img, self.params(h, w, generator))

    def params(self, h: int, w: int, generator: torch.Generator | None = None) -> tuple[int, int, bool]:
        """(top, left, flip) for an h x w image: geometric()'s random draws, without the pixels.

        Split out so a loader worker can draw them from the JPEG header alone and the decode
        and crop can happen later on the GPU; same draws, same order,
        so either path gives the same crops for the same generator.
        """
        _check_size(h, w, self.crop)
        g, c = generator if generator is not None else self.generator, self.crop
        top = int(torch.randint(h - c + 1, (1,), generator=g))
        left = int(torch.randint(w - c + 1, (1,), generator=g))
        return top, left, float(torch.rand(1, generator=g)) < 0.5

    def apply(self, img: torch.Tensor, params: tuple[int, int, bool]) -> torch.Tensor:
        """uint8 3xHxW (on any device) -> the crop x crop patch that ``params`` names."""
        _check_image(img, self.crop)
        (top, left, flip), c = params, self.crop
        x = img[:, top : top + c, left : left + c]
        return x.flip(-1) if flip else x

    def photometric(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 3xHxW or Nx3xHxW -> float32 in 0..1, PCA lighting, normalised (into ``out``
        when given and of the right shape: see _Normalize.from_uint8)."""
        if x.ndim == 3:
            return self.photometric(x[None])[0]
        return self.normalize.from_uint8(x, self.lighting.shift(x.shape[0], x.device), out)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.photometric(self.geometric(img))  # crop first: fewer pixels to convert


class EvalTransform:
    """Centre crop, or the paper's ten test patches (section 4.1), normalised.

    uint8 3xHxW -> float32 3 x crop x crop, or with ten_crop=True 10 x 3 x crop x crop in the
    order: top-left, top-right, bottom-left, bottom-right, centre, then the horizontal mirror of
    each of those five in the same order (crop 5 + i is crop i flipped). Note torchvision's
    ten_crop orders its second five differently (crops of the mirrored image, so its sixth is
    the mirror of the top-right patch); for averaging predictions the order does not matter.
    """

    def __init__(self, crop: int = 224, *, mean, std, ten_crop: bool = False):
        self.crop, self.ten_crop = crop, ten_crop
        self.normalize = _Normalize(mean, std)

    @classmethod
    def from_stats(cls, stats: dict, crop: int = 224, **kwargs) -> "EvalTransform":
        _require(stats, ("mean", "std"))
        return cls(crop, mean=stats["mean"], std=stats["std"], **kwargs)

    def geometric(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 3xHxW -> uint8 3 x crop x crop, or 10 x 3 x crop x crop with ten_crop.

        ``generator`` is unused (evaluation is deterministic); it keeps the signature of
        TrainTransform.geometric so a loader can call either."""
        h, w = _check_image(img, self.crop)
        return self.apply(img, self.params(h, w, generator))

    def params(self, h: int, w: int, generator: torch.Generator | None = None) -> tuple:
        """No parameters: the patches depend only on the image's size, which apply() reads
        from the image itself. Checks the size, as TrainTransform.params does."""
        _check_size(h, w, self.crop)
        return ()

    def apply(self, img: torch.Tensor, params: tuple = ()) -> torch.Tensor:
        """uint8 3xHxW (on any device) -> the centre patch, or the ten patches."""
        h, w = _check_image(img, self.crop)
        c = self.crop
        top, left = (h - c) // 2, (w - c) // 2
        if not self.ten_crop:
            return img[:, top : top + c, left : left + c]
        five = torch.stack(
            [
                img[:, :c, :c],
                img[:, :c, w - c :],
                img[:, h - c :, :c],
                img[:, h - c :, w - c :],
                img[:, top : top + c, left : left + c],
            ]
        )
        return torch.cat([five, five.flip(-1)])

    def photometric(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 crops (any leading dims) -> normalised float32."""
        return self.normalize.from_uint8(x)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.photometric(self.geometric(img))


def ten_crop_predict(
    model: nn.Module, crops: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """N x K x C x H x W crops (K = 10 from EvalTransform) -> N x classes mean softmax.

    Section 4.1: "averaging the predictions made by the network's softmax layer on the ten
    patches". Call it under torch.no_grad() / inference_mode and model.eval().
    ``memory_format``: the layout of the N*K batch the model sees (torch.channels_last on GPUs).
    """
    if crops.ndim != 5:
        raise ValueError(f"expected N x K x C x H x W crops, got shape {tuple(crops.shape)}.")
    n, k = crops.shape[:2]
    logits = model(crops.flatten(0, 1).contiguous(memory_format=memory_format))
    # float(): average probabilities in float32 even under bf16 autocast.
    return logits.float().softmax(dim=-1).view(n, k, -1).mean(dim=1)
