"""One fp8 projection on the GPU three ways, with what XLA compiled each into: the bf16 einsum,
flax's qdq rounding around a bf16 einsum (jaxlm's first fp8 version) and jaxlm's fp8_einsum
(float8 operands into the matmul, the scales outside). Prints time, TFLOP/s, the custom calls in the optimised HLO and how
often it names an f8 type; then the same for the gradient of fp8_einsum. Device only:
  PYTHONPATH=. python3 benchmarks/fp8_matmul_probe.py
"""
import re
import time

import jax
import jax.numpy as jnp

from flax.linen import fp8_ops

from jaxlm.nn.fp8 import E4M3, fp8_einsum, scale_of
def bf16(x, w): return jnp.einsum("sd,df->sf", x, w.astype(jnp.bfloat16))

def qdq(x, w):  # values rounded to the e4m3 grid, multiplied in bf16
    w = w.astype(jnp.bfloat16)
    xr = fp8_ops.qdq(x, E4M3, scale_of(x, E4M3), jnp.float32)
    wr = fp8_ops.qdq(w, E4M3, scale_of(w, E4M3), jnp.float32)
    return jnp.einsum("sd,df->sf", xr, wr, preferred_element_type=jnp.float32).astype(x.dtype)

def fp8(x, w): return fp8_einsum("sd,df->sf", x, w, jnp.bfloat16)

def loss(x, w): return jnp.sum(fp8_einsum("sd,df->sf", x, w, jnp.bfloat16).astype(jnp.float32))


def main():
    x = jax.random.normal(jax.random.key(0), (8192, 2048), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (2048, 5632), jnp.float32)
    for name, f in [("bf16", bf16), ("fp8_qdq", qdq), ("fp8_einsum", fp8)]:
        g = jax.jit(f); c = g.lower(x, w).compile(); txt = c.as_text()
        calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', txt)))
        f8 = len(re.findall(r"f8e4m3|f8e5m2", txt))
        for _ in range(3): g(x, w).block_until_ready()
        t = time.perf_counter(); n = 50
        for _ in range(n): y = g(x, w)
        y.block_until_ready(); dt = (time.perf_counter() - t) / n
        print(f"{name}: {dt*1e6:.0f} us, {2*8192*2048*5632/dt/1e12:.0f} TFLOP/s, custom calls {calls}, f8 mentions {f8}", flush=True)
    # the training gradient too
    c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    print("fp8 grad custom calls", sorted(set(re.findall(r'custom_call_target="([^"]+)"', c))), "f8 mentions", len(re.findall(r"f8e4m3|f8e5m2", c)))


if __name__ == "__main__":
    main()
