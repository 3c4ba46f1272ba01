"""The checkpoint format, in one place: training writes it, training and evaluation read it.

A checkpoint is a folder (local or s3://) holding ``state.pt``:
    model, optimizer, scheduler   state dicts (the model without its DDP wrapper)
    epoch                         the last epoch finished (0 before the first)
    position                      where the data plan stands: {"epoch": e, "segments": [[world,
                                  loader workers, steps done], ...], "sums": the partial epoch's
                                  metric sums} (segments empty at an epoch boundary)
    history                       every finished epoch's metrics
    config, stats, saved_at       what evaluation needs to rebuild the model and its transforms
Loaded with ``weights_only=True``: tensors and plain Python values only, so a checkpoint from a
bucket cannot run code in the process that loads it.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile

from . import storage
from .errors import StageError

STATE_FILE = "state.pt"
CHECKSUM_FILE = "state.pt.sha256"  # "sha256:<hex>" of state.pt, written with it


class Damaged(StageError):
    """A checkpoint whose bytes are not the ones written (truncated, changed), or unreadable."""


def save(state: dict, folder: str) -> str:
    """Write ``state`` into a local folder (the run's own, or one Ray Train uploads from), with its
    checksum beside it; returns the file."""
    import torch

    path = os.path.join(folder, STATE_FILE)
    torch.save(state, path + ".partial")
    with open(os.path.join(folder, CHECKSUM_FILE), "w") as f:
        f.write(_sha256(open(path + ".partial", "rb")))
    os.replace(path + ".partial", path)  # a process killed mid-write leaves no file by the name loaders look for
    return path


def serialize(state: dict) -> tuple[io.BytesIO, str]:
    """``state`` as the bytes of state.pt and their checksum, in memory: a checkpoint bound for
    S3 never touches the local disk (0.5 GB written there took ~4.5 s on a disk of ~100 MB/s,
    and was read back to be hashed and uploaded)."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf, f"sha256:{hashlib.sha256(buf.getbuffer()).hexdigest()}"


def upload(data: io.BytesIO, checksum: str, url: str) -> None:
    """A serialized checkpoint to the folder ``url`` (s3://), its state before its checksum.
    Each object is uploaded whole or not at all, and a failure raises here, where the caller
    sees it."""
    storage.upload(storage.join(url, STATE_FILE), data)
    storage.upload(storage.join(url, CHECKSUM_FILE), io.BytesIO(checksum.encode()))


def _sha256(f) -> str:
    with f:
        sha = hashlib.sha256()
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return f"sha256:{sha.hexdigest()}"


def _verify(folder: str, url: str, data: bytes | None) -> None:
    """The file's bytes are the ones written (checkpoints from before checksums: nothing to compare)."""
    sidecar = storage.join(folder, CHECKSUM_FILE)
    if not storage.exists(sidecar):
        return
    written = storage.read_bytes(sidecar).decode().strip()
    found = _sha256(io.BytesIO(data) if data is not None else open(url, "rb"))
    if found != written:
        raise Damaged(f"'{url}' is damaged: its sha256 is {found[7:19]}..., it was written as {written[7:19]}...")


def exists(folder: str) -> bool:
    return storage.exists(storage.join(folder, STATE_FILE))


def load(folder: str) -> dict:
    """A checkpoint's state, from a local folder or an s3:// one, once its bytes are checked
    against the checksum written with them; a damaged one raises Damaged, naming it."""
    import torch

    url = storage.join(folder, STATE_FILE)
    if not storage.exists(url):
        raise StageError(f"'{folder}' holds no {STATE_FILE}: not a checkpoint of this project.")
    import pickle

    # A local file is mapped, not read into memory: a tensor's bytes are read when it is used.
    # Checkpoints are written once into new folders, never rewritten in place.
    data = storage.read_bytes(url) if storage.is_s3(url) else None
    _verify(folder, url, data)
    source, mapped = (url, True) if data is None else (io.BytesIO(data), False)
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mapped)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:  # no checksum to compare (older), and cut short
        raise Damaged(f"'{url}' is damaged: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from e
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, which would run whatever the file holds.
        raise StageError(
            f"Refused to load '{url}': it holds more than tensors and plain values (a pickled "
            f"object or code: {str(e).splitlines()[-1][:200]}). Checkpoints of this project never "
            "do; if the file came from a bucket others can write, treat it as hostile."
        ) from e


def model_from_state(state: dict):
    import model

    c = state["config"]
    # Built on the meta device (shapes, no memory), then given the state's tensors: initialising
    # 61M weights only to overwrite them took ~0.5 s on 2 cores, every evaluation and model load.
    try:
        net = model.build(c["arch"], c["num_classes"], init=None, device="meta")
    except TypeError:  # a logged MLflow model brings the model/ code it was logged with; older
        net = model.build(c["arch"], c["num_classes"], init="kaiming")  # builds have no device
    net.load_state_dict(state["model"], assign=True)  # strict: every weight, the right shapes
    return net
