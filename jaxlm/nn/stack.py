"""The one stack runner: a family's layer stack as scan / loop / unroll / remat over units.

A unit is a Block or a Group of blocks; every unit returns (h, aux, cache). Parameters of a scanned
stack are stacked on a leading 'layers' axis (one compiled body, and the axis pipeline parallelism
splits); unscanned, the units are a list. `Stack` is how runners see it: `layer_fn()` is the stack
as a pure function over the stacked state (what the pipeline schedules need) and calling it runs
the whole stack. Aux terms of the units are summed. A KV cache goes through unscanned stacks
only: decoding splits a scanned model's units out of their stacked arrays first (a scan would
slice each layer's weights and rewrite the whole stacked cache on every decode step).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.block import Block, BlockConfig, LayerInputs

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class StackConfig:
    num_units: int
    scan: bool = True
    unroll: int = 1          # units per scan iteration (num_units: straight-line code)
    remat: str = "none"      # none | full | save_dots


def add_aux(a: dict, b: dict) -> dict:
    """Sum of two aux trees: terms present in both are added, the others kept ({} is zero)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = v if k not in a else add_aux(a[k], v) if isinstance(v, dict) else a[k] + v
    return out


def run_in_order(calls, h_BxSxD, inputs: LayerInputs, cache=None):
    """call(h, inputs, cache) -> (h, aux, cache) for each call in turn: (h, summed aux, the
    tuple of their caches, or None when no cache was passed)."""
    caches = (None,) * len(calls) if cache is None else cache
    aux, new = {}, []
    for call, one_cache in zip(calls, caches):
        h_BxSxD, a, one_cache = call(h_BxSxD, inputs, one_cache)
        aux, new = add_aux(aux, a), new + [one_cache]
    return h_BxSxD, aux, None if cache is None else tuple(new)


class Group(nnx.Module):
    """Blocks run in order as one stack unit (e.g. dense, dense, MoE), so a stack whose layers
    differ still scans one homogeneous unit. Its cache is a tuple of its blocks' caches."""

    def __init__(self, configs: list[BlockConfig], rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(c, rngs) for c in configs])

    def __call__(self, h_BxSxD, inputs: LayerInputs, cache=None):
        return run_in_order(list(self.blocks), h_BxSxD, inputs, cache)

    def empty_cache(self, batch: int, max_len: int):
        return tuple(block.empty_cache(batch, max_len) for block in self.blocks)


def build(c: StackConfig, make_unit, rngs: nnx.Rngs) -> nnx.Module:
    """`num_units` units from make_unit(rngs): stacked on 'layers' (scan) or an nnx.List."""
    if not c.scan:
        return nnx.List([make_unit(rngs) for _ in range(c.num_units)])

    @nnx.split_rngs(splits=c.num_units)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_stack(rngs):
        return make_unit(rngs)
    return make_stack(rngs)


class Stack:
    """A view of a family's `layers` (built by `build`) with the config that runs them."""

    def __init__(self, c: StackConfig, layers: nnx.Module):
        self.c, self.layers = c, layers

    def layer_fn(self):
        """(unit(unit_state, h, inputs, cache) -> (h, aux, cache), stacked unit state)."""
        graphdef, stacked = nnx.split(self.layers)
        apply = self._unit_call()
        return ((lambda state, h, inputs, cache: apply(nnx.merge(graphdef, state), h, inputs,
                                                       cache)), stacked)

    def empty_cache(self, batch: int, max_len: int):
        """Every unit's empty KV cache, a tuple as `__call__` takes them (unscanned only)."""
        _no_scanned_cache(self.c)
        return tuple(unit.empty_cache(batch, max_len) for unit in self.layers)

    def __call__(self, h_BxSxD, inputs: LayerInputs, cache=None):
        """Every unit in order: (h, summed aux, cache). `cache` (unscanned stacks only) is a
        tuple of the units' caches. Variables a unit updates in its forward pass
        (non-parameters, e.g. MoE's balancing bias) are updated in place."""
        apply = self._unit_call()
        if not self.c.scan:
            calls = [functools.partial(apply, unit) for unit in self.layers]
            return run_in_order(calls, h_BxSxD, inputs, cache)
        if cache is not None:
            _no_scanned_cache(self.c)
        graphdef, stacked = nnx.split(self.layers)

        def body(h, unit_state):
            unit = nnx.merge(graphdef, unit_state)
            h, a, _ = apply(unit, h, inputs, None)
            return h, (a, nnx.state(unit, nnx.Not(nnx.Param)))

        h_BxSxD, (aux_U, updated_U) = jax.lax.scan(body, h_BxSxD, stacked, unroll=self.c.unroll)
        nnx.update(self.layers, updated_U)
        return h_BxSxD, jax.tree.map(lambda a: jnp.sum(a, axis=0), aux_U), None

    def _unit_call(self):
        """unit(h, inputs, cache) the way the stack calls it: under the remat policy."""
        apply = lambda unit, h, inputs, cache: unit(h, inputs, cache)  # noqa: E731
        if self.c.remat == "none":
            return apply
        # Inside a rolled scan loop XLA cannot CSE the recomputation away, so the barrier is
        # not needed; unrolled (a Python loop, or unroll > 1) it is, or remat is a no-op.
        rolled = self.c.scan and self.c.unroll == 1
        return nnx.remat(apply, policy=REMAT_POLICIES[self.c.remat], prevent_cse=not rolled)


def _no_scanned_cache(c: StackConfig):
    if c.scan:
        raise ValueError("a scanned stack takes no KV cache: decoding runs the layers as a list "
                         "(jaxlm.generate.lm.unstack_layers)")


class Chain:
    """Stacks run one after the other (e.g. DeepSeek's dense first layers, then its MoE layers),
    called like one Stack; its cache is a tuple of theirs. Not one homogeneous stack, so the
    pipeline schedules cannot split it."""

    def __init__(self, stacks: list[Stack]):
        self.stacks = stacks

    def layer_fn(self):
        raise ValueError("a chain of differing stacks has no single per-unit function for the "
                         "pipeline schedules to split")

    def empty_cache(self, batch: int, max_len: int):
        return tuple(s.empty_cache(batch, max_len) for s in self.stacks)

    def __call__(self, h_BxSxD, inputs: LayerInputs, cache=None):
        return run_in_order(self.stacks, h_BxSxD, inputs, cache)
