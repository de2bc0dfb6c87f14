"""1B-preset training throughput: jaxlm through its real `jaxlm.train` path, then the peer trainers
in the same call (same GPU, same model, same MFU formula).

Run on the device from the repo root, with the peers copied to .peer/ (see ../shared/bench/README.md):
  PYTHONPATH=. python3 benchmarks/train_throughput.py [--peers torch,jax] [key=value ...]
Extra key=value pairs are jaxlm config overrides (e.g. model.remat=full).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_jaxlm(overrides):
    from jaxlm.config import load_config
    from jaxlm.metrics import flops_per_token
    from jaxlm.train import configure_runtime, run
    cfg = load_config(["configs/llama-1b.yaml"],
                      ["train.steps=40", "log.every_steps=20", "log.progress=false",
                       "log.tensorboard=false", f"train.run_dir=/tmp/bench-{time.time_ns()}",
                       *overrides])
    configure_runtime(cfg)
    t0 = time.perf_counter()
    last = run(cfg)  # the last window (steps 21-40) excludes compile and warm-up
    return {"name": "jaxlm " + " ".join(overrides), "tokens_per_sec": last["tokens_per_sec"],
            "step_ms": last["step_time_s"] * 1e3, "mfu": last["mfu"],
            "compile_s": last["compile_time_s"], "peak_mem_gib": last["peak_mem_gib"],
            "wall_s": time.perf_counter() - t0,
            "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len)}


def run_worker(overrides):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *overrides],
                         capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("WORKER "):
            return json.loads(line[len("WORKER "):])
    return {"name": "jaxlm " + " ".join(overrides), "error": (out.stdout + out.stderr)[-2000:]}


def run_peer(which, peer_overrides):
    cmd = [sys.executable, ".peer/ref_models.py", which] + ([json.dumps(peer_overrides)]
                                                             if peer_overrides else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    m = re.search(r"RESULT (\S+): step ([\d.]+) ms, ([\d,]+) tokens/s, ([\d.]+) TFLOP/s, "
                  r"MFU ([\d.]+)%", text)
    c = re.search(r"compile\+first step ([\d.]+) s", text)
    if not m:
        return {"name": which, "error": text[-2000:]}
    return {"name": m.group(1), "step_ms": float(m.group(2)),
            "tokens_per_sec": float(m.group(3).replace(",", "")), "mfu": float(m.group(5)) / 100,
            "compile_s": float(c.group(1)) if c else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="torch,jax")
    ap.add_argument("--peer-config", default="", help="JSON overrides for ref_models.py")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:  # one trainer per process: each gets the whole GPU memory
        print("WORKER " + json.dumps(run_jaxlm(args.overrides)), flush=True)
        return
    rows = [run_worker(args.overrides)]
    peer_cfg = json.loads(args.peer_config) if args.peer_config else None
    for p in filter(None, args.peers.split(",")):
        rows.append(run_peer(p, peer_cfg))
    print("\n| trainer | tokens/s | step ms | MFU | compile s | peak mem GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][-300:]!r} |")
            continue
        mem = r.get("peak_mem_gib")
        print(f"| {r['name']} | {r['tokens_per_sec']:,.0f} | {r['step_ms']:.1f} | "
              f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')} | {r['compile_s'] or float('nan'):.1f} | "
              f"{mem if mem is None else round(mem, 1)} |")
    base = rows[0].get("tokens_per_sec")
    for r in rows[1:]:
        if "error" not in r and base:
            print(f"jaxlm / {r['name']}: {base / r['tokens_per_sec']:.3f}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "train_throughput.json"), "a") as f:
            f.write(json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
