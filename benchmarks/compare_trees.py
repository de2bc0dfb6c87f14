"""A/B of jaxlm's training throughput: this tree against another checkout of jaxlm (e.g. the
previous commit), alternating base, new, base, new... in one call so that drift of the GPU between
runs falls on both. Each run is benchmarks/train_throughput.py's worker in that tree: the real
`jaxlm.train` path (its own process, the whole GPU), plus its bare-loop step time.

  mkdir .base && git archive HEAD~1 | tar -x -C .base      # ignored by git: /.base/
  PYTHONPATH=. python3 benchmarks/compare_trees.py --base .base --rounds 2 [key=value ...]
Prints each run and the medians; with $OUT set, writes $OUT/compare_trees.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tree: str, overrides: list[str]) -> dict:
    tree = os.path.abspath(tree)
    out = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--worker", *overrides],
                         cwd=tree, env={**os.environ, "PYTHONPATH": tree}, capture_output=True,
                         text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("WORKER "):
            return json.loads(line[len("WORKER "):])
    return {"error": (out.stdout + out.stderr)[-2000:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the other jaxlm checkout")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="config overrides for both (default: 1B preset)")
    args = ap.parse_args()
    runs = {"base": [], "new": []}
    for i in range(args.rounds):
        for name, tree in (("base", args.base), ("new", HERE)):
            r = run(tree, args.overrides)
            runs[name].append(r)
            if "error" in r:
                print(f"{name} round {i}: failed: {r['error'][-1500:]}", flush=True)
                continue
            print(f"{name} round {i}: {r['tokens_per_sec']:,.0f} tokens/s (train), step "
                  f"{r['step_ms']:.1f} ms, bare step {r['bare_step_ms']:.1f} ms, compile "
                  f"{r['compile_s']:.1f} s, peak {r['peak_mem_gib'] or 0:.1f} GiB", flush=True)
    med = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if ok:
            med[name] = {k: statistics.median(r[k] for r in ok)
                         for k in ("tokens_per_sec", "step_ms", "bare_step_ms", "compile_s")}
    print("\n| tree | tokens/s (median) | step ms | bare step ms | compile s |\n|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['tokens_per_sec']:,.0f} | {m['step_ms']:.2f} | "
              f"{m['bare_step_ms']:.2f} | {m['compile_s']:.1f} |")
    if len(med) == 2:
        print(f"new / base tokens/s: {med['new']['tokens_per_sec'] / med['base']['tokens_per_sec']:.4f}"
              f"; bare step base / new: {med['base']['bare_step_ms'] / med['new']['bare_step_ms']:.4f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "compare_trees.json"), "w") as f:
            json.dump({"runs": runs, "medians": med, "overrides": args.overrides}, f)


if __name__ == "__main__":
    main()
