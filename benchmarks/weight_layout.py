"""Does the weights' memory layout decide a decode step's GEMM speed? XLA's dot of a few rows
x [M, K] by the 1B preset's weights stored [K, N] (as the model holds them: output columns
contiguous) against the same weights stored [N, K] (each output's K inputs contiguous), bf16
and int8 (converted in the GEMM, scaled after, as jaxlm.nn.param.project does), and the [N, K]
weight as a multiply and a float32 row reduction, also read as 32-bit words unpacked by shifts
(does a wider load help XLA's reduction? On an H200 it did not); M = 1 and 2 rows (a batch-1 step, and its
padding to two rows, Engine(min_rows=2)). Each product runs over 16 distinct weights (one per layer, so
together they outgrow the 50 MB L2 cache as the decode loop's do), REPEAT times in one jitted
loop: microseconds per product and the weight bytes read per second against the measured copy
bandwidth.

    python3 benchmarks/weight_layout.py            # on the GPU
    python3 benchmarks/weight_layout.py --smoke    # tiny shapes on CPU: does it run
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, K, N): q/k/v as XLA merges them, gate/up merged likewise, down, output projection
SHAPES = [("q/k/v", 2048, 6144), ("gate/up", 2048, 11264), ("down", 5632, 2048),
          ("output", 2048, 2048)]
LAYERS, REPEAT = 16, 20


LAYOUTS = ("KN", "NK", "NK-reduce", "NK-reduce-packed")


def unpacked_f32(w_NxW, kind: str):
    """The [N, K] weight's values as float32 [N, K / P, P] from its P-element 32-bit words:
    P = 4 int8 (sign-extended by shifts) or 2 bf16 (a bf16 is a float32's high half)."""
    import jax.numpy as jnp
    from jax import lax
    if kind == "int8":
        parts = [lax.shift_right_arithmetic(lax.shift_left(w_NxW, jnp.int32(24 - 8 * b)),
                                            jnp.int32(24)) for b in range(4)]
        return jnp.stack(parts, axis=-1).astype(jnp.float32)
    lo = lax.bitcast_convert_type(lax.shift_left(w_NxW, jnp.uint32(16)), jnp.float32)
    hi = lax.bitcast_convert_type(w_NxW & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.stack([lo, hi], axis=-1)


def packed(w_NxK):
    """The [N, K] weight bitcast to 32-bit words [N, K / P] (what NK-reduce-packed reads)."""
    import jax.numpy as jnp
    from jax import lax
    N, K = w_NxK.shape
    word = jnp.int32 if w_NxK.dtype == jnp.int8 else jnp.uint32
    per = 4 // w_NxK.dtype.itemsize
    return lax.bitcast_convert_type(w_NxK.reshape(N, K // per, per), word)


def product(layout: str, kind: str):
    """y [M, N] from x [M, K] and a weight in `layout`, as project computes it. "NK-reduce":
    the [N, K] weight multiplied by x and summed over K in float32 (a row reduction, not a
    dot: what XLA's GPU compiler makes of a vector x matrix product itself)."""
    import jax.numpy as jnp
    if layout == "NK-reduce-packed":
        def dot(x, w):
            w_NxWxP = unpacked_f32(w, kind)
            x_WxP = x.astype(jnp.float32).reshape(x.shape[0], *w_NxWxP.shape[1:])
            return jnp.sum(x_WxP[:, None] * w_NxWxP[None], axis=(-2, -1))
    elif layout == "NK-reduce":
        def dot(x, w):
            return jnp.sum(x[:, None, :].astype(jnp.float32) * w[None].astype(jnp.float32),
                           axis=-1)
    else:
        spec = "mk,kn->mn" if layout == "KN" else "mk,nk->mn"

        def dot(x, w):
            return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    if kind == "bf16":
        return lambda x, w: dot(x, w).astype(x.dtype)
    return lambda x, w, s: (dot(x, w) * s).astype(x.dtype)


def timed(fn, x, weights) -> float:
    """Seconds per product: fn over every layer's weight in turn, REPEAT times, one jit."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def loop(x, weights):
        def body(i, x):
            for w in weights:
                y = fn(x, *w)
                x = x + (y[:, :1] * 1e-30).astype(x.dtype)  # unfoldable dependency
            return x
        return jax.lax.fori_loop(0, REPEAT, body, x)
    loop(x, weights).block_until_ready()
    t0 = time.perf_counter()
    loop(x, weights).block_until_ready()
    return (time.perf_counter() - t0) / REPEAT / len(weights)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from benchmarks.decode import copy_bandwidth
    bw = copy_bandwidth(2**24 if args.smoke else 2**31)
    print(f"{jax.devices()[0].device_kind}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    shapes, layers = ([("smoke", 64, 128)], 2) if args.smoke else (SHAPES, LAYERS)
    rng = np.random.default_rng(0)
    for (name, K, N), kind, rows in itertools.product(shapes, ("bf16", "int8"),
                                                     map(int, args.rows.split(","))):
        x = jnp.asarray(rng.normal(size=(rows, K)), jnp.bfloat16)
        line = []
        for layout in LAYOUTS:
            shape = (K, N) if layout == "KN" else (N, K)
            if kind == "bf16":
                weights = [(jnp.asarray(rng.normal(size=shape) * 0.02, jnp.bfloat16),)
                           for _ in range(layers)]
            else:
                weights = [(jnp.asarray(rng.integers(-127, 128, size=shape), jnp.int8),
                            jnp.asarray(rng.uniform(1e-3, 1e-2, size=N), jnp.float32))
                           for _ in range(layers)]
            if layout == "NK-reduce-packed":
                weights = [(packed(w[0]),) + w[1:] for w in weights]
            t = timed(product(layout, kind), x, weights)
            nbytes = weights[0][0].nbytes
            line.append(f"{layout} {t * 1e6:.1f} us ({nbytes / t / bw:.0%})")
            del weights
        print(f"RESULT {name} [{rows}, {K}] x {K}x{N} {kind}: " + ", ".join(line),
              flush=True)


if __name__ == "__main__":
    main()
