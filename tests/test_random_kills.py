"""benchmarks/faults.py in small: a run killed at random moments (SIGKILL or SIGTERM, during
startup, steps and checkpoint saves) several times in a row, then finished by the same command,
ends with exactly the uninterrupted run's losses and final state."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_random_kills_in_a_row_end_where_an_uninterrupted_run_ends(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/faults.py", "--kills", "4", "--trials", "1",
                        "--steps", "40", "--seed", "1", "--workdir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    lines = p.stdout.strip().splitlines()
    trial, summary = json.loads(lines[-2]), json.loads(lines[-1])
    assert summary["identical"] == 1 and summary["tracebacks"] == 0, summary
    assert sum(trial["outcomes"].values()) == 4
    assert trial["resumed_from"][-1]  # the last launch did resume from a checkpoint
