"""model.transforms: PCA lighting statistics, crop geometry, presets, ten-crop averaging.

.venv/bin/python -m pytest -q tests/test_transforms.py
"""

import pytest
import torch
from torch import nn

from model.transforms import EvalTransform, Lighting, TrainTransform, ten_crop_predict

EIGVAL = torch.tensor([0.2, 0.02, 0.005])  # distinct scales, so mixing up axes shows


def random_rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q  # orthonormal columns, not symmetric: rows-vs-columns mistakes show


STATS = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "eigval": EIGVAL.tolist(),
    "eigvec": random_rotation(0).tolist(),
}
IDENTITY = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # leaves pixel values in 0..1


def coordinate_image(h=256, w=256) -> torch.Tensor:
    """uint8 3xHxW whose channel 0 is the row index, channel 1 the column, channel 2 a constant."""
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    return torch.stack([rows, cols, torch.full((h, w), 7)]).to(torch.uint8)


def decode(x: torch.Tensor) -> torch.Tensor:
    """Undo the 0..1 scaling of a transform run with IDENTITY stats."""
    return (x * 255).round().to(torch.int64)


def window(img, top, left, size, flip=False):
    x = img[:, top : top + size, left : left + size].to(torch.int64)
    return x.flip(-1) if flip else x


def test_lighting_statistics_follow_the_eigenvalues():
    eigvec = random_rotation(1)
    light = Lighting(EIGVAL, eigvec, alphastd=0.1, generator=torch.Generator().manual_seed(0))
    n = 20_000
    img = torch.full((n, 3, 2, 2), 0.5, dtype=torch.float64)
    shift = light(img) - img
    # One colour shift per image, the same at every pixel.
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))
    shift = shift[:, :, 0, 0]
    assert shift.mean(0).abs().max() < 4 * 0.1 * EIGVAL[0] / n**0.5
    # Projected on eigenvector p_i (a column), the shift is alpha_i * lambda_i: std 0.1 * lambda_i.
    proj = shift @ eigvec.double()
    torch.testing.assert_close(proj.std(0), 0.1 * EIGVAL.double(), rtol=0.03, atol=0)
    # Independent draws per image and per direction.
    assert abs(torch.corrcoef(proj.T)[0, 1]) < 0.05


def test_lighting_single_image_and_generator_reproducibility():
    img = torch.rand(3, 8, 8)
    a = Lighting(EIGVAL, random_rotation(1), generator=torch.Generator().manual_seed(3))(img)
    b = Lighting(EIGVAL, random_rotation(1), generator=torch.Generator().manual_seed(3))(img)
    assert a.shape == img.shape and a.dtype == img.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, img)
    assert torch.equal(Lighting(EIGVAL, random_rotation(1), alphastd=0)(img), img)


def test_ten_crop_geometry():
    img = coordinate_image()
    crops = decode(EvalTransform(224, **IDENTITY, ten_crop=True)(img))
    assert crops.shape == (10, 3, 224, 224)
    five = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]  # TL, TR, BL, BR, centre
    for i, (top, left) in enumerate(five):
        assert torch.equal(crops[i], window(img, top, left, 224)), i
        assert torch.equal(crops[5 + i], window(img, top, left, 224, flip=True)), 5 + i


def test_ten_crop_geometry_non_square():
    img = coordinate_image(40, 50)
    crops = decode(EvalTransform(32, **IDENTITY, ten_crop=True)(img))
    expected = [(0, 0), (0, 18), (8, 0), (8, 18), (4, 9)]
    for i, (top, left) in enumerate(expected):
        assert torch.equal(crops[i], window(img, top, left, 32)), i
        assert torch.equal(crops[5 + i], window(img, top, left, 32, flip=True)), 5 + i


