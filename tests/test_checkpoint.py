"""The checkpoint format: a round trip, and a file carrying code is refused, not run."""

from __future__ import annotations

import os

import pytest
import torch

from pipelines import checkpoint
from pipelines.errors import StageError


class _Payload:
    """Unpickling this runs a command: what a hostile checkpoint in a writable bucket would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    state = {
        "model": {"w": torch.arange(6.0).view(2, 3)},
        "epoch": 3,
        "history": [{"val_top1": 0.5}],
        "position": {"epoch": 4, "segments": [[2, 1, 5]], "sums": {"loss": 1.5}},
        "stats": {"mean": [0.5] * 3},
    }
    checkpoint.save(state, str(tmp_path))
    assert checkpoint.exists(str(tmp_path))
    back = checkpoint.load(str(tmp_path))
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert {k: v for k, v in back.items() if k != "model"} == {k: v for k, v in state.items() if k != "model"}


def test_a_checkpoint_serialized_in_memory_loads_and_verifies_as_a_saved_one(tmp_path):
    """What an S3 checkpoint uploads (state.pt's bytes and their checksum, never written to the
    local disk) loads as a saved one does, checked against its checksum; one byte changed and
    load names it damaged."""
    state = {"model": {"w": torch.arange(6.0)}, "epoch": 1, "position": {"epoch": 2, "segments": [], "sums": None}}
    data, checksum = checkpoint.serialize(state)
    (tmp_path / checkpoint.STATE_FILE).write_bytes(data.getvalue())
    (tmp_path / checkpoint.CHECKSUM_FILE).write_text(checksum)
    back = checkpoint.load(str(tmp_path))
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["position"] == state["position"]
    changed = bytearray(data.getvalue())
    changed[len(changed) // 2] ^= 1
    (tmp_path / checkpoint.STATE_FILE).write_bytes(bytes(changed))
    with pytest.raises(checkpoint.Damaged, match="is damaged: its sha256"):
        checkpoint.load(str(tmp_path))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "extra": _Payload(marker)}, tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(StageError, match="Refused to load .*state.pt.*hostile"):
        checkpoint.load(str(tmp_path))
    assert not marker.exists()


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(StageError, match="holds no state.pt"):
        checkpoint.load(str(tmp_path))


@pytest.mark.parametrize("arch", ["alexnet2012", "alexnet-torchvision"])
def test_the_model_from_a_saved_checkpoint_is_the_trained_one(arch, tmp_path):
    """Built on the meta device and given the file's tensors: every parameter the saved one,
    on the CPU, the same logits; a state missing a weight is refused, not left uninitialised."""
    import model

    torch.manual_seed(0)
    net = model.build(arch, 10, "kaiming").eval()
    checkpoint.save({"model": net.state_dict(), "config": {"arch": arch, "num_classes": 10}}, str(tmp_path))
    back = checkpoint.model_from_state(checkpoint.load(str(tmp_path))).eval()
    for (name, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert b.device.type == "cpu" and torch.equal(a, b), name
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(net(x), back(x))
    partial = {k: v for k, v in net.state_dict().items() if not k.endswith("bias")}
    with pytest.raises(RuntimeError, match="Missing key"):
        checkpoint.model_from_state({"model": partial, "config": {"arch": arch, "num_classes": 10}})


def test_a_model_logged_with_an_older_model_package_still_loads(tmp_path, monkeypatch):
    """An MLflow model carries the model/ code it was logged with: its build() may predate the
    device argument. Loading must still give the saved weights."""
    import model

    torch.manual_seed(0)
    net = model.build("alexnet2012", 10, "kaiming").eval()
    state = {"model": net.state_dict(), "config": {"arch": "alexnet2012", "num_classes": 10}}
    newer = model.build
    monkeypatch.setattr(model, "build", lambda arch, num_classes, init="paper": newer(arch, num_classes, init))
    back = checkpoint.model_from_state(state).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(net(x), back(x))


def test_a_checkpoint_changed_or_cut_short_is_named_damaged(tmp_path):
    """The checksum written with state.pt catches a change that keeps its size; a file without
    one (older checkpoints) cut short is damaged too; never a torch traceback."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    checkpoint.save({"model": {"w": torch.arange(100_000.0)}, "epoch": 1}, str(folder))
    path = folder / checkpoint.STATE_FILE
    good = path.read_bytes()
    changed = bytearray(good)
    changed[len(good) // 2] ^= 0xFF  # one byte inside the tensor's data: the zip still reads
    path.write_bytes(bytes(changed))
    with pytest.raises(checkpoint.Damaged, match="is damaged: its sha256 is"):
        checkpoint.load(str(folder))
    (folder / checkpoint.CHECKSUM_FILE).unlink()
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(checkpoint.Damaged, match="is damaged"):
        checkpoint.load(str(folder))
    path.write_bytes(good)
    assert checkpoint.load(str(folder))["epoch"] == 1
