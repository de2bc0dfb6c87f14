"""int8 weight-only quantisation for decoding: a transform of the state an LM holds.

Each matmul weight (attention and MLA projections, dense and expert MLPs, an untied head) is
replaced in the state by an `Int8Weight`: the weight rounded to int8 with one float32 scale per
output channel (max |w| over its input axes / 127) (jaxlm.nn.param). The dense layers multiply
through `param.project`, which feeds the int8 values to the matmul and scales its product, so
XLA reads one byte per weight; other reads (MoE expert stacks, MLA's up-projections, BERT's
heads) take `self.w[...]`, which dequantises next to the matmul. The model is the training
model merged with this state.

Why a state transform and not an nnx Variable subclass: the graph definition stays the
training model's (checkpoints, the HF loaders and `abstract_weights` keep one definition), and
the int8 arrays are plain leaves that jit and device_put already handle. Not quantised: the
token table (a lookup, and the tied head that reads it), norms, T5's relative-bias tables, MoE routers (small; routing is sensitive).
Input axes come from the weight's logical names: a weight whose last axis is `embed` projects
back to the residual stream (all other non-stacked axes are inputs); any other reads its first
non-stacked axis (embed, lora, mlp) as the input.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.param import InputsLast, Int8Weight
from jaxlm.optim import is_bias

STACKED = ("layers", "expert")  # leading axes that index separate matrices
SKIP = ("embed", "router", "table", "scale", "selection_bias")  # leaf names never quantised
# weights their layer reads whole (MLA's absorbed decoding slices wkv_b), kept in their own
# layout: laid out inputs last, every decode step would transpose them back
WHOLE = ("wkv_b",)


def input_axes(names) -> tuple[int, ...] | None:
    """The axes a matmul weight with these logical names contracts (None: not a matmul
    weight: fewer than two non-stacked axes, or an unnamed axis)."""
    lead = 0
    while lead < len(names) and names[lead] in STACKED:
        lead += 1
    rest = names[lead:]
    if len(rest) < 2 or any(n is None for n in rest):
        return None
    if rest[-1] == "embed":
        return tuple(range(lead, len(names) - 1))
    return (lead,)


def quantize_int8(w, axes: tuple[int, ...]) -> Int8Weight:
    """Symmetric per-output-channel int8: |error| <= scale / 2 per element."""
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale, jnp.dtype(w.dtype).name)


def quantize_state(state: dict, abstract_state) -> dict:
    """The pure-dict state (all variables, or a part such as a train state's params) with every
    matmul weight, found by the logical names of `abstract_state` (the model's nnx state from
    eval_shape), replaced by an Int8Weight."""
    return _map_matmul_weights(state, abstract_state, quantize_int8)


def cast_matmul_weights(state: dict, abstract_state, dtype) -> dict:
    """The state with every matmul weight (the same ones quantize_state picks) held in the
    compute `dtype` where it is stored wider: the float32 master weights of a training run
    are cast at every use anyway (param.project), so this changes no number, and a decode step
    (which reads every weight once) reads half the bytes. Norms, routers, tables, the token
    table and model_state keep their dtype: some are read in float32."""
    dtype = jnp.dtype(dtype)

    def cast(w, axes):
        if jnp.dtype(w.dtype).itemsize <= dtype.itemsize:
            return w
        if isinstance(w, jax.ShapeDtypeStruct):  # an abstract state (benchmarks/cache_bytes.py)
            return jax.ShapeDtypeStruct(w.shape, dtype, sharding=w.sharding)
        return w.astype(dtype)
    return _map_matmul_weights(state, abstract_state, cast)


def inputs_last_state(state: dict, abstract_state) -> dict:
    """The state with every matmul weight (float, or already an Int8Weight) laid out with its
    input axes last (jaxlm.nn.param.InputsLast): a batch-1 decode step then multiplies its one
    row by each weight as a row reduction. Stacked expert weights, and those read whole
    (WHOLE), keep their layout."""
    return _map_matmul_weights(state, abstract_state, InputsLast.of, skip=WHOLE)


def _map_matmul_weights(state: dict, abstract_state, fn, skip=()) -> dict:
    """`fn(weight, input axes)` applied to each matmul weight of the pure-dict state (but
    those whose leaf name is in `skip`). Biases are no matmul weights, whatever their axes."""
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    names = {_key(p): tuple(s) for p, s in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.get_partition_spec(abstract_state)), is_leaf=is_spec)[0]}

    def one(path, w):
        key = _key(path)
        leaf = key[-1]
        axes = None if leaf in SKIP + tuple(skip) or is_bias(leaf) else input_axes(names[key])
        return w if axes is None else fn(w, axes)
    return jax.tree_util.tree_map_with_path(one, state,
                                            is_leaf=lambda x: isinstance(x, Int8Weight))


def _key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def weight_bytes(state) -> int:
    """Bytes of every array in a state (int8 weights count their int8 values and scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
