"""The command line as a user runs it: `python -m libmoe ...`."""

import subprocess
import sys

from libmoe.cli import main
from libmoe.moe import ALGORITHMS
from libmoe.moe.smoke import smoke_train


def run(*args):
    return subprocess.run([sys.executable, "-m", "libmoe", *args], capture_output=True, text=True)


def test_algorithms_lists_the_registry():
    result = run("algorithms")
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == list(ALGORITHMS)


def test_bench_placeholder_trains_and_reports(capsys):
    assert main(["bench", "--steps", "3", "--algorithms", "smoe,dense"]) == 0
    out = capsys.readouterr().out
    assert "smoe" in out and "dense" in out and "ms/step" in out


def test_unknown_algorithm_is_one_line_without_traceback():
    result = run("bench", "--steps", "1", "--algorithms", "smeo")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "unknown MoE algorithm 'smeo'" in result.stderr and "smoe" in result.stderr


def test_every_algorithm_learns_through_its_router():
    rows = smoke_train(steps=25, tokens=128)
    assert [r["algorithm"] for r in rows] == list(ALGORITHMS)
    for r in rows:
        assert r["loss_end"] < 0.9 * r["loss_start"], r
