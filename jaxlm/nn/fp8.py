"""fp8 matmuls for training (`model.matmul_precision: fp8`): a policy the training step turns on,
read by `param.project`, the one function the dense layers multiply by a weight with; no layer
branches on it.

Forward: the activation and the weight are each cast to float8_e4m3fn after dividing by one
per-tensor scale; backward: the output's gradient is cast to float8_e5m2 (more range, for
gradients) and multiplied against the saved e4m3 operands, as Hopper's fp8 recipes do. The
float8 arrays go into the matmul themselves, accumulating in float32, and each product is
rescaled by its operands' scales afterwards: that is what XLA's GPU compiler hands to cuBLAS's
fp8 GEMM (`__cublas$lt$matmul$f8`). Quantise-dequantise around a bf16 matmul (flax's qdq), the
first version, was folded back into bf16 arithmetic by XLA and never ran an fp8 GEMM
(benchmarks/fp8_matmul_probe.py).

Scaling is *current*: each tensor's scale is its own amax / the format's largest value, taken
in the step that uses it. Why not delayed scaling (an amax history carried in the train state):
current scaling needs no state to shard, checkpoint or restore, and never clips a sudden
outlier the way a stale history does; its price is one extra reduction over each operand, which
XLA fuses into the rounding pass. Master weights and the optimizer stay float32 as always.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
PRECISIONS = ("default", "fp8")


class _Policy(threading.local):
    precision: str = "default"


_policy = _Policy()


@contextlib.contextmanager
def matmul_precision(precision: str):
    """Inside: `param.project` multiplies in fp8 (`fp8`) or in the compute dtype (`default`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision {precision!r}: expected one of {PRECISIONS}")
    prev, _policy.precision = _policy.precision, precision
    try:
        yield
    finally:
        _policy.precision = prev


def fp8_active() -> bool:
    return _policy.precision == "fp8"


def scale_of(x, fmt):
    """Per-tensor current scale: amax / the format's largest finite value (1 for all zeros)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    return jax.lax.stop_gradient(jnp.where(amax > 0, amax / float(jnp.finfo(fmt).max), 1.0))


def quantise(x, fmt):
    """(x / scale as fmt, scale): the operand a float8 matmul takes, with its per-tensor
    current scale (clipped: float8_e4m3fn has no infinity, and an overflow would be NaN)."""
    scale = scale_of(x, fmt)
    big = float(jnp.finfo(fmt).max)
    return jnp.clip(x.astype(jnp.float32) / scale, -big, big).astype(fmt), scale


def gradient_subscripts(subscripts: str) -> tuple[str, str]:
    """For y = einsum('x,w->y'): the subscripts of dx = einsum('y,w->x') and
    dw = einsum('x,y->w'), valid when every index of x and of w is in y or in the other."""
    ins, out = subscripts.replace(" ", "").split("->")
    x, w = ins.split(",")
    for name, a, b in (("x", x, w), ("w", w, x)):
        if not set(a) <= set(out) | set(b):
            raise ValueError(f"fp8 einsum {subscripts!r}: an index of {name} is summed alone")
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


def fp8_einsum(subscripts: str, x, w, dtype):
    """einsum(subscripts, x, w) with float8 operands: x and w as e4m3, and in the backward the
    output's gradient as e5m2 against the saved e4m3 operands; accumulation in float32, each
    product written in `dtype` (x's gradient in the gradient's dtype) and rescaled by its
    operands' scales. The operands reach the matmul as float8 arrays, which is what XLA's GPU
    compiler hands to cuBLAS's fp8 GEMM. The weight is rounded from its stored (master) dtype,
    with no `dtype` copy in between, and its gradient comes back in that dtype."""
    return _fp8_einsum(subscripts, jnp.dtype(w.dtype), x.astype(dtype), w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fp8_einsum(subscripts, w_dtype, x, w):
    return _fp8_fwd(subscripts, w_dtype, x, w)[0]


def _fp8_fwd(subscripts, w_dtype, x, w):
    (xq, sx), (wq, sw) = quantise(x, E4M3), quantise(w, E4M3)
    return _scaled(subscripts, xq, wq, sx * sw, x.dtype), (xq, sx, wq, sw)


def _fp8_bwd(subscripts, w_dtype, res, g):
    xq, sx, wq, sw = res
    gq, sg = quantise(g, E5M2)
    dx_sub, dw_sub = gradient_subscripts(subscripts)
    return (_scaled(dx_sub, gq, wq, sg * sw, g.dtype),
            _scaled(dw_sub, xq, gq, sx * sg, w_dtype))


def _scaled(subscripts, a, b, scale, dtype):
    """einsum of two float8 arrays written in `dtype`, times the product of their scales. The
    GEMM writes `dtype` itself: a float32 product of an activation-sized output, rescaled and
    cast in a second pass, cost the 1B step ~10% (H200: 110.6k against 100.0k tokens/s)."""
    return jnp.einsum(subscripts, a, b, preferred_element_type=dtype) * scale.astype(dtype)


_fp8_einsum.defvjp(_fp8_fwd, _fp8_bwd)
