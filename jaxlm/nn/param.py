"""Parameters with logical axis names.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names; the rules
table (jaxlm.parallel.sharding) decides what they mean on a mesh. Parameters are stored in
`param_dtype` and cast to the compute `dtype` where they are used. Decoding may hold a matmul
weight as an `Int8Weight` or laid out `InputsLast` instead (jaxlm.generate.quantize); `project`
is how the dense layers multiply by a weight either way.
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
    'bsc,cd->bsd'). Same product, one GEMM's shape. It was meant to stop XLA rewriting the
    batch-1 output projection into an elementwise product the size of the weight plus a
    reduction (H200 trace); the step moved only from 1.32 to 1.30 ms, since the rewrite's
    cause is the product's size, not its axes: XLA's GPU DotStrengthReduction takes every
    vector x matrix product under 10M elements."""
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


@struct.dataclass
class InputsLast:
    """A matmul weight stored with its input (contracted) axes last, so each output channel's
    inputs are contiguous: float values, or int8 with one float32 scale per output channel
    (`scale`, shaped like the output axes). Why: one row times such a weight can be a multiply
    summed over the inputs, a row reduction that XLA's GPU compiler streams at 62-72% of the
    copy bandwidth on an H200, where its GEMM of the model's [inputs, outputs] layout, with
    the row padded to two, reached 31-66% (benchmarks/weight_layout.py, RESULTS.md). Reading it
    whole (`w[...]`) gives the weight in its own layout (dequantised), for any other reader."""
    v: jax.Array                          # [outputs..., inputs...]
    scale: jax.Array | None               # float32 [outputs...] (int8 v); None (float v)
    n_in: int = struct.field(pytree_node=False, default=1)
    dtype: str = struct.field(pytree_node=False, default="float32")  # the weight's own dtype

    @classmethod
    def of(cls, w, axes: tuple[int, ...]):
        """A weight (float, or an Int8Weight) whose input axes are `axes`, laid out inputs last;
        a weight whose inputs do not lead (stacked experts) is returned as it is."""
        n = len(axes)
        if axes != tuple(range(n)):
            return w
        q = w.q if isinstance(w, Int8Weight) else w
        order = tuple(range(n, q.ndim)) + tuple(range(n))
        scale = w.scale.reshape(q.shape[n:]) if isinstance(w, Int8Weight) else None
        dtype = w.dtype if isinstance(w, Int8Weight) else jnp.dtype(w.dtype).name
        return cls(jnp.transpose(q, order), scale, n, dtype)

    @property
    def shape(self):
        n = self.v.ndim - self.n_in
        return self.v.shape[n:] + self.v.shape[:n]

    def __getitem__(self, index):
        n = self.v.ndim - self.n_in
        w = jnp.transpose(self.v, tuple(range(n, self.v.ndim)) + tuple(range(n)))
        if self.scale is not None:
            w = w.astype(jnp.float32) * self.scale.reshape((1,) * self.n_in + self.scale.shape)
        return w.astype(self.dtype)[index]

    def project(self, subscripts: str, x, dtype):
        """einsum(subscripts, x, the weight) in `dtype`, accumulated in float32: one row as a
        product summed over the inputs, more rows as a dot of the inputs-last layout; a
        product that does not contract exactly the weight's inputs (closing x in the same
        order) reads the weight whole."""
        ins, out = subscripts.replace(" ", "").split("->")
        xs, ws = ins.split(",")
        n = self.n_in
        if xs[-n:] != ws[:n] or out != xs[:-n] + ws[n:] or len(set(xs + ws)) != len(xs + ws) - n:
            return jnp.einsum(subscripts, x, self[...].astype(dtype))
        M, K = math.prod(x.shape[:-n]), math.prod(x.shape[-n:])
        N = math.prod(self.v.shape[:-n])
        x_MxK, v_NxK = x.reshape(M, K), self.v.reshape(N, K)
        if M == 1:
            y_MxN = jnp.sum(x_MxK.astype(jnp.float32)[:, None, :] * v_NxK.astype(jnp.float32),
                            axis=-1)
        else:
            y_MxN = jnp.einsum("mk,nk->mn", x_MxK.astype(dtype), v_NxK.astype(dtype),
                               preferred_element_type=jnp.float32)
        if self.scale is not None:
            y_MxN = y_MxN * self.scale.reshape(N)
        return y_MxN.astype(dtype).reshape(*x.shape[:-n], *self.v.shape[:-n])


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
    if isinstance(w, InputsLast):
        return w.project(subscripts, x, dtype)
    subscripts, x, w = merge_contracted(subscripts, x, w)
    if fp8 and fp8_active() and not isinstance(w, Int8Weight):
        return fp8_einsum(subscripts, x, w, dtype, amax_2xH, fp8_margin())
    if not isinstance(w, Int8Weight):
        return jnp.einsum(subscripts, x, w.astype(dtype))
    y = jnp.einsum(subscripts, x, w.q.astype(dtype))
    # the scale laid out as the output: contracting size-1 input axes is a broadcast
    scale = jnp.einsum(subscripts, jnp.ones((1,) * x.ndim, jnp.float32), w.scale)
    return (y.astype(jnp.float32) * scale).astype(dtype)
