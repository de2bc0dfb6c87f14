"""Pipeline schedules side by side: tokens/s of jaxlm's real train step and the schedule's bubble.

Each schedule runs the same model and batch. The bubble is counted from the schedule table (idle
stage-ticks / all stage-ticks); the temp bytes are the compiler's per-device estimate, the
activation memory the schedules differ in. Runs on any number of GPUs or simulated CPU devices:
`stage` gets the most devices that divide the model's layers (or --stages), `data` the most of
the rest that divide a pipeline microbatch's rows, and devices left over sit idle (a line per
microbatch count says how many are used); a combination the config refuses (e.g. circular with
microbatches not a multiple of the stages) is listed as skipped with its one-line reason; on one
device there is no pipeline, and the plain step is timed once.
  PYTHONPATH=. python3 benchmarks/pipeline.py                                  # GPUs, 1B preset
  PYTHONPATH=. python3 benchmarks/pipeline.py --cpu-devices 8 --config configs/tiny.yaml \
      model.num_layers=8 train.global_batch_size=32                          # CPU simulation
Extra key=value arguments are config overrides. Prints a Markdown table; with $OUT set, appends
JSON rows to $OUT/pipeline.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEDULES = {"gpipe": [], "circular": ["pipeline.virtual_stages=2"], "1f1b": []}


def mesh_shape(devices: int, num_layers: int, rows: int, stages: int = 0) -> tuple[int, int]:
    """(stage, data): the most stages that divide the layers, then the most data shards that fit
    in the remaining devices and divide the rows of one pipeline microbatch."""
    S = stages or max(s for s in range(1, devices + 1) if num_layers % s == 0)
    return S, max(d for d in range(1, devices // S + 1) if rows % d == 0)


def measure(files, overrides, steps, devices):
    import jax
    from jaxlm.parallel import pipeline
    from jaxlm.config import ConfigError, check_against_devices, load_config
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.steptime import time_train_step

    cfg = load_config(files, overrides)
    try:
        sizes = check_against_devices(cfg, devices)
    except ConfigError as e:
        return {"schedule": cfg.pipeline.schedule, "microbatches": cfg.pipeline.microbatches,
                "skipped": str(e)}
    t = time_train_step(cfg, make_mesh(sizes, jax.devices()[:devices]), steps=steps, warmup=2)
    p = cfg.pipeline
    V = p.virtual_stages if p.schedule == "circular" else 1
    table = pipeline.schedule_table(p.schedule, sizes["stage"], p.microbatches, V)
    return {"schedule": p.schedule, "stages": sizes["stage"], "data": sizes["data"],
            "microbatches": p.microbatches, "virtual_stages": V, "step_s": t.step_s,
            "tokens_per_sec": t.tokens_per_sec, "compile_s": t.compile_s,
            "bubble": pipeline.bubble_fraction(table), "temp_mib": t.temp_bytes / 2**20,
            "loss": float(t.metrics["loss"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--stages", type=int, default=0, help="0: the most that divide the layers")
    ap.add_argument("--microbatches", default="8")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cpu-devices", type=int, default=0, help="simulate this many CPU devices")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import jax
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from jaxlm.config import load_config
    files = args.config or ["configs/llama-1b.yaml"]
    cfg = load_config(files, args.overrides)
    schedules, rows = args.schedules.split(","), []
    for M in map(int, args.microbatches.split(",")):
        S, D = mesh_shape(jax.device_count(), cfg.model.num_layers,
                          cfg.train.global_batch_size // cfg.train.microbatches // M, args.stages)
        print(f"microbatches={M}: stage={S} x data={D} on {S * D} of {jax.device_count()} "
              f"devices", flush=True)
        for name in schedules if S > 1 else schedules[:1]:  # stage=1: no pipeline, one plain step
            over = [*args.overrides, f"mesh.stage={S}", f"mesh.data={D}", "mesh.fsdp=1",
                    "mesh.max_unsharded_fraction=100", f"pipeline.schedule={name}",
                    f"pipeline.microbatches={M}", *SCHEDULES[name]]
            rows.append(measure(files, over, args.steps, S * D))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{jax.device_count()} x {jax.devices()[0].device_kind}\n")
    print("| schedule | stages x data | microbatches | tokens/s | step s | bubble | temp MiB "
          "| compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['schedule']} | | {r['microbatches']} | skipped: {r['skipped']} |||||")
            continue
        sched = r["schedule"] + (f" (V={r['virtual_stages']})" if r["virtual_stages"] > 1 else "")
        sched = sched if r["stages"] > 1 else "none (plain step)"
        print(f"| {sched} | {r['stages']} x {r['data']} | {r['microbatches']} | "
              f"{r['tokens_per_sec']:,.0f} | {r['step_s']:.3f} | {r['bubble']:.3f} | "
              f"{r['temp_mib']:.1f} | {r['compile_s']:.1f} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "pipeline.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
