"""Kill a training run at random moments N times in a row, then let the same command finish: the
final state and the loss of every step must equal an uninterrupted run's, bit for bit.

`python benchmarks/faults.py [--kills 10] [--trials 3] [--steps 120] [--seed 0] [--workdir DIR]`

A tiny model on 8 simulated CPU devices (data=8), a checkpoint every 5 steps (asynchronous, keep
3), constant learning rate. Each launch is stopped at a random moment (1 in 5 during its start:
imports, data, restore, compilation; the others during its share of the training: steps and
checkpoint saves) by SIGKILL (2 in 3) or SIGTERM (a preemption: save, exit 75). After N such
launches the command runs to the end. A trial is identical when the final metrics.jsonl holds
one loss per step equal to the uninterrupted run's and the final checkpoint's params, optimizer
state, step, rng and data position equal its checkpoint's; no launch may print a traceback.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(ROOT))

MODEL = ["model.vocab_size=300", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2", "model.ffn_dim=64", "data.seq_len=32", "data.max_bytes=100000",
         "train.global_batch_size=8", "optim.warmup_steps=2", "optim.lr=0.01",
         "optim.schedule=constant", "log.progress=false", "log.tensorboard=false",
         "log.every_steps=1", "train.eval_every=0", "train.eval_batches=1",
         "checkpoint.every_steps=5", "checkpoint.keep=3", "checkpoint.async_save=true"]


def command(run_dir: Path, steps: int, cache: Path) -> list[str]:
    return [sys.executable, "-m", "jaxlm.train", *MODEL, f"train.steps={steps}",
            f"train.run_dir={run_dir}", f"runtime.compilation_cache={cache}"]


def launch(run_dir, steps, cache, log: Path, kill=None, signum=None):
    """Run the command to its end, or stop it with `signum` when `kill(run_dir, started)` says
    so; returns (exit status, (start time, seconds), stdout, stderr)."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        t0, started = time.perf_counter(), time.time()
        p = subprocess.Popen(command(run_dir, steps, cache), cwd=ROOT, stdout=out, stderr=err,
                             start_new_session=True)
        while kill is not None and p.poll() is None:
            if kill(run_dir, started):
                p.send_signal(signum)
                break
            time.sleep(0.002)
        p.wait(timeout=300)
        seconds = time.perf_counter() - t0
    return p.returncode, (started, seconds), log.with_suffix(".out").read_text(), \
        log.with_suffix(".err").read_text()


