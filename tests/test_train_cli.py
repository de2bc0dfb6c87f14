"""The README's train command, as a user runs it: it trains, logs, checkpoints, and resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xla_flags import COMPILE

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(*overrides):
    return subprocess.run([sys.executable, "-m", "jaxlm.train", "--config", "configs/tiny.yaml",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "XLA_FLAGS": COMPILE})  # tiny.yaml asks for 8 devices


def test_readme_command_runs_logs_and_resumes(tmp_path):
    args = [f"train.run_dir={tmp_path}", "train.steps=4", "checkpoint.every_steps=2",
            "log.every_steps=2", "train.eval_every=2"]
    first = train_cmd(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "mesh data=4 x fsdp=2" in first.stdout
    assert "config (changed from defaults):" in first.stdout
    assert "model.d_model: 256 -> 128" in first.stdout and "train.steps: 1000 -> 4" in first.stdout
    assert "train step compiled in" in first.stdout
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(r["tokens_per_sec"] > 0 and r["step_time_s"] > 0 for r in logged)
    assert "eval_loss" in logged[-1]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    assert any("compile_time_s" in r for r in rows)
    assert (tmp_path / "config.yaml").read_text().startswith("model:")
    assert list((tmp_path / "tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]

    again = train_cmd(*args[:1], "train.steps=6", *args[2:])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 4" in again.stdout
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]


@pytest.mark.slow
def test_readme_command_learns(tmp_path):
    """The README's run, cut to 120 of its 300 steps, ends with eval loss well below where it
    starts (the whole run: 6.26 -> 2.06 at step 100 -> 1.64 at 300, on this machine; 45 s)."""
    out = train_cmd(f"train.run_dir={tmp_path}", "train.steps=120", "train.eval_every=40",
                    "checkpoint.enabled=false")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert rows[1]["step"] == 0 and evals[0] > 5.0, rows[:2]  # untrained: ~ln(259 byte ids)
    assert evals[-1] < 2.5, evals