def test_eval_centre_crop_is_the_centre_and_normalised():
    img = coordinate_image()
    out = EvalTransform(224, **IDENTITY)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(decode(out), window(img, 16, 16, 224))
    normed = EvalTransform.from_stats(STATS, crop=224)(img)
    mean, std = torch.tensor(STATS["mean"]).view(3, 1, 1), torch.tensor(STATS["std"]).view(3, 1, 1)
    torch.testing.assert_close(normed, (out - mean) / std)


def test_train_transform_shape_dtype_and_crops_are_windows():
    img = coordinate_image()
    out = TrainTransform.from_stats(STATS, crop=224)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    tf = TrainTransform(
        224,
        **IDENTITY,
        eigval=EIGVAL,
        eigvec=random_rotation(0),
        alphastd=0,
        generator=torch.Generator().manual_seed(0),
    )
    flips, tops = set(), set()
    for _ in range(20):
        x = decode(tf(img))
        top, left, flipped = x[0, 0, 0].item(), x[1, 0, 0].item(), bool(x[1, 0, 0] > x[1, 0, -1])
        if flipped:
            left = x[1, 0, -1].item()
        assert torch.equal(x, window(img, top, left, 224, flip=flipped))
        flips.add(flipped)
        tops.add(top)
    assert flips == {True, False}
    assert len(tops) > 5


def test_train_transform_is_reproducible_with_a_generator():
    img = coordinate_image()
    a = TrainTransform.from_stats(STATS, generator=torch.Generator().manual_seed(5))(img)
    b = TrainTransform.from_stats(STATS, generator=torch.Generator().manual_seed(5))(img)
    assert torch.equal(a, b)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="smaller than the 224 px crop"):
        EvalTransform(224, **IDENTITY)(coordinate_image(100, 300))
    with pytest.raises(ValueError, match="uint8"):
        EvalTransform(224, **IDENTITY)(torch.rand(3, 256, 256))
    with pytest.raises(ValueError, match="eigvec"):
        TrainTransform.from_stats({"mean": [0, 0, 0], "std": [1, 1, 1], "eigval": [1, 1, 1]})
    with pytest.raises(ValueError, match="0..255"):
        EvalTransform(224, mean=[124, 116, 104], std=[58, 57, 57])


def test_ten_crop_predict_averages_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    crops = torch.randn(2, 10, 3, 4, 4)
    probs = ten_crop_predict(model, crops)
    assert probs.shape == (2, 5)
    expected = torch.stack([model(c).softmax(-1).mean(0) for c in crops])
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_fused_photometric_equals_the_four_steps_it_replaces():
    """The fast path (one multiply-add per pixel) against /255, Lighting, then normalisation."""
    x = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    tf = TrainTransform.from_stats(STATS, crop=32, alphastd=0.5, generator=torch.Generator().manual_seed(3))
    fast = tf.photometric(x)
    reference_lighting = Lighting(STATS["eigval"], STATS["eigvec"], 0.5, torch.Generator().manual_seed(3))
    mean, std = torch.tensor(STATS["mean"]).view(3, 1, 1), torch.tensor(STATS["std"]).view(3, 1, 1)
    slow = (reference_lighting(x.float() / 255) - mean) / std
    assert fast.dtype == torch.float32 and fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    assert (fast - (x.float() / 255 - mean) / std).abs().amax() > 0.01  # the lighting did shift colours
    reused = torch.full(x.shape, float("nan")).contiguous(memory_format=torch.channels_last)
    again = TrainTransform.from_stats(STATS, crop=32, alphastd=0.5, generator=torch.Generator().manual_seed(3))
    assert again.photometric(x, out=reused) is reused  # the training loop's CPU buffer reuse
    torch.testing.assert_close(reused, fast, rtol=0, atol=0)
    one = tf.photometric(x[0])
    assert one.shape == (3, 40, 40)
    crops = torch.randint(0, 256, (2, 10, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(
        EvalTransform.from_stats(STATS, crop=8).photometric(crops),
        (crops.float() / 255 - mean) / std,
        rtol=0,
        atol=1e-5,
    )
