"""`python -m jaxlm.train` as a subprocess, for the fault tests: a tiny model, a compilation cache
shared by every launch (so each costs the import and a cache hit, not a compile), and readers for
what a run leaves in its directory."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
# constant lr: train.steps does not enter the compiled step, so runs of any length share it
CLI = [*TINY, "optim.schedule=constant", "log.every_steps=1"]


def cli_args(run_dir, cache, *overrides):
    return [*CLI, f"train.run_dir={run_dir}", f"runtime.compilation_cache={cache}", *overrides]


def start(run_dir, cache, *overrides, env=None, prefix=()):
    """Popen of the CLI in its own session (so a test can signal it and nothing else)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "jaxlm.train", *cli_args(run_dir, cache, *overrides)],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc, timeout=180):
    """(returncode, stdout, stderr); kills the process on timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout} s:\n{out[-2000:]}\n"
                             f"{err[-2000:]}")
    return proc.returncode, out, err


def train(run_dir, cache, *overrides, env=None, prefix=()):
    return finish(start(run_dir, cache, *overrides, env=env, prefix=prefix))


def records(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return rows


def losses(run_dir) -> dict[int, float]:
    """step -> loss; asserts each step has one loss record."""
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def steps_on_disk(run_dir) -> list[int]:
    d = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def wait_until(predicate, proc, timeout=120, every=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before the moment "
                                 f"the test waits for:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def one_error_line(err: str) -> str:
    """The run's only 'error:' line; no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]
