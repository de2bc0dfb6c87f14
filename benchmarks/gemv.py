"""The GEMV kernel (kernels_pallas/gemv.py) against XLA's dot on the 1B preset's decode-step
products, bf16 and int8 weights, 1 and 2 rows: microseconds and the weight bytes read per
second (against the measured copy bandwidth), for a sweep of block sizes, K splits, warps and
stages. Each product runs 200 times inside one jitted loop, so launch gaps count as they do in
the decode loop.

    python3 benchmarks/gemv.py [--rows 1,2] [--sweep]     # on the GPU; --sweep: 36 configs
    python3 benchmarks/gemv.py --smoke                    # tiny shapes, interpreted (CPU)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, K, N): the 1B preset's attention and MLP products and its head
SHAPES = [("q / k / v / output", 2048, 2048), ("gate / up", 2048, 5632),
          ("down", 5632, 2048), ("head", 2048, 32000)]
REPEAT = int(os.environ.get("GEMV_REPEAT", 200))


def timed(fn, *args) -> float:
    """Seconds per product: `fn` applied REPEAT times in one jitted loop (each output feeds a
    negligible but unfoldable dependency into the next input, so XLA cannot hoist the product
    out of the loop or merge iterations)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def loop(x, *rest):
        def body(i, carry):
            x, acc = carry
            y = fn(x, *rest)
            return x + (y[:, :1] * 1e-30).astype(x.dtype), acc + y[0, 0].astype(jnp.float32)
        return jax.lax.fori_loop(0, REPEAT, body, (x, jnp.float32(0)))[1]
    loop(*args).block_until_ready()
    t0 = time.perf_counter()
    loop(*args).block_until_ready()
    return (time.perf_counter() - t0) / REPEAT


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2")
    p.add_argument("--sweep", action="store_true", help="36 configs instead of 11")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: does it run")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from benchmarks.decode import copy_bandwidth
    from kernels_pallas.gemv import GemvConfig, gemv, supported

    bw = copy_bandwidth(2**24 if args.smoke else 2**31)
    print(f"{jax.devices()[0].device_kind}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    if args.sweep:
        configs = [GemvConfig(block_n=bn, block_k=bk, num_warps=nw, dot=dot)
                   for bn, bk, nw, dot in itertools.product(
                       (64, 128, 256), (32, 64, 128), (4, 8), (None, True))]
    else:
        configs = [GemvConfig(), GemvConfig(block_k=64), GemvConfig(block_n=128),
                   GemvConfig(block_n=128, block_k=64), GemvConfig(num_warps=8),
                   GemvConfig(num_stages=3), GemvConfig(dot=True),
                   GemvConfig(block_k=64, dot=True), GemvConfig(splits=1),
                   GemvConfig(splits=4), GemvConfig(splits=16)]
    shapes = SHAPES
    if args.smoke:
        shapes, configs = [("smoke", 64, 512)], [GemvConfig(), GemvConfig(dot=True)]
    rng = np.random.default_rng(0)
    for (name, K, N), M, kind in itertools.product(
            shapes, map(int, args.rows.split(",")), ("bf16", "int8")):
        x = jnp.asarray(rng.normal(size=(M, K)), jnp.bfloat16)
        if kind == "bf16":
            w, scale = jnp.asarray(rng.normal(size=(K, N)) * 0.02, jnp.bfloat16), None
            xla = lambda x, w: jnp.dot(x, w)  # noqa: E731
            xla_args = (w,)
        else:
            w = jnp.asarray(rng.integers(-127, 128, size=(K, N)), jnp.int8)
            scale = jnp.asarray(rng.uniform(0.001, 0.01, size=N), jnp.float32)
            # what jaxlm.nn.param.project does for an Int8Weight without the kernel
            xla = lambda x, w, s: (jnp.dot(x, w.astype(x.dtype)).astype(jnp.float32)  # noqa: E731
                                   * s).astype(x.dtype)
            xla_args = (w, scale)
        nbytes = w.nbytes
        base = timed(xla, x, *xla_args)
        print(f"RESULT {name} [{M}, {K}] x [{K}, {N}] {kind}: XLA {base * 1e6:.1f} us "
              f"({nbytes / base / bw:.0%} of copy bandwidth)", flush=True)
        best = None
        for cfg in configs:
            if not supported(M, K, N, cfg):
                continue
            try:
                t = timed(lambda x, w, s=None, cfg=cfg: gemv(x, w, s, cfg=cfg), x, w, scale)
            except Exception as e:  # a config Triton cannot compile: say so, go on
                print(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"  {cfg}: {t * 1e6:.1f} us ({nbytes / t / bw:.0%})", flush=True)
            if best is None or t < best[0]:
                best = (t, cfg)
        if best:
            print(f"RESULT {name} [{M}, {K}] x [{K}, {N}] {kind}: gemv best {best[0] * 1e6:.1f} "
                  f"us ({nbytes / best[0] / bw:.0%}), {base / best[0]:.2f}x XLA: {best[1]}",
                  flush=True)


if __name__ == "__main__":
    main()
