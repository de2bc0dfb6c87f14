"""Long-context training: the 1B preset on one very long sequence per step, on one GPU, then on
two with the sequence split (mesh.sequence=2) by ring attention and by all-gathered K/V, then
the longest sequence ring attention fits on two GPUs.

Each row is jaxlm's real train step (benchmarks/scaling.py's `measure`: compile apart, warm-up
excluded) in its own process, so each starts with clean GPU memory; rows are laid out as
jaxlm.train lays them (zig-zag under ring). MFU counts attention FLOPs (causal: half of S^2)
against the bf16 peak. The last step's loss of each row is printed too: every row trains the
same model on the same rows, so they should agree. Device only:
  PYTHONPATH=. python3 benchmarks/long_context.py [--seq 65536] [--longest 131072,262144]
      [key=value ...]
Results as a Markdown table, and $OUT/long_context.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = ["train.global_batch_size=1", "model.remat=full", "mesh.data=1", "mesh.fsdp=1"]
MODES = {  # name -> (devices, overrides)
    "1 GPU": (1, []),
    "ring": (2, ["mesh.sequence=2", "mesh.context_parallel=ring"]),
    "all_gather": (2, ["mesh.sequence=2", "mesh.context_parallel=all_gather"]),
}


def row(mode, seq, config, overrides, steps):
    n, extra = MODES[mode]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{mode}:{seq}",
           "--steps", str(steps), "--config", config, *overrides]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
        text = out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        text = f"timed out after 420 s: {(e.stdout or b'')[-500:]!r}"
    line = next((l for l in text.splitlines() if l.startswith("WORKER ")), None)
    if line:
        return json.loads(line[7:])
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    raised = [l for l in text.splitlines() if re.match(r"^[\w.]+(Error|Exception)\b", l)]
    return {"mode": mode, "seq": seq, "devices": n,
            "error": "out of memory" if oom else (raised[-1][:800] if raised else text[-1200:])}


def save(rows):
    print(json.dumps(rows[-1]), flush=True)
    if os.environ.get("OUT"):  # after every row: a call cut short keeps what it measured
        with open(os.path.join(os.environ["OUT"], "long_context.json"), "w") as f:
            json.dump(rows, f, indent=1)


def worker(spec, config, steps, overrides):
    from benchmarks.scaling import measure
    mode, seq = spec.rsplit(":", 1)
    n, extra = MODES[mode]
    r = measure([config], [*BASE, f"data.seq_len={seq}", *extra, *overrides],
                n, steps)
    return {"mode": mode, "seq": int(seq), **r}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=65536)
    ap.add_argument("--longest", default="131072,262144",
                    help="longer sequences to try with ring on two GPUs, in order")
    ap.add_argument("--modes", default="1 GPU,ring,all_gather")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--config", default="configs/llama-1b.yaml")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        print("WORKER " + json.dumps(worker(args.worker, args.config, args.steps, args.overrides)), flush=True)
        return
    rows = []
    for m in args.modes.split(","):
        rows.append(row(m, args.seq, args.config, args.overrides, args.steps))
        save(rows)
    for seq in filter(None, args.longest.split(",")):
        rows.append(row("ring", int(seq), args.config, args.overrides, args.steps))
        save(rows)
        if "error" in rows[-1]:
            break
    one = next((r for r in rows if r["mode"] == "1 GPU" and "error" not in r), None)
    print(f"\n{args.config}, batch 1, remat full, {args.overrides}")
    print("| mode | seq | GPUs | tokens/s per GPU | vs 1 GPU | step s | MFU | peak mem GiB | "
          "compile s | last loss |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['seq']} | {r['devices']} | failed: "
                  f"{r['error'][-300:]!r} |")
            continue
        rel = (f"{r['tokens_per_sec_per_device'] / one['tokens_per_sec_per_device']:.1%}"
               if one and r["seq"] == one["seq"] else "-")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['mode']} | {r['seq']:,} | {r['devices']} | "
              f"{r['tokens_per_sec_per_device']:,.0f} | {rel} | {r['step_s']:.2f} | "
              f"{fmt(r['mfu'], '.1%')} | {fmt(r['peak_mem_gib'], '.1f')} | "
              f"{r['compile_s']:.0f} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
