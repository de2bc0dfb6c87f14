"""Parameters with logical axis names.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names; the rules
table (jaxlm.parallel.sharding) decides what they mean on a mesh. Parameters are stored in
`param_dtype` and cast to the compute `dtype` where they are used. Decoding may hold a matmul
weight as an `Int8Weight` instead (jaxlm.generate.quantize); `project` is how the dense layers
multiply by a weight either way.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxlm.nn.fp8 import fp8_active, fp8_einsum, fp8_margin


def param(rngs: nnx.Rngs, shape, names, std: float, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


def ones_param(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=tuple(names), eager_sharding=False)


def zeros_param(shape, names, dtype) -> nnx.Param:
    """Biases start at zero. Name them `b_*` (or `bias`): the optimizer does not decay them."""
    return nnx.Param(jnp.zeros(shape, dtype), out_sharding=tuple(names), eager_sharding=False)


def scaled_out_std(std: float, num_layers: int) -> float:
    """Residual-branch output projections start smaller so the residual stream's variance does not
    grow with depth (GPT-2 / Megatron init)."""
    return std / math.sqrt(2 * num_layers)


def merge_contracted(subscripts: str, x, w):
    """(subscripts, x, w) with the axes contracted together merged into one, where they close x
    and open w in the same order (the output projection's 'bshk,hkd->bsd' becomes
    'bsc,cd->bsd'). Same product; but a trace showed XLA rewriting the one-token product over
    two contracted axes into an elementwise product the size of the weight plus a reduction
    (the 1B preset's batch-1 decode step, H200), where one contracted axis is a matrix-vector
    kernel. Measured end to end the step moved only from 1.32 to 1.30 ms (benchmarks/RESULTS.md)."""
    ins, out = subscripts.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    n = max((m for m in range(2, min(len(xs), len(ws)) + 1)
             if xs[-m:] == ws[:m] and not set(ws[:m]) & set(out)), default=0)
    if not n:
        return subscripts, x, w
    merged = xs[-1]
    x = x.reshape(*x.shape[:-n], -1)
    if isinstance(w, Int8Weight):
        w = Int8Weight(w.q.reshape(-1, *w.q.shape[n:]), w.scale.reshape(-1, *w.scale.shape[n:]),
                       w.dtype)
    else:
        w = w.reshape(-1, *w.shape[n:])
    return f"{xs[:-n] + merged},{merged + ws[n:]}->{out}", x, w


@struct.dataclass
class Int8Weight:
    """A matmul weight as int8 values and one float32 scale per output channel (1 on the input
    axes). Reading it whole (`w[...]`, as nnx indexes a Variable's value) dequantises it;
    `project` instead multiplies by the int8 values and scales the product."""
    q: jax.Array                       # int8, the weight's shape
    scale: jax.Array                   # float32, 1 on the input axes
    dtype: str = struct.field(pytree_node=False, default="float32")  # the weight's own dtype

    def __getitem__(self, index):
        return (self.q.astype(jnp.float32) * self.scale).astype(self.dtype)[index]

    @property
    def shape(self):
        return self.q.shape


def project(subscripts: str, x, weight: nnx.Variable, dtype, *, fp8: bool = True,
            amax_2xH=None):
    """einsum(subscripts, x, weight) in `dtype`; in fp8 where the training step turned that on
    (jaxlm.nn.fp8) and `fp8` allows it (the head says no), with delayed scaling from amax_2xH
    when the layer has histories (`fp8.site`). An Int8Weight enters the matmul as its int8
    values converted (exact in 16 bits) and its scale multiplies the product: the scale is 1 on
    the contracted axes, so the algebra is exact. Why not dequantise first: XLA fused the
    convert into the matmul, but not the multiply by the scale, and wrote a dequantised copy of
    each such weight every decode step (0.8 ms of the int8 1B preset's 2.1 ms step, H200)."""
    w = weight.get_value()
    subscripts, x, w = merge_contracted(subscripts, x, w)
    if not isinstance(w, Int8Weight):
        if fp8 and fp8_active():
            return fp8_einsum(subscripts, x, w, dtype, amax_2xH, fp8_margin())
        return jnp.einsum(subscripts, x, w.astype(dtype))
    y = jnp.einsum(subscripts, x, w.q.astype(dtype))
    # the scale laid out as the output: contracting size-1 input axes is a broadcast
    scale = jnp.einsum(subscripts, jnp.ones((1,) * x.ndim, jnp.float32), w.scale)
    return (y.astype(jnp.float32) * scale).astype(dtype)
