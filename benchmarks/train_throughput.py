"""Training throughput: jaxlm through its real `jaxlm.train` path beside the peer trainers, in one
call, on the same GPU, the same model and the same MFU formula.

Run on the device from the repo root, with the peers copied to .peer/ (see ../shared/bench/README.md;
MaxText: .peer/maxtext/ after its fetch_wheels.sh):
  PYTHONPATH=. python3 benchmarks/train_throughput.py [--shapes 1b,gqa] [--peers torch,jax,maxtext]
      [--variant "key=value ..."]... [key=value ...]
Shapes: `1b` = configs/llama-1b.yaml (seq 2048, batch 8, 16 kv heads); `gqa` = the same with
kv heads 4, seq 4096, batch 4. Each trainer runs in its own process (the whole GPU memory each).
jaxlm's row also reports its host overhead: its step time inside `jaxlm.train` against a bare loop
over the same compiled step with device-resident batches, in the same process.
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

SHAPES = {  # jaxlm overrides, ref_models.py overrides, MaxText overrides
    "1b": ([], {}, []),
    "gqa": (["model.num_kv_heads=4", "data.seq_len=4096", "train.global_batch_size=4"],
            {"kv_heads": 4, "seq": 4096, "batch": 4},
            ["base_num_kv_heads=4", "max_target_length=4096", "per_device_batch_size=4"]),
}


def run_jaxlm(overrides, config="configs/llama-1b.yaml"):
    import jax
    from jaxlm.config import check_against_devices, load_config
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.steptime import time_train_step
    from jaxlm.train import configure_runtime, run
    cfg = load_config([config],
                      ["train.steps=40", "log.every_steps=20", "log.progress=false",
                       "log.tensorboard=false", f"train.run_dir=/tmp/bench-{time.time_ns()}",
                       *overrides])
    configure_runtime(cfg)
    last = run(cfg)  # the last window (steps 21-40) excludes compile and warm-up
    del last["state"]
    # the same step in a bare loop: what jaxlm.train adds on top is host overhead
    mesh = make_mesh(check_against_devices(cfg, jax.device_count()))  # run()'s mesh
    bare = time_train_step(cfg, mesh, steps=20).step_s
    return {"name": "jaxlm " + " ".join(overrides), "tokens_per_sec": last["tokens_per_sec"],
            "step_ms": last["step_time_s"] * 1e3, "mfu": last["mfu"],
            "compile_s": last["compile_time_s"], "peak_mem_gib": last["peak_mem_gib"],
            "bare_step_ms": bare * 1e3,
            "host_overhead": (last["step_time_s"] - bare) / last["step_time_s"],
            "flops_per_token": cfg.model.run_flops_per_token(cfg.data)}


def run_worker(overrides, label, config="configs/llama-1b.yaml"):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                          f"--config={config}", *overrides],
                         capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("WORKER "):
            return {**json.loads(line[len("WORKER "):]), "name": f"jaxlm {label}".strip()}
    return {"name": f"jaxlm {label}".strip(), "error": (out.stdout + out.stderr)[-2000:]}


def run_peer(which, shape):
    _, ref_cfg, mt_args = SHAPES[shape]
    if which == "maxtext":
        here = ".peer/maxtext"
        cmd = f"cd {here} && ./setup_pydeps.sh >/dev/null && ./run_llama_gpu.sh noremat " + " ".join(mt_args)
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=900)
        text = out.stdout + out.stderr
        tok = re.search(r"tokens/s/device\s*:\s*median (\d+)", text)
        st = re.search(r"step time\s+s\s*:\s*median ([\d.]+)", text)
        if not tok:
            return {"name": "maxtext", "error": text[-2000:]}
        return {"name": "maxtext 0.2.5", "tokens_per_sec": float(tok.group(1)),
                "step_ms": float(st.group(1)) * 1e3 if st else None, "mfu": None, "compile_s": None}
    cmd = [sys.executable, ".peer/ref_models.py", which] + ([json.dumps(ref_cfg)] if ref_cfg else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    m = re.search(r"RESULT (\S+): step ([\d.]+) ms, ([\d,]+) tokens/s, ([\d.]+) TFLOP/s, "
                  r"MFU ([\d.]+)%", text)
    c = re.search(r"compile\+first step ([\d.]+) s", text)
    if not m:
        return {"name": which, "error": text[-2000:]}
    return {"name": m.group(1), "step_ms": float(m.group(2)),
            "tokens_per_sec": float(m.group(3).replace(",", "")), "mfu": float(m.group(5)) / 100,
            "compile_s": float(c.group(1)) if c else None}


def fmt(v, f):
    return "-" if v is None else format(v, f)


def print_table(rows):
    """A Markdown table of trainer rows (a failed one shows the end of its error)."""
    print("| trainer | tokens/s | step ms | MFU | compile s | peak mem GiB | host overhead |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][-300:]!r} |")
            continue
        print(f"| {r['name']} | {r['tokens_per_sec']:,.0f} | {fmt(r['step_ms'], '.1f')} | "
              f"{fmt(r['mfu'], '.1%')} | {fmt(r['compile_s'], '.1f')} | "
              f"{fmt(r.get('peak_mem_gib'), '.1f')} | {fmt(r.get('host_overhead'), '.1%')} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1b")
    ap.add_argument("--peers", default="torch,jax")
    ap.add_argument("--variant", action="append", default=None,
                    help="a jaxlm variant: space-separated overrides (repeatable)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="configs/llama-1b.yaml", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:  # one trainer per process: each gets the whole GPU memory
        print("WORKER " + json.dumps(run_jaxlm(args.overrides, args.config)), flush=True)
        return
    variants = [v.split() for v in (args.variant or [""])]
    all_rows = {}
    for shape in args.shapes.split(","):
        rows = [run_worker([*SHAPES[shape][0], *args.overrides, *v], " ".join(v))
                for v in variants]
        for p in filter(None, args.peers.split(",")):
            rows.append(run_peer(p, shape))
        f_tok = next((r["flops_per_token"] for r in rows if "flops_per_token" in r), None)
        for r in rows:  # same MFU formula for every trainer
            if "error" not in r and f_tok:
                r["mfu"] = r["tokens_per_sec"] * f_tok / 989.4e12
        all_rows[shape] = rows
        print(f"\n### shape {shape}")
        print_table(rows)
        for j in (r for r in rows if r["name"].startswith("jaxlm") and "error" not in r):
            for r in rows:
                if not r["name"].startswith("jaxlm") and "error" not in r:
                    print(f"{j['name']} / {r['name']}: {j['tokens_per_sec'] / r['tokens_per_sec']:.3f}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_throughput.json"), "a") as f:
            f.write(json.dumps(all_rows) + "\n")


if __name__ == "__main__":
    main()
