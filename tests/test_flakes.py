"""The flake finder (`make flakes`): a test that fails in one round of three is counted 1/3,
a steady one 0/3, the run's exit status says that something failed, and only a failed round
keeps temporary files (its small ones)."""

from __future__ import annotations

import json

from tests import flakes

SOMETIMES = """
from pathlib import Path

ROUNDS = Path(__file__).with_name("rounds")


def test_steady(record_property):
    record_property("recovery_s: a fault", 1.5)  # as helpers.recovered records one


def test_fails_in_the_second_round(tmp_path):
    (tmp_path / "big.bin").write_bytes(bytes(17 * 1024**2))  # a checkpoint's worth, say
    (tmp_path / "small.log").write_text("what happened")
    n = int(ROUNDS.read_text()) + 1 if ROUNDS.exists() else 1
    ROUNDS.write_text(str(n))
    assert n != 2
"""


def test_a_test_failing_in_one_round_of_three_is_counted_once(tmp_path, capsys):
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "test_sometimes.py").write_text(SOMETIMES)
    out = tmp_path / "out"
    # --rootdir: test ids are relative to it, and without an ini file pytest would pick one by
    # the working directory (the repository here, /tmp in a clone under /tmp)
    suite = str(tmp_path / "suite")
    status = flakes.main(["--rounds", "3", "--out", str(out), "--", f"--rootdir={suite}", suite])
    printed = capsys.readouterr().out
    assert status == 1, printed
    rows = {
        line.split()[-1]: line.split()[0] for line in printed.splitlines() if "::" in line and "failed:" not in line
    }
    assert rows == {"test_sometimes.py::test_fails_in_the_second_round": "1/3", "test_sometimes.py::test_steady": "0/3"}
    assert "round 2/3: 2 tests, 1 failed" in printed
    [recovery] = [line.split() for line in printed.splitlines() if line.endswith("a fault")]
    assert recovery == ["1.5", "1.5", "1.5", "3", "a", "fault"]  # median, least, most over 3 rounds
    recorded = json.loads((out / "flakes.json").read_text())["rounds"]
    assert [r["test_sometimes.py::test_fails_in_the_second_round"]["outcome"] for r in recorded] == [
        "passed",
        "failed",
        "passed",
    ]
    assert (out / "round-2" / "pytest.log").read_text().count("assert 2 != 2") >= 1
    # Temporary files: none from a clean round; a failed round's logs, not its big files.
    assert not (out / "round-1" / "tmp").exists() and not (out / "round-3" / "tmp").exists()
    kept = {p.name for p in (out / "round-2" / "tmp").rglob("*") if p.is_file()}
    assert "small.log" in kept and "big.bin" not in kept
