"""Run a selection of tests N times over and count each test's failures out of N, so that a test
which fails by chance shows here before it reaches CI (where nothing is ever retried).

    python -m tests.flakes --rounds 3                  # the fault and cluster tests (-m fault)
    python -m tests.flakes --rounds 10 -- tests/test_multinode_s3.py -k rotation

Each round is one pytest run over the whole selection, as CI runs it (module fixtures such as a
cluster are shared within a round, started afresh in the next). Each round's output stays
in ``--out`` (default ``flakes/``), with a failed round's temporary files (logs included, data
files over 16 MiB left out) for the failure to be read; the table
goes to stdout and, with every test's outcome per round, to ``OUT/flakes.json``. Exit status 1
when any test failed in any round."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.helpers import RECOVERY

DEFAULT_SELECTION = ["-m", "fault"]
BIG = 16 * 1024**2  # what a failed round's temporary files keep: everything smaller (logs, manifests)


def run_round(k: int, out: Path, selection: list[str]) -> dict[str, dict]:
    """One pytest run; {test id: {"outcome": passed|failed|error|skipped, "seconds": s}}."""
    folder = out / f"round-{k}"
    folder.mkdir(parents=True, exist_ok=True)
    junit = folder / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit2",
        f"--basetemp={folder / 'tmp'}",
        f"--junitxml={junit}",
        *selection,
    ]
    with (folder / "pytest.log").open("w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if not junit.exists():
        raise SystemExit(f"round {k}: pytest wrote no report; its output is in {folder / 'pytest.log'}")
    results = _outcomes(junit)
    _prune(folder / "tmp", clean=not any(r["outcome"] in ("failed", "error") for r in results.values()))
    return results


def _prune(tmp: Path, clean: bool) -> None:
    """A round's temporary files hold gigabytes (checkpoints, shards, S3 volumes): ten rounds of
    the rotation test filled a disk. A clean round keeps none; a failed one keeps its logs and
    every file under BIG bytes."""
    if clean:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    for path in tmp.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size > BIG:
                path.unlink()
        except OSError:
            pass


def _outcomes(junit: Path) -> dict[str, dict]:
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test_id = f"{module}.py::{case.get('name')}"
        tags = {child.tag for child in case}
        outcome = (
            "failed"
            if "failure" in tags
            else "error"
            if "error" in tags
            else "skipped"
            if "skipped" in tags
            else "passed"
        )
        recovery = {
            p.get("name")[len(RECOVERY) :]: float(p.get("value"))
            for p in case.iter("property")
            if p.get("name", "").startswith(RECOVERY)
        }
        results[test_id] = {"outcome": outcome, "seconds": float(case.get("time", 0)), "recovery": recovery}
    return results


def table(rounds: list[dict[str, dict]]) -> tuple[str, bool]:
    """(the table, whether every test passed in every round it ran)."""
    tests = sorted({t for r in rounds for t in r})
    rows, clean = [], True
    for t in tests:
        seen = [r[t] for r in rounds if t in r]
        bad = sum(s["outcome"] in ("failed", "error") for s in seen)
        missing = len(rounds) - len(seen)  # a round that crashed before reaching the test
        clean &= bad == 0 and missing == 0
        ran = [s["seconds"] for s in seen if s["outcome"] != "skipped"]
        median = f"{statistics.median(ran):.0f}" if ran else "-"
        skipped = sum(s["outcome"] == "skipped" for s in seen)
        note = ", ".join(
            x for x in (f"{skipped} skipped" if skipped else "", f"{missing} not run" if missing else "") if x
        )
        rows.append(f"{bad}/{len(rounds)}  {median:>5}  {t}{'  (' + note + ')' if note else ''}")
    head = "failed  median s  test"
    return "\n".join([head, *rows]), clean


def recovery_table(rounds: list[dict[str, dict]]) -> str:
    """Each recovery time the fault tests recorded (``helpers.recovered``): median, least and
    most over the rounds that passed."""
    times: dict[str, list[float]] = {}
    for r in rounds:
        for result in r.values():
            if result["outcome"] == "passed":
                for fault, seconds in result.get("recovery", {}).items():
                    times.setdefault(fault, []).append(seconds)
    rows = [
        f"{statistics.median(v):7.1f}  {min(v):7.1f}  {max(v):7.1f}  {len(v):>2}  {fault}"
        for fault, v in sorted(times.items())
    ]
    return "\n".join(["recovery s: median    least     most   n  fault", *rows]) if rows else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.flakes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="how many times to run the selection (default 3)")
    ap.add_argument("--out", default="flakes", help="where each round's output and temporary files go")
    ap.add_argument("selection", nargs="*", help="pytest arguments after --; default: -m fault")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: must be at least 1")
    out = Path(args.out)
    selection = args.selection or DEFAULT_SELECTION
    rounds, started = [], time.monotonic()
    for k in range(1, args.rounds + 1):
        t0 = time.monotonic()
        rounds.append(run_round(k, out, selection))
        took = time.monotonic() - t0
        failed = sorted(t for t, r in rounds[-1].items() if r["outcome"] in ("failed", "error"))
        left = (time.monotonic() - started) / k * (args.rounds - k)
        print(
            f"round {k}/{args.rounds}: {len(rounds[-1])} tests, {len(failed)} failed, {took:.0f} s"
            f"{f', about {left / 60:.0f} min left' if k < args.rounds else ''}",
            flush=True,
        )
        for t in failed:
            print(f"  failed: {t} (output: {out / f'round-{k}' / 'pytest.log'})", flush=True)
    text, clean = table(rounds)
    print(text)
    print(recovery_table(rounds))
    (out / "flakes.json").write_text(json.dumps({"selection": selection, "rounds": rounds}, indent=1))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