def newest_step(run_dir: Path, since: float) -> int | None:
    """The last step this launch logged (records from before it started do not count)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r:
            return r["step"] if r["time"] >= since else None
    return None


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def final_state(run_dir: Path, steps: int):
    """The newest checkpoint, restored (and checked) the way a resumed run restores it."""
    import jax
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import check_against_devices, load_config
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.step import build_step_fns
    cfg = load_config(None, MODEL + [f"train.steps={steps}"])
    fns = build_step_fns(cfg, make_mesh(check_against_devices(cfg, jax.device_count())))
    step, state, data = Checkpointer(run_dir / "checkpoints", cfg.checkpoint).restore_latest(
        fns.abstract_state, print)
    return step, jax.device_get(state), data


def same_state(a, b) -> bool:
    import jax
    import numpy as np
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def trial(kills: int, steps: int, seed: int, workdir: Path, cache: Path,
          reference: dict) -> dict:
    run_dir = workdir / f"trial{seed}"
    rng = random.Random(seed)
    # 1 in 5 kills at a random moment of the start (imports, data, restore, compilation); the
    # others once the launch has trained a random number of steps (on average 1/(kills+1) of
    # the run, so the kills spread over all of it), plus up to 30 ms: mid-step or mid-save
    startup, share = reference["startup_s"], 2 * steps / (kills + 1)
    outcomes, resumed, tracebacks, outs = collections.Counter(), [], 0, []
    for i in range(kills):
        signum = rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM])
        if rng.random() < 0.2:
            at = rng.uniform(0, startup)
            kill = lambda d, started, at=at: time.time() - started >= at  # noqa: E731
        else:
            trained, extra = max(1, round(rng.uniform(0, share))), rng.uniform(0, 0.03)
            first = {}

            def kill(d, started, trained=trained, extra=extra, first=first):
                now = newest_step(d, started)
                if now is None:
                    return False
                first.setdefault("step", now)
                if now - first["step"] + 1 < trained:
                    return False
                time.sleep(extra)
                return True
        code, _, out, err = launch(run_dir, steps, cache, run_dir.parent / f"{run_dir.name}-{i}",
                                   kill=kill, signum=signum)
        outcomes[{0: "finished", 75: "preempted (SIGTERM: saved)",
                  -signal.SIGKILL: "killed (SIGKILL)",
                  -signal.SIGTERM: "SIGTERM before the handler"}.get(code, f"exit {code}")] += 1
        tracebacks += "Traceback" in err
        outs.append(out)
        m = re.search(r"resumed from step (\d+)", out)
        resumed.append(int(m.group(1)) if m else None)  # None: fresh, or stopped before that
    code, _, out, err = launch(run_dir, steps, cache, run_dir.parent / f"{run_dir.name}-final")
    tracebacks += "Traceback" in err
    outs.append(out)
    if code != 0:
        raise SystemExit(f"the final launch of trial {seed} failed ({code}):\n{err[-3000:]}")
    m = re.search(r"resumed from step (\d+)", out)
    resumed.append(int(m.group(1)) if m else None)
    got_losses = losses(run_dir)
    step, state, data = final_state(run_dir, steps)
    identical = (got_losses == reference["losses"] and step == steps
                 and same_state(state, reference["state"])
                 and data["iterator"] == reference["iterator"])
    return {"seed": seed, "kills": kills, "outcomes": dict(outcomes), "resumed_from": resumed,
            "tracebacks": tracebacks, "identical": identical,
            "steps_logged": len(got_losses),
            # what the next launch found: saves a kill interrupted, checkpoints it skipped
            "interrupted_saves": sum(o.count("an interrupted save left") for o in outs),
            "damaged_skipped": sum(o.count(" is damaged (") for o in outs)}


def uninterrupted(steps: int, workdir: Path, cache: Path) -> dict:
    d = workdir / "reference"
    launch(workdir / "warmup", 1, cache, workdir / "warmup")  # fills the compilation cache
    shutil.rmtree(workdir / "warmup")
    code, (started, seconds), out, err = launch(d, steps, cache, workdir / "reference")
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed ({code}):\n{err[-3000:]}")
    logged = {r["step"]: r["time"] for r in map(json.loads, (d / "metrics.jsonl").read_text()
                                                 .splitlines()) if "loss" in r}
    step, state, data = final_state(d, steps)
    return {"losses": losses(d), "state": state, "iterator": data["iterator"],
            "seconds": seconds, "startup_s": logged[1] - started}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jaxlm-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cache = workdir / "xla_cache"
    t0 = time.perf_counter()
    ref = uninterrupted(args.steps, workdir, cache)
    print(f"uninterrupted: {args.steps} steps in {ref['seconds']:.1f} s "
          f"(startup {ref['startup_s']:.1f} s)", flush=True)
    results = []
    for t in range(args.trials):
        r = trial(args.kills, args.steps, args.seed + t, workdir, cache, ref)
        results.append(r)
        print(json.dumps(r), flush=True)
    summary = {"trials": args.trials, "kills_per_trial": args.kills, "steps": args.steps,
               "identical": sum(r["identical"] for r in results),
               "tracebacks": sum(r["tracebacks"] for r in results),
               "outcomes": dict(sum((collections.Counter(r["outcomes"]) for r in results),
                                    collections.Counter())),
               "wall_s": round(time.perf_counter() - t0, 1), "workdir": str(workdir)}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    s = main()
    sys.exit(0 if s["identical"] == s["trials"] and not s["tracebacks"] else 1)
