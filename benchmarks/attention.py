"""Attention kernels side by side on one GPU: kernels_pallas flash vs jax.nn cuDNN vs XLA (and
tokamax, when importable, as the peer), forward and forward+backward, plus a GPU correctness check
of the Pallas kernel against the float32 reference.

    PYTHONPATH=. python3 benchmarks/attention.py [--check] [--seqs 1024,2048,...] [--out FILE]

TFLOP/s count 4*B*H*S*S*D for the forward (half of it when causal) and 3.5x that for
forward+backward (the same convention as ../shared/bench/probe_tokamax.py). Each timing is the
median over rounds of `--reps` back-to-back calls, so host dispatch is not what gets measured.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash import BlockSizes, flash_attention, flash_attention_with_lse
from kernels_pallas.reference import attention_reference


def timed(f, *args, reps=20, rounds=5):
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / reps)
    return float(np.median(ts))


def impls(tuning):
    out = {
        "pallas": lambda q, k, v, c: flash_attention(q, k, v, causal=c, block_sizes=tuning),
        "cudnn": lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                                 implementation="cudnn"),
        "xla": lambda q, k, v, c: jax.nn.dot_product_attention(q, k, v, is_causal=c,
                                                               implementation="xla"),
    }
    try:
        import tokamax
        for name in ("mosaic", "triton"):
            out[f"tokamax-{name}"] = (lambda n: lambda q, k, v, c: tokamax.dot_product_attention(
                q, k, v, is_causal=c, implementation=n))(name)
    except ImportError:
        print("tokamax not importable: peer columns skipped", flush=True)
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(tuning, only=""):
    """Pallas vs the float32 reference on the GPU: out, lse, dq, dk, dv relative L2 errors.
    `only`: run just the cases whose name contains this text."""
    cases = [  # (B, S, H, G, D, causal, segments, window)
        (2, 1024, 8, 8, 128, True, False, None), (2, 1024, 8, 8, 128, False, False, None),
        (2, 1024, 8, 2, 128, True, False, None), (1, 1024, 8, 1, 64, True, False, None),
        (2, 1024, 8, 4, 128, True, True, None), (2, 1024, 8, 8, 128, False, True, None),
        (1, 1024, 4, 4, 128, True, False, 300), (1, 1024, 4, 2, 64, False, False, 200),
        (2, 1000, 8, 4, 128, True, True, None), (1, 1024, 8, 2, 64, True, True, 256),
        (1, 1024, 4, 2, 256, True, True, None), (1, 1000, 4, 4, 256, False, False, 200),
        # keys with segment ids of their own (a ring attention block): a fifth moved on
        (2, 1024, 8, 4, 128, False, "kv", None), (2, 1000, 8, 8, 64, False, "kv", None),
    ]
    rows = []
    for B, S, H, G, D, causal, segs, W in cases:
        name = f"B{B} S{S} H{H} G{G} D{D} causal={causal} segs={segs} window={W}"
        if only not in name:
            continue
        try:
            ks = jax.random.split(jax.random.key(S + H + G + D), 5)
            q = jax.random.normal(ks[0], (B, S, H, D), jnp.bfloat16)
            k = jax.random.normal(ks[1], (B, S, G, D), jnp.bfloat16)
            v = jax.random.normal(ks[2], (B, S, G, D), jnp.bfloat16)
            do = jax.random.normal(ks[3], (B, S, H, D), jnp.bfloat16)
            seg = (jnp.cumsum(jax.random.uniform(ks[4], (B, S)) < 4 / S, axis=1).astype(jnp.int32)
                   if segs else None)
            kv_seg = None
            if segs == "kv":
                moved = jax.random.uniform(ks[3], (B, S)) < 0.2
                kv_seg = jnp.where(moved, seg + 1, seg)

            def run(fn, q, k, v, seg, do):
                def f(q, k, v):
                    return fn(q, k, v, causal=causal, segment_ids=seg, sliding_window=W,
                              kv_segment_ids=kv_seg)
                (o, lse), vjp = jax.vjp(f, q, k, v)
                return (o, lse) + vjp((do, jnp.zeros_like(lse)))

            # arrays go in as arguments: closed-over ones would be constant-folded by XLA
            pallas = functools.partial(flash_attention_with_lse, block_sizes=tuning)
            ours = jax.jit(functools.partial(run, pallas))(q, k, v, seg, do)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            ref = jax.jit(functools.partial(run, attention_reference))(
                *f32, seg, do.astype(jnp.float32))
            errs = {n: rel(a, b) for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, ref)}
            ok = all(e < 2e-2 for e in errs.values())
            print(f"CHECK {'ok  ' if ok else 'BAD '} {name} " +
                  " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
            rows.append({"case": name, "ok": ok, **errs})
        except Exception as e:  # report and go on: one call should show every case
            print(f"CHECK FAIL {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc(limit=3)
            rows.append({"case": name, "ok": False, "error": str(e)[:400]})
    return rows


def bench(seqs, tokens, tuning, heads=16, head_dim=128, names=None):
    rows = []
    fns = impls(tuning)
    for S in seqs:
        B = max(1, tokens // S)
        ks = jax.random.split(jax.random.key(S), 4)
        q, k, v, do = (jax.random.normal(kk, (B, S, heads, head_dim), jnp.bfloat16) for kk in ks)
        for causal in (True, False):
            fwd_flops = 4 * B * heads * S * S * head_dim * (0.5 if causal else 1)
            for name, fn in fns.items():
                if names and name not in names:
                    continue
                if name == "xla" and S > 4096:
                    continue  # materialises [B, H, S, S]
                row = {"impl": name, "seq": S, "batch": B, "causal": causal}
                try:
                    f = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, causal))
                    g = jax.jit(lambda q, k, v, fn=fn: jax.vjp(
                        lambda q, k, v: fn(q, k, v, causal), q, k, v)[1](do))
                    row["fwd_tflops"] = fwd_flops / timed(f, q, k, v) / 1e12
                    row["fwd_bwd_tflops"] = 3.5 * fwd_flops / timed(g, q, k, v) / 1e12
                    print(f"ROW {name:15s} S={S:6d} B={B:2d} causal={causal!s:5s} "
                          f"fwd {row['fwd_tflops']:6.1f}  fwd+bwd {row['fwd_bwd_tflops']:6.1f} "
                          f"TFLOP/s", flush=True)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"ROW {name:15s} S={S:6d} causal={causal} FAILED {row['error']}",
                          flush=True)
                rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="GPU correctness vs the reference")
    ap.add_argument("--only", default="", help="--check only the cases whose name has this")
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    ap.add_argument("--tokens", type=int, default=8192, help="batch = tokens // seq (min 1)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--impls", default="", help="comma list to run (default: all)")
    ap.add_argument("--tuning", default="{}", help='BlockSizes as JSON, e.g. {"block_kv": 64}')
    ap.add_argument("--out", default="", help="write results as JSON here")
    args = ap.parse_args()
    tuning = BlockSizes(**json.loads(args.tuning))
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; tuning {tuning}", flush=True)
    result = {"device": jax.devices()[0].device_kind, "tuning": str(tuning)}
    if args.check:
        result["check"] = check(tuning, args.only)
    seqs = [int(s) for s in args.seqs.split(",") if s]
    names = [n for n in args.impls.split(",") if n]
    result["bench"] = bench(seqs, args.tokens, tuning, args.heads, args.head_dim, names)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
