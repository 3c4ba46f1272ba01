"""An image -> the model's answer: its crop as the shards would give it, the top 5, one row.

Shared by the MLflow model (pipelines/classifier.py), `predict` and the bulk prediction's Ray
tasks and actors, which import this and not MLflow (a second of CPU in every Ray worker).
"""

from __future__ import annotations

TOP = 5


def classify(net, images: list, geometry: dict, classes: list[dict], stats: dict, batch: int = 64) -> list[dict]:
    """Images (bytes or H x W x 3 uint8 arrays) -> one row each: class_id, wnid, name, probability,
    top5 ids and probabilities, and ``error``: "" for an image, else why the input is not one (a
    damaged file, a text file): that row has no class (-1), and the other images are answered."""
    import torch

    import model

    transform = model.EvalTransform.from_stats(stats, crop=geometry["crop"])
    rows = []
    for start in range(0, len(images), batch):
        found, errors = crops(images[start : start + batch], transform, geometry)
        answers = iter(zip(*top5(net, torch.stack(found), transform)) if found else ())
        rows += [row(*next(answers), classes) if error is None else no_answer(error) for error in errors]
    return rows


def top5(net, crops, transform) -> tuple[list, list]:
    """uint8 crops (N x 3 x H x W, on the net's device) -> per crop its 5 likeliest classes'
    probabilities and ids, likeliest first."""
    import torch

    with torch.inference_mode():
        probs = net(transform.photometric(crops)).float().softmax(-1)
    top_p, top_i = probs.topk(min(TOP, probs.shape[1]), dim=1)
    return top_p.tolist(), top_i.tolist()


def crops(images: list, transform, geometry: dict) -> tuple[list, list]:
    """The crops of the inputs that are images, and per input None or why it is not one."""
    from pipelines.images import decode_problem

    found, errors = [], []
    for image in images:
        try:
            found.append(transform.geometric(_pixels(image, geometry)))
            errors.append(None)
        except ValueError as e:  # not an RGB array, or a picture too small to be a photo
            errors.append(str(e))
        except Exception as e:  # noqa: BLE001 - whatever the decoder says of these bytes, said per image
            errors.append(decode_problem(e))
    return found, errors


def row(p: list[float], i: list[int], classes: list[dict]) -> dict:
    c = classes[i[0]]
    return {
        "class_id": i[0],
        "wnid": c["wnid"],
        "name": c["name"],
        "probability": p[0],
        "top5_class_ids": i,
        "top5_wnids": [classes[k]["wnid"] for k in i],
        "top5_names": [classes[k]["name"] for k in i],
        "top5_probabilities": p,
        "error": "",
    }


def no_answer(error: str) -> dict:
    return {
        "class_id": -1,
        "wnid": "",
        "name": "",
        "probability": 0.0,
        "top5_class_ids": [],
        "top5_wnids": [],
        "top5_names": [],
        "top5_probabilities": [],
        "error": error,
    }


def _pixels(image, geometry: dict):
    """One input -> the 3 x H x W uint8 the shards would hold: bytes are decoded, an H x W x 3
    uint8 array is taken as RGB pixels. Anything else is refused by name, not guessed at."""
    import numpy as np
    import torch

    from pipelines.images import resize_rgb, resized_rgb

    if isinstance(image, (bytes, bytearray, memoryview)):
        return resized_rgb(bytes(image), geometry["resize"], geometry["keep_aspect"])
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(
            f"an image must be encoded bytes or an RGB uint8 array of shape H x W x 3; "
            f"got {type(image).__name__} {a.dtype} {a.shape}"
        )
    x = torch.from_numpy(a.copy()).permute(2, 0, 1)  # a copy: the caller's array may be read-only
    return resize_rgb(x, geometry["resize"], geometry["keep_aspect"])
