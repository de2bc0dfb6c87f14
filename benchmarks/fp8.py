"""fp8 training against bf16: the 1B preset on the stdlib corpus (byte tokens), the same rows in
the same order, `model.matmul_precision` default (bf16) and fp8, beside torch.compile bf16
(../shared/bench/ref_models.py, copied to .peer/) in the same call.

Each jaxlm run is `python -m jaxlm.train` in its own process; with two GPUs the two precisions
run at once, one per GPU (CUDA_VISIBLE_DEVICES), so 1,000 steps of each fit in one call.
tokens/s is the mean of the logged windows after the first (compile and warm-up excluded); the
loss curve is every logged step's loss. MFU is against the bf16 peak for both. Device only:
  PYTHONPATH=. python3 benchmarks/fp8.py [--steps 1000] [--peer .peer/ref_models.py]
      [--fp8-overrides "model.fp8_scaling=delayed"] [--seeds 0,1] [key=value ...]
(key=value for both runs, --fp8-overrides for the fp8 run alone). --seeds runs one bf16/fp8
pair per seed (train.seed and data.seed), pair after pair: one run's final loss moves by about
as much as the 1% criterion (benchmarks/RESULTS.md), so the spread over seeds says what a
single pair cannot.
Writes $OUT/fp8.json (curves included); benchmarks/fp8_plot.py draws them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

PRECISIONS = ("default", "fp8")


def start(precision, steps, gpu, config, overrides):
    run_dir = f"/tmp/fp8-bench-{precision}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "jaxlm.train", "--config", config,
           "data.source=stdlib", f"train.steps={steps}", "log.every_steps=10",
           "log.progress=false", "log.tensorboard=false", "checkpoint.enabled=false",
           f"model.matmul_precision={precision}", f"train.run_dir={run_dir}", *overrides]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
    log = open(f"{run_dir}.log", "w")
    return run_dir, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def result(precision, run_dir, proc, timeout=None):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"precision": precision, "error": f"still running after {timeout} s"}
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    train = [r for r in rows if "loss" in r and "tokens_per_sec" in r]
    if proc.returncode or len(train) < 3:
        return {"precision": precision, "error": open(f"{run_dir}.log").read()[-1500:]}
    timed = train[1:]
    return {"precision": precision,
            "tokens_per_sec": sum(r["tokens_per_sec"] for r in timed) / len(timed),
            "mfu": sum(r.get("mfu") or 0 for r in timed) / len(timed),
            "compile_s": next((r["compile_time_s"] for r in rows if "compile_time_s" in r), None),
            "final_loss": sum(r["loss"] for r in train[-5:]) / len(train[-5:]),
            "curve": [[r["step"], r["loss"]] for r in train]}


def peer(path):
    out = subprocess.run([sys.executable, path, "torch"], capture_output=True, text=True,
                         timeout=600)
    m = re.search(r"RESULT (\S+): step ([\d.]+) ms, ([\d,]+) tokens/s, ([\d.]+) TFLOP/s, "
                  r"MFU ([\d.]+)%", out.stdout + out.stderr)
    if not m:
        return {"name": "torch.compile", "error": (out.stdout + out.stderr)[-1500:]}
    return {"name": m.group(1), "tokens_per_sec": float(m.group(3).replace(",", "")),
            "mfu": float(m.group(5)) / 100}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--peer", default=".peer/ref_models.py", help="'' to skip")
    ap.add_argument("--config", default="configs/llama-1b.yaml")
    ap.add_argument("--timeout", type=float, default=450, help="seconds a jaxlm run may take")
    ap.add_argument("--fp8-overrides", default="",
                    help="space-separated key=value for the fp8 run only (its recipe)")
    ap.add_argument("--seeds", default="", help="comma-separated: one pair per seed")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                              text=True).stdout.count("GPU ")
    except FileNotFoundError:  # no GPU here
        gpus = 0
    # the peer first, alone on the GPU; then the two precisions
    torch_row = peer(args.peer) if args.peer else {"name": "torch.compile", "error": "skipped"}
    pairs = []
    for seed in [int(x) for x in args.seeds.split(",")] if args.seeds else [None]:
        common = [*args.overrides] + ([f"train.seed={seed}", f"data.seed={seed}"]
                                      if seed is not None else [])
        runs = []
        for i, p in enumerate(PRECISIONS):
            own = args.fp8_overrides.split() if p == "fp8" else []
            runs.append((p, *start(p, args.steps, i % max(gpus, 1), args.config,
                                   [*common, *own])))
            if gpus < 2:  # one GPU: one run at a time
                runs[-1] = result(*runs[-1], timeout=args.timeout)
        pairs.append((seed, [r if isinstance(r, dict) else result(*r, timeout=args.timeout)
                             for r in runs]))
    rows, summary = [], {"pairs": []}
    for seed, (bf16, fp8) in pairs:
        for r in (bf16, fp8):
            r["seed"] = seed
        rows += [bf16, fp8]
        if "error" not in bf16 and "error" not in fp8:
            summary["pairs"].append({
                "seed": seed, "fp8_speedup": fp8["tokens_per_sec"] / bf16["tokens_per_sec"],
                "final_loss_rel": fp8["final_loss"] / bf16["final_loss"] - 1})
    done = summary["pairs"]
    if done:
        for key in ("fp8_speedup", "final_loss_rel"):
            values = [p[key] for p in done]
            summary[key] = sum(values) / len(values)
            summary[key + "_range"] = [min(values), max(values)]
    rows.append(torch_row)
    print(json.dumps({"summary": summary,
                      "rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows]},
                     indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fp8.json"), "w") as f:
            json.dump({"summary": summary, "rows": rows, "steps": args.steps,
                       "overrides": args.overrides, "fp8_overrides": args.fp8_overrides}, f)


if __name__ == "__main__":
    main()
