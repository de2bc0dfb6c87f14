"""Weak scaling of jaxlm's real train step over 1/2/4/8 devices for each parallelism preset.

Per device the work is fixed (global batch = per-device batch x devices), so ideal scaling keeps
tokens/s per device constant; efficiency = tokens/s per device at N / at 1 device of the same
preset. Runs unchanged on any number of GPUs, or on simulated CPU devices:
  PYTHONPATH=. python3 benchmarks/scaling.py                                  # GPUs, 1B preset
  PYTHONPATH=. python3 benchmarks/scaling.py --cpu-devices 8 --config configs/tiny.yaml \
      --per-device-batch 2 model.dtype=float32                                  # CPU simulation
Extra key=value arguments are config overrides. Results are printed as a Markdown table and, when
$OUT is set, appended to $OUT/scaling.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = ("dp", "fsdp", "fsdp_tp", "tp_sp", "zero1")  # configs/mesh/<name>.yaml


def preset_args(name, n):
    """The preset's file (its rules) plus mesh sizes for n devices; on 1 device every axis is
    size 1, which measures what the rules alone cost (nothing, if the rules are right)."""
    tensor = 2 if name in ("fsdp_tp", "tp_sp") and n >= 2 else 1
    if name in ("dp", "zero1"):
        sizes = [f"mesh.data={n}", "mesh.fsdp=1", "mesh.tensor=1"]
    else:
        sizes = ["mesh.data=1", f"mesh.fsdp={n // tensor}", f"mesh.tensor={tensor}"]
    return [f"configs/mesh/{name}.yaml"], sizes


def measure(config_files, overrides, n, steps):
    import jax
    from jaxlm.config import check_against_devices, load_config
    from jaxlm.metrics import mfu, peak_flops, peak_memory_bytes
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.steptime import time_train_step

    cfg = load_config(config_files, overrides)
    mesh = make_mesh(check_against_devices(cfg, n), jax.devices()[:n])
    t = time_train_step(cfg, mesh, steps=steps)
    f = cfg.model.run_flops_per_token(cfg.data)
    mem = peak_memory_bytes()
    return {"devices": n, "step_s": t.step_s, "tokens_per_sec": t.tokens_per_sec,
            "tokens_per_sec_per_device": t.tokens_per_sec / n,
            "mfu": mfu(t.tokens_per_sec, f, peak_flops(jax.devices()[0].device_kind), n),
            "compile_s": t.compile_s, "peak_mem_gib": mem / 2**30 if mem else None,
            "loss": float(t.metrics["loss"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--per-device-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpu-devices", type=int, default=0, help="simulate this many CPU devices")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    worker_env = dict(os.environ)
    if not args.worker:  # the parent only counts devices: it must not take GPU memory
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    files = args.config or ["configs/llama-1b.yaml"]
    if args.worker:  # one measurement per process, so each starts with clean device memory
        name, n = args.worker.split(":")
        n = int(n)
        mesh_files, sizes = preset_args(name, n)
        over = [*args.overrides, *sizes, f"train.global_batch_size={args.per_device_batch * n}"]
        row = measure(files + mesh_files, over, n, args.steps)
        print("WORKER " + json.dumps({"preset": name, **row}))
        return
    import subprocess
    available = jax.device_count()
    rows = []
    for name in args.presets.split(","):
        for n in map(int, args.devices.split(",")):
            if n > available:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{name}:{n}",
                   "--per-device-batch", str(args.per_device_batch), "--steps", str(args.steps),
                   "--cpu-devices", str(args.cpu_devices), *sum((["--config", c] for c in files), []),
                   *args.overrides]
            out = subprocess.run(cmd, capture_output=True, text=True, env=worker_env)
            line = next((l for l in out.stdout.splitlines() if l.startswith("WORKER ")), None)
            row = json.loads(line[7:]) if line else {"preset": name, "devices": n,
                                                     "error": (out.stdout + out.stderr)[-1500:]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["preset"]: r["tokens_per_sec_per_device"] for r in rows
            if "error" not in r and r["devices"] == 1}
    print(f"\n{available} x {jax.devices()[0].device_kind}; config {files} {args.overrides}; "
          f"{args.per_device_batch} rows per device")
    print("| preset | devices | tokens/s per device | step ms | MFU | efficiency | compile s | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['preset']} | {r['devices']} | failed: {r['error'][-200:]!r} |")
            continue
        eff = r["tokens_per_sec_per_device"] / base[r["preset"]] if r["preset"] in base else None
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['preset']} | {r['devices']} | {r['tokens_per_sec_per_device']:,.0f} | "
              f"{r['step_s'] * 1e3:.1f} | {fmt(r['mfu'], '.1%')} | {fmt(eff, '.1%')} | "
              f"{r['compile_s']:.1f} | {fmt(r['peak_mem_gib'], '.1f')} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "scaling.jsonl"), "a") as f:
            f.write(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
