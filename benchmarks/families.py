"""Each model family's GPU preset through the real `jaxlm.train` path, one process each (the whole
GPU), with the family's own FLOPs formula for MFU; and, for GPT-2, the PyTorch peer
(benchmarks/gpt2_torch.py, torch.compile) on the same shape in the same call.

  PYTHONPATH=. python3 benchmarks/families.py [--presets gpt2-small,bert-base,t5-small,deepseek-1b]
Prints a Markdown table; with $OUT set, writes $OUT/families.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import print_table, run_worker  # noqa: E402

PRESETS = ["gpt2-small", "bert-base", "t5-small", "deepseek-1b"]


def run_torch_gpt2() -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.join(here, "gpt2_torch.py")],
                         capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"name": "torch.compile GPT-2", "error": (out.stdout + out.stderr)[-2000:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides for every preset")
    args = ap.parse_args()
    rows = []
    for preset in args.presets.split(","):
        r = run_worker(args.overrides, preset, config=f"configs/{preset}.yaml")
        rows.append({**r, "name": preset})
        print(json.dumps(rows[-1])[:400], flush=True)
    if not args.no_peer and "gpt2-small" in args.presets:
        rows.append(run_torch_gpt2())
        print(json.dumps(rows[-1])[:400], flush=True)
    print()
    print_table(rows)
    ok = {r["name"]: r for r in rows if "error" not in r}
    if "gpt2-small" in ok and "torch.compile GPT-2" in ok:
        print(f"gpt2-small jaxlm / torch.compile: "
              f"{ok['gpt2-small']['tokens_per_sec'] / ok['torch.compile GPT-2']['tokens_per_sec']:.3f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "families.json"), "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
