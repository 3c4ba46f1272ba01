"""The checkpoint format: a round trip, and a file carrying code is refused, not run."""
from __future__ import annotations

import os

import pytest
import torch

from pipelines import checkpoint
from pipelines.common import StageError


class _Payload:
    """Unpickling this runs a command: what a hostile checkpoint in a writable bucket would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "history": [{"val_top1": 0.5}],
             "position": {"epoch": 4, "segments": [[2, 1, 5]], "sums": {"loss": 1.5}}, "stats": {"mean": [0.5] * 3}}
    checkpoint.save(state, str(tmp_path))
    assert checkpoint.exists(str(tmp_path))
    back = checkpoint.load(str(tmp_path))
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert {k: v for k, v in back.items() if k != "model"} == {k: v for k, v in state.items() if k != "model"}


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "extra": _Payload(marker)}, tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(StageError, match="Refused to load .*state.pt.*hostile"):
        checkpoint.load(str(tmp_path))
    assert not marker.exists()


def test_a_folder_without_a_checkpoint_is_named(tmp_path):
    with pytest.raises(StageError, match="holds no state.pt"):
        checkpoint.load(str(tmp_path))
