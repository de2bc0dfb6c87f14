"""Largest batch of a preset that fits on one device, per remat policy.

For each policy, compiles jaxlm's train step for growing batch sizes and reads the compiler's
memory analysis (arguments + outputs not aliased to them + temporaries) against the device's
memory limit, then really runs the largest fitting batch for a few steps to confirm it (a
compiler estimate is not a measurement). Device only:
  PYTHONPATH=. python3 benchmarks/memory_fit.py [--config configs/llama-1b.yaml] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def step_bytes(config, overrides, batch):
    import jax
    from jaxlm.config import load_config
    from jaxlm.data import synthetic_dataset
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.step import abstract_batch, build_step_fns
    cfg = load_config([config], [*overrides, f"train.global_batch_size={batch}"])
    mesh = make_mesh({"data": 1, "stage": 1, "fsdp": 1, "sequence": 1, "expert": 1, "tensor": 1},
                     jax.devices()[:1])
    fns = build_step_fns(cfg, mesh)
    fields = synthetic_dataset(cfg.data, cfg.model.vocab_size, cfg.model.objective).fields
    batch_spec = abstract_batch(cfg, fns.batch_sharding, fields)  # the 1B preset's
    m = fns.train_step.lower(fns.abstract_state, batch_spec).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def confirm(config, overrides, batch):
    """Really train a few steps at this batch; returns (tokens/s, peak bytes) or an error."""
    cmd = [sys.executable, "-m", "jaxlm.train", "--config", config, *overrides,
           f"train.global_batch_size={batch}", "train.steps=6", "log.every_steps=3",
           "log.progress=false", "log.tensorboard=false", "checkpoint.enabled=false",
           f"train.run_dir=/tmp/fit-{time.time_ns()}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    last = [l for l in out.stdout.splitlines() if l.startswith("step 6")]
    return last[-1] if last and out.returncode == 0 else (out.stdout + out.stderr)[-400:]


def estimate(config, overrides, batches):
    """In its own process: compiler memory needs for growing batches, stopping at the first
    that does not fit."""
    import jax
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 2**40)  # CPU: no limit
    rows = []
    for b in batches:
        need = step_bytes(config, overrides, b)
        rows.append((b, need))
        if need > limit:
            break
    return {"device": jax.devices()[0].device_kind, "limit": limit, "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/llama-1b.yaml")
    ap.add_argument("--policies", default="none,save_dots,full")
    ap.add_argument("--batches", default="8,16,24,32,48,64,96")
    ap.add_argument("--estimate", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    batches = list(map(int, args.batches.split(",")))
    if args.estimate:
        over = [*args.overrides, f"model.remat={args.estimate}"]
        print("EST " + json.dumps(estimate(args.config, over, batches)), flush=True)
        return
    print("| remat | largest batch (x seq) that fits | compiler estimate GiB | confirmed by a run |")
    print("|---|---|---|---|", flush=True)
    results = {}
    for policy in args.policies.split(","):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", args.config,
                              "--batches", args.batches, "--estimate", policy, *args.overrides],
                             capture_output=True, text=True, timeout=900)
        line = next((l for l in out.stdout.splitlines() if l.startswith("EST ")), None)
        if line is None:
            print(f"| {policy} | estimate failed: {(out.stdout + out.stderr)[-300:]!r} |")
            continue
        est = json.loads(line[4:])
        fits = [(b, n) for b, n in est["rows"] if n <= est["limit"]]
        results[policy] = {"limit_gib": est["limit"] / 2**30, "rows": est["rows"]}
        if not fits:
            print(f"| {policy} | none of {args.batches} | - | - |")
            continue
        b, need = fits[-1]
        run = confirm(args.config, [*args.overrides, f"model.remat={policy}"], b).replace(" | ", ", ")
        print(f"| {policy} | {b} | {need / 2**30:.1f} of {est['limit'] / 2**30:.1f} | {run} |",
              flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "memory_fit.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
