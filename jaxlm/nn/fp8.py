"""fp8 matmuls for training (`model.matmul_precision: fp8`): a policy the training step turns on,
read by `param.project`, the one function the dense layers multiply by a weight with; no layer
branches on it.

Forward: the activation and the weight are each rounded to float8_e4m3fn with one per-tensor
scale; backward: the output's gradient is rounded to float8_e5m2 (more range, for gradients)
before both gradient matmuls, which then multiply e5m2 by e4m3 operands, as Hopper's fp8 recipes
do. Rounding is quantise-then-dequantise (flax's fp8_ops.qdq): the values the matmul sees lie on
the fp8 grid times the scale, which is the pattern XLA's GPU compiler turns into an fp8 cuBLAS
matmul; elsewhere the same numbers are multiplied in the compute dtype. Gradients pass the
rounding straight through.

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
from flax.linen import fp8_ops

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def round_to(x, fmt):
    """x on fmt's grid times its scale, in x's dtype. Its gradient is the identity (straight
    through): differentiating the casts would round the tangent itself to fp8, unscaled."""
    return fp8_ops.qdq(x, fmt, scale_of(x, fmt), jnp.float32)


def _round_fwd(x, fmt):
    return round_to(x, fmt), None


def _round_bwd(fmt, _, g):
    return (g,)


round_to.defvjp(_round_fwd, _round_bwd)


@jax.custom_vjp
def _e5m2_gradient(y):
    return y


def _e5m2_fwd(y):
    return y, None


def _e5m2_bwd(_, g):
    return (round_to(g, E5M2),)


_e5m2_gradient.defvjp(_e5m2_fwd, _e5m2_bwd)


def fp8_einsum(subscripts: str, x, w, dtype):
    """einsum(subscripts, x, w) with both operands rounded to e4m3 and the output's gradient to
    e5m2; accumulation in float32, the result in `dtype`."""
    y = jnp.einsum(subscripts, round_to(x.astype(dtype), E4M3), round_to(w.astype(dtype), E4M3),
                   preferred_element_type=jnp.float32)
    return _e5m2_gradient(y.astype(dtype))
