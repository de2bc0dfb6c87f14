"""Preemption through the real CLI: SIGTERM or SIGINT at any point ends the run at a step boundary
with a committed checkpoint and exit code 75, and the same command resumes to exactly the losses
of an uninterrupted run. A second signal during that save exits at once (128 + signal) and still
leaves a complete checkpoint to resume from. (Many processes: tests/test_multiprocess.py.)"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clirun import ROOT, finish, losses, records, start, steps_on_disk, train, wait_until

REFERENCE_STEPS = 100  # every interrupted run below stops well before this


@pytest.fixture(scope="module")
def reference(tmp_path_factory, xla_cache_dir):
    """Losses of an uninterrupted run (constant lr: its prefix is any shorter run's sequence)."""
    d = tmp_path_factory.mktemp("reference")
    code, _, err = train(d, xla_cache_dir, f"train.steps={REFERENCE_STEPS}",
                         "checkpoint.enabled=false")
    assert code == 0, err[-3000:]
    return losses(d)


def logged_steps(run_dir) -> int:
    return sum("loss" in r for r in records(run_dir))


def resume_matches(reference, run_dir, cache, saved_step, more=2):
    """Run the same command again to `saved_step + more`: it resumes from the preemption
    checkpoint and every step's loss equals the uninterrupted run's, bit for bit."""
    assert saved_step + more <= REFERENCE_STEPS
    code, out, err = train(run_dir, cache, f"train.steps={saved_step + more}")
    assert code == 0, err[-3000:]
    assert f"resumed from step {saved_step} " in out
    assert f"changed on resume (allowed): train.steps: 100000 -> {saved_step + more}" in out
    got = losses(run_dir)  # also: one record per step
    assert got == {s: reference[s] for s in range(1, saved_step + more + 1)}


def preempted_line(out: str) -> tuple[str, int, Path]:
    m = re.search(r"^preempted by (\w+): checkpoint of step (\d+) saved to (\S+); run the same "
                  r"command to resume$", out, flags=re.M)
    assert m, out[-2000:]
    return m.group(1), int(m.group(2)), Path(m.group(3))


def test_sigterm_mid_run_saves_the_step_in_flight_and_resumes_exactly(
        reference, tmp_path, xla_cache_dir):
    proc = start(tmp_path, xla_cache_dir, "train.steps=100000", "checkpoint.every_steps=100000")
    wait_until(lambda: logged_steps(tmp_path) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 75, err[-3000:]
    assert "Traceback" not in err and "error:" not in err
    name, step, where = preempted_line(out)
    assert name == "SIGTERM" and where == tmp_path / "checkpoints" / str(step)
    assert steps_on_disk(tmp_path) == [step]       # saved, committed (renamed into place)
    assert max(losses(tmp_path)) == step           # the step in flight finished and was logged
    resume_matches(reference, tmp_path, xla_cache_dir, step)


def test_sigint_during_startup_stops_after_the_first_step(reference, tmp_path, xla_cache_dir):
    """Ctrl-C while the run is still compiling: the signal waits for the first step."""
    proc = start(tmp_path, xla_cache_dir, "train.steps=100000", "checkpoint.every_steps=100000")
    # the run directory appears just before the step is compiled
    wait_until(lambda: (tmp_path / "config.yaml").exists(), proc)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 75, err[-3000:]
    name, step, _ = preempted_line(out)
    assert name == "SIGINT" and step <= 3 and steps_on_disk(tmp_path) == [step]
    resume_matches(reference, tmp_path, xla_cache_dir, step)


def tmp_dirs(run_dir):
    d = Path(run_dir) / "checkpoints"
    return [p for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name] if d.is_dir() else []


def test_second_signal_during_the_save_exits_at_once_and_a_checkpoint_survives(
        reference, tmp_path, xla_cache_dir):
    """keep=1, so a save that deleted the old step before the new one was complete would leave
    nothing. The process is frozen (SIGSTOP) the moment the preemption save's temporary
    directory appears, signalled again, and thawed: the second signal lands mid-save."""
    for attempt in range(3):  # the save of this tiny model is short: catch it in the act
        run_dir = tmp_path / f"attempt{attempt}"
        proc = start(run_dir, xla_cache_dir, "train.steps=100000", "checkpoint.every_steps=4",
                     "checkpoint.keep=1", "checkpoint.async_save=true")
        wait_until(lambda: steps_on_disk(run_dir) and not tmp_dirs(run_dir), proc)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: tmp_dirs(run_dir) or proc.poll() is not None, proc, every=0.0002)
        os.kill(proc.pid, signal.SIGSTOP)
        mid_save = bool(tmp_dirs(run_dir))
        proc.send_signal(signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        code, out, err = finish(proc)
        if mid_save:
            break
    assert mid_save, "the second signal never landed during a save"
    assert code == 128 + signal.SIGTERM, (code, err[-3000:])
    assert "second signal (SIGTERM): exiting now" in err and "Traceback" not in err
    left = steps_on_disk(run_dir)
    assert len(left) == 1, left   # the previous checkpoint, or the new one had it just finished
    resume_matches(reference, run_dir, xla_cache_dir, left[0])


CHILD_IN_A_LONG_C_CALL = """
import hashlib, sys
from jaxlm.preemption import Preemption
with Preemption(multi_process=False) as p:
    print("ready", flush=True)
    # one C call that releases the GIL and never returns to the interpreter, like a device step
    hashlib.pbkdf2_hmac("sha256", b"k", b"s", 40_000_000)
    print("returned", p.signum, flush=True)
"""


def test_two_signals_inside_one_long_c_call_are_two_signals(tmp_path):
    """Python runs its handler once for any number of signals that land while the main thread is
    inside one C call; counted from the wakeup pipe by a thread, the second still exits at once."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD_IN_A_LONG_C_CALL], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc, timeout=120)
    assert code == 128 + signal.SIGINT, (code, out, err)
    assert "SIGINT: stopping after the step in flight (and its checkpoint" in err
    assert "second signal (SIGINT): exiting now" in err and "returned" not in out
    assert time.monotonic() - t0 < 3  # the C call itself runs ~10 s
