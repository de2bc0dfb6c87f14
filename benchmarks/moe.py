"""MoE benchmark: train-step throughput of the ~1B MoE preset per dispatch mode, with MFU counting
only active-parameter FLOPs, and the grouped matmul (`jax.lax.ragged_dot`) against a dense matmul
of the same FLOPs and the capacity mode's batched einsum.

On the GPU, from the repo root:
  PYTHONPATH=. python3 benchmarks/moe.py
On CPU, to check that it runs (tiny shapes through the same code):
  PYTHONPATH=. python3 benchmarks/moe.py --steps 3 model.d_model=64 model.num_layers=2 \
      model.num_heads=4 model.num_kv_heads=2 model.ffn_dim=128 model.expert_ffn_dim=128 \
      model.vocab_size=512 model.dtype=float32 model.attention_impl=xla model.scan_unroll=1 \
      data.seq_len=128 train.global_batch_size=4
Prints a markdown table per part and one `RESULT {json}` line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench(fn, *args, iters=10):
    """Median seconds per call after a warm-up call (compile)."""
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def train_throughput(cfg, steps):
    """Bare loop over the compiled train step (device-resident synthetic batches) on one device."""
    import jax
    import numpy as np
    from jaxlm.config import MESH_AXES
    from jaxlm.data import synthetic_dataset
    from jaxlm.metrics import mfu, peak_flops
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.step import build_step_fns

    mesh = make_mesh({a: 1 for a in MESH_AXES}, jax.devices()[:1])
    fns = build_step_fns(cfg, mesh)
    state = fns.init(0)
    B, S = cfg.train.global_batch_size, cfg.data.seq_len
    data = synthetic_dataset(cfg.data, cfg.model.vocab_size, cfg.model.objective)
    rows = [data.get(np.arange(i * B, (i + 1) * B)) for i in range(2)]
    batches = [jax.device_put({k: r[k] for k in data.fields}, fns.batch_sharding) for r in rows]
    t0 = time.perf_counter()
    state, m = fns.train_step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(2):
        state, m = fns.train_step(state, batches[i % 2])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = fns.train_step(state, batches[i % 2])
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    tps = B * S / dt
    f_tok = cfg.model.run_flops_per_token(cfg.data)
    peak = peak_flops(jax.devices()[0].device_kind, cfg.log.peak_tflops)
    m = jax.device_get(m)
    return {"dispatch": cfg.model.dispatch, "step_ms": dt * 1e3, "tokens_per_sec": tps,
            "mfu": mfu(tps, f_tok, peak, 1), "compile_s": compile_s,
            "active_flops_per_token": f_tok, "params": fns.param_count,
            "loss": float(m["loss"]), "dropped_frac": float(m["stats"]["moe_dropped_frac"]),
            "load_max": float(m["stats"]["moe_load_max"])}


def matmul_timings(m, tokens, dtype):
    """Forward (and fwd+bwd) of one expert projection [T*k, D] x [E, D, F] three ways, same FLOPs
    (2 * T*k * D * F): ragged_dot with balanced groups, one dense [T*k, D] x [D, F] matmul, and
    the capacity mode's batched einsum [E, C, D] x [E, D, F] with C = T*k/E."""
    import jax
    import jax.numpy as jnp
    E, k, D = m.num_experts, m.experts_per_token, m.d_model
    F = m.expert_ffn_dim or m.ffn_dim
    M = tokens * k
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (M, D), dtype)
    w = jax.random.normal(keys[1], (E, D, F), dtype)
    sizes = jnp.full((E,), M // E, jnp.int32)
    variants = {
        "grouped (ragged_dot)": (lambda x, w: jax.lax.ragged_dot(x, w, sizes), (x, w)),
        "dense matmul": (lambda x, w: x @ w[0], (x, w)),
        "batched einsum (capacity)": (lambda x, w: jnp.einsum("ecd,edf->ecf", x.reshape(E, -1, D),
                                                              w), (x, w)),
    }
    flops = 2 * M * D * F
    rows = []
    for name, (f, args) in variants.items():
        fwd = bench(jax.jit(f), *args)
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), (0, 1)))
        both = bench(grad, *args)
        rows.append({"matmul": name, "fwd_ms": fwd * 1e3, "fwd_tflops": flops / fwd / 1e12,
                     "fwd_bwd_ms": both * 1e3, "fwd_bwd_tflops": 3 * flops / both / 1e12})
    return {"shape": f"[{M}, {D}] x [{E}, {D}, {F}]", "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mixtral-1b.yaml")
    ap.add_argument("--dispatch", default="dropless,capacity")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from jaxlm.config import load_config

    base = ["log.progress=false", "log.tensorboard=false", *args.overrides]
    print(f"device: {jax.devices()[0].device_kind}; config {args.config}", *args.overrides)
    results = {"train": [], "matmul": None}
    print("\n| dispatch | tokens/s | step ms | MFU (active) | compile s | dropped | max load "
          "| loss |\n|---|---|---|---|---|---|---|---|")
    for dispatch in args.dispatch.split(","):
        cfg = load_config([args.config], base + [f"model.dispatch={dispatch}"])
        r = train_throughput(cfg, args.steps)
        results["train"].append(r)
        mfu_s = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"| {dispatch} | {r['tokens_per_sec']:,.0f} | {r['step_ms']:.1f} | {mfu_s} | "
              f"{r['compile_s']:.1f} | {r['dropped_frac']:.2%} | {r['load_max']:.2f}x | "
              f"{r['loss']:.3f} |", flush=True)
    print(f"(params {r['params']:,} total; {r['active_flops_per_token']:.3e} active FLOPs/token)")
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    mm = matmul_timings(cfg.model, tokens, jnp.dtype(cfg.model.dtype))
    results["matmul"] = mm
    print(f"\nexpert projection {mm['shape']} ({cfg.model.dtype}):\n| matmul | fwd ms | fwd "
          f"TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |\n|---|---|---|---|---|")
    for row in mm["rows"]:
        print(f"| {row['matmul']} | {row['fwd_ms']:.3f} | {row['fwd_tflops']:.1f} | "
              f"{row['fwd_bwd_ms']:.3f} | {row['fwd_bwd_tflops']:.1f} |")
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
