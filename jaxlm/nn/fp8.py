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

Scaling: the weight's scale is always *current* (its own amax / the format's largest value,
taken in the step that uses it: one cheap pass over the weight). The activation's and the
output gradient's scales are current under `model.fp8_scaling: current` (the default), and
*delayed* under `delayed`: each comes from the largest amax in a history of the last
`model.fp8_amax_history` steps, and this step's amax joins the history. Why delayed: a current
scale needs the tensor's amax before it can be cast, a whole extra pass over every activation
and gradient that keeps the cast out of the fusion that produced the tensor; with the scale
known in advance XLA may round in the producer's pass. Its price is state, and an outlier
beyond the history's range saturates for a step. Measured (H200, 1B preset, one call): 141.0
against 144.5 ms a step for current scaling. The rest of fp8's cost, and what was tried against
it, is in benchmarks/RESULTS.md.

The histories (`Fp8Amax`, one [sites, 2, H] array per layer that projects: row 0 the inputs', row 1
the output gradients'; projections that share an input share its row, see `site`) live in the train
state's `model_state`: sharded, checkpointed and restored with it. The output gradient's amax only
exists in the backward pass, so the step differentiates its loss with respect to the histories too,
and this custom VJP returns each site's updated history (input's and gradient's amax rolled in) as
its "gradient"; the step stores that as the new history (jaxlm.step). Each history is read once per
forward, so no cotangents add up; pipeline stages run a layer on several microbatches in one
differentiated program, where they would, and take `current` (jaxlm.config refuses delayed there).
The first step has no history and uses scale 1 (the learning-rate warm-up keeps its rounding
harmless). Master weights and the optimizer stay float32 as always.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp
from flax import nnx

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
PRECISIONS = ("default", "fp8")
AMAX_KEY = "fp8_amax"  # the attribute layers hold their Fp8Amax under


class _Policy(threading.local):
    precision: str = "default"
    margin: int = 0  # delayed scaling's headroom in bits (model.fp8_margin)
    history: int = 0  # while a model is built: the amax history length layers get (0: none)


_policy = _Policy()


@contextlib.contextmanager
def matmul_precision(precision: str, margin: int = 0):
    """Inside: `param.project` multiplies in fp8 (`fp8`) or in the compute dtype (`default`),
    delayed scales with `margin` bits of headroom."""
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision {precision!r}: expected one of {PRECISIONS}")
    prev = _policy.precision, _policy.margin
    _policy.precision, _policy.margin = precision, margin
    try:
        yield
    finally:
        _policy.precision, _policy.margin = prev


def fp8_active() -> bool:
    return _policy.precision == "fp8"


def fp8_margin() -> int:
    return _policy.margin


class Fp8Amax(nnx.Variable):
    """A layer's amax histories [sites, 2, H] (inputs, output gradients) for delayed fp8
    scaling: model state, replaced each step through its gradient (see the module docstring)."""


@contextlib.contextmanager
def delayed_scaling(history: int):
    """Inside: layers built get amax histories of this length (`amax_state`); 0: none."""
    prev, _policy.history = _policy.history, history
    try:
        yield
    finally:
        _policy.history = prev


def amax_state(sites: int) -> Fp8Amax | None:
    """For a layer's constructor: zeroed histories for its `sites` fp8 projections when the
    model is built for delayed scaling (model.fp8_scaling), else None."""
    if not _policy.history:
        return None
    return Fp8Amax(jnp.zeros((sites, 2, _policy.history), jnp.float32),
                   out_sharding=(None, None, None), eager_sharding=False)


def site(amax: Fp8Amax | None, index: int, input_of: int | None = None):
    """The [2, H] histories of a layer's projection number `index` (None without any).
    input_of: the projection whose input this one multiplies too (self-attention's k and v
    read q's, gate reads up's): the input history is read from there and left for that one
    to update (its own input row stays empty), so every cast of the shared input is the same
    computation, which XLA does once, as it does for current scaling."""
    if amax is None:
        return None
    histories = amax[...]
    if input_of is None:
        return histories[index]
    return jnp.stack([jax.lax.stop_gradient(histories[input_of][0]), histories[index][1]])


def delayed_scale(history_H, fmt, margin: int = 0):
    """The scale the largest amax of a history asks for, times 2^margin (1 while the history
    is empty)."""
    amax = jnp.max(history_H)
    return jnp.where(amax > 0, _scale_for(amax, fmt) * 2.0 ** margin, 1.0)


def roll_in(history_H, amax):
    """The history with this step's amax first and the oldest dropped."""
    return jnp.concatenate([amax.astype(jnp.float32)[None], history_H[:-1]])


def scale_of(x, fmt):
    """Per-tensor current scale: amax / the format's largest finite value (1 for all zeros)."""
    return _scale_for(amax_of(x), fmt)


def _scale_for(amax, fmt):
    return jax.lax.stop_gradient(jnp.where(amax > 0, amax / float(jnp.finfo(fmt).max), 1.0))


def quantise(x, fmt, scale=None):
    """(x / scale as fmt, scale): the operand a float8 matmul takes, with the given scale or
    its per-tensor current one (clipped: float8_e4m3fn has no infinity, and an overflow would
    be NaN)."""
    scale = scale_of(x, fmt) if scale is None else scale
    big = float(jnp.finfo(fmt).max)
    return jnp.clip(x.astype(jnp.float32) / scale, -big, big).astype(fmt), scale


def amax_of(x):
    return jax.lax.stop_gradient(jnp.max(jnp.abs(x.astype(jnp.float32))))


def gradient_subscripts(subscripts: str) -> tuple[str, str]:
    """For y = einsum('x,w->y'): the subscripts of dx = einsum('y,w->x') and
    dw = einsum('x,y->w'), valid when every index of x and of w is in y or in the other."""
    ins, out = subscripts.replace(" ", "").split("->")
    x, w = ins.split(",")
    for name, a, b in (("x", x, w), ("w", w, x)):
        if not set(a) <= set(out) | set(b):
            raise ValueError(f"fp8 einsum {subscripts!r}: an index of {name} is summed alone")
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


def fp8_einsum(subscripts: str, x, w, dtype, history_2xH=None, margin: int = 0):
    """einsum(subscripts, x, w) with float8 operands: x and w as e4m3, and in the backward the
    output's gradient as e5m2 against the saved e4m3 operands; accumulation in float32, each
    product written in `dtype` (x's gradient in the gradient's dtype) and rescaled by its
    operands' scales. The operands reach the matmul as float8 arrays, which is what XLA's GPU
    compiler hands to cuBLAS's fp8 GEMM. The weight is rounded from its stored (master) dtype,
    with no `dtype` copy in between, and its gradient comes back in that dtype.
    history_2xH: this projection's amax histories (delayed scaling; None: current scaling);
    its gradient is the updated histories; margin: their scales' headroom in bits."""
    x = x.astype(dtype)
    if history_2xH is None:
        return _fp8_current(subscripts, jnp.dtype(w.dtype), x, w)
    return _fp8_delayed(subscripts, jnp.dtype(w.dtype), margin, x, w, history_2xH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fp8_current(subscripts, w_dtype, x, w):
    return _current_fwd(subscripts, w_dtype, x, w)[0]


def _current_fwd(subscripts, w_dtype, x, w):
    (xq, sx), (wq, sw) = quantise(x, E4M3), quantise(w, E4M3)
    return _scaled(subscripts, xq, wq, sx * sw, x.dtype), (xq, sx, wq, sw)


def _current_bwd(subscripts, w_dtype, res, g):
    xq, sx, wq, sw = res
    return _gradients(subscripts, w_dtype, xq, sx, wq, sw, *quantise(g, E5M2), g.dtype)


def _gradients(subscripts, w_dtype, xq, sx, wq, sw, gq, sg, g_dtype):
    dx_sub, dw_sub = gradient_subscripts(subscripts)
    return (_scaled(dx_sub, gq, wq, sg * sw, g_dtype),
            _scaled(dw_sub, xq, gq, sx * sg, w_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fp8_delayed(subscripts, w_dtype, margin, x, w, history_2xH):
    return _delayed_fwd(subscripts, w_dtype, margin, x, w, history_2xH)[0]


def _delayed_fwd(subscripts, w_dtype, margin, x, w, history_2xH):
    xq, sx = quantise(x, E4M3, delayed_scale(history_2xH[0], E4M3, margin))
    wq, sw = quantise(w, E4M3)
    y = _scaled(subscripts, xq, wq, sx * sw, x.dtype)
    return y, (xq, sx, wq, sw, roll_in(history_2xH[0], amax_of(x)), history_2xH[1])


def _delayed_bwd(subscripts, w_dtype, margin, res, g):
    xq, sx, wq, sw, x_history_H, g_history_H = res
    gq, sg = quantise(g, E5M2, delayed_scale(g_history_H, E5M2, margin))
    dx, dw = _gradients(subscripts, w_dtype, xq, sx, wq, sw, gq, sg, g.dtype)
    return dx, dw, jnp.stack([x_history_H, roll_in(g_history_H, amax_of(g))])


def _scaled(subscripts, a, b, scale, dtype):
    """einsum of two float8 arrays written in `dtype`, times the product of their scales. The
    GEMM writes `dtype` itself: a float32 product of an activation-sized output, rescaled and
    cast in a second pass, cost the 1B step ~10% (H200: 110.6k against 100.0k tokens/s)."""
    return jnp.einsum(subscripts, a, b, preferred_element_type=dtype) * scale.astype(dtype)


_fp8_current.defvjp(_current_fwd, _current_bwd)
_fp8_delayed.defvjp(_delayed_fwd, _delayed_bwd)
