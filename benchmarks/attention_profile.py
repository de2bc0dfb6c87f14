"""Three identical forward+backward attention calls, for a kernel profiler to pick from:

    ncu --clock-control none -k 'regex:flash|sdpa|fmha|cudnn' --launch-count 3 \
        python3 benchmarks/attention_profile.py --impl pallas --seq 8192 --causal
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from kernels_pallas.flash import flash_attention


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impl", choices=("pallas", "cudnn"), default="pallas")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args()
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16)
                   for kk in jax.random.split(jax.random.key(0), 4))
    if args.impl == "pallas":
        attn = lambda q, k, v: flash_attention(q, k, v, causal=args.causal)
    else:
        attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=args.causal,
                                                            implementation="cudnn")
    step = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
    for _ in range(3):
        jax.block_until_ready(step(q, k, v, do))


if __name__ == "__main__":
    main()
