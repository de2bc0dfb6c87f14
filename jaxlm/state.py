"""The train state before it exists: its abstract shapes and shardings (checked against the mesh
before anything is allocated), the optimizer, and an initialiser that creates it already sharded.

The state is a plain pytree: {'params': pure dict, 'opt_state': optax state, 'step': int32,
'rng': uint32[2]}, plus 'model_state' where the model has variables that are not trained by
gradients but updated by its forward pass (MoE's balancing bias). The model is rebuilt from them
with `nnx.merge` inside each traced function, so jit sees only arrays and the graph definition
stays static.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import Config
from jaxlm.models.registry import build_model
from jaxlm.optim import make_optimizer
from jaxlm.parallel.sharding import (add_axis, check_divisible, check_sufficiently_sharded,
                                     tree_shardings)


@dataclasses.dataclass
class StateSpec:
    graphdef: Any               # the model's static structure (nnx)
    optimizer: optax.GradientTransformation
    abstract_state: Any         # ShapeDtypeStructs carrying their shardings
    shardings: Any              # NamedSharding per state leaf
    init: Callable              # seed -> state (jitted, sharded outputs)
    param_count: int
    from_weights: Callable      # (weights, seed) -> state: given params (and model_state), the
                                # optimizer fresh (fine-tuning imported weights)


def build_state(cfg: Config, mesh: Mesh) -> StateSpec:
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
    graphdef, abstract_params_state, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params_state))
    abstract_params = nnx.to_pure_dict(abstract_params_state)
    param_sh = _checked_param_shardings(cfg, mesh, abstract_params, logical)
    tx = make_optimizer(cfg.optim, cfg.train.steps, logical)
    replicated = NamedSharding(mesh, P())
    state_sh = {"params": param_sh,
                "opt_state": _optimizer_shardings(cfg, mesh, tx, abstract_params, param_sh),
                "step": replicated, "rng": replicated}
    has_model_state = bool(jax.tree.leaves(abstract_rest))
    if has_model_state:
        state_sh["model_state"] = tree_shardings(
            nnx.to_pure_dict(nnx.get_partition_spec(abstract_rest)), mesh, cfg.mesh.rules)

    def from_weights(weights, seed):
        state = {"params": weights["params"], "opt_state": tx.init(weights["params"]),
                 "step": jnp.zeros((), jnp.int32),
                 "rng": jax.random.key_data(jax.random.split(jax.random.key(seed))[1])}
        if has_model_state:
            state["model_state"] = weights["model_state"]
        return state

    def init(seed):
        model = build_model(cfg.model, nnx.Rngs(params=jax.random.split(jax.random.key(seed))[0]))
        weights = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                   "model_state": nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))}
        return from_weights(weights, seed)

    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init, 0), state_sh)
    weights_sh = {k: v for k, v in state_sh.items() if k in ("params", "model_state")}
    return StateSpec(graphdef, tx, abstract_state, state_sh,
                     jax.jit(init, static_argnums=0, out_shardings=state_sh),
                     sum(x.size for x in jax.tree.leaves(abstract_params)),
                     jax.jit(from_weights, static_argnums=1, in_shardings=(weights_sh,),
                             out_shardings=state_sh, donate_argnums=0))


def abstract_weights(model_cfg, mesh: Mesh, rules) -> dict:
    """{'params'[, 'model_state']} of a model as ShapeDtypeStructs with their shardings, and no
    optimizer: what generation, export and weight loading read."""
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, nnx.Rngs(0)))
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    wanted = {"params": params, **({"model_state": rest} if jax.tree.leaves(rest) else {})}
    out = {}
    for k, v in wanted.items():
        shapes = nnx.to_pure_dict(v)
        shardings = tree_shardings(nnx.to_pure_dict(nnx.get_partition_spec(v)), mesh, rules)
        check_divisible(shapes, shardings)  # one line naming the tensor, not JAX's error
        out[k] = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              shapes, shardings)
    return out


def _checked_param_shardings(cfg, mesh, abstract_params, logical):
    """Parameter shardings from the rules, refused (one line naming the tensor) where a dimension
    does not divide its mesh axes or too much is left replicated."""
    param_sh = tree_shardings(logical, mesh, cfg.mesh.rules)
    check_divisible(abstract_params, param_sh)
    check_sufficiently_sharded(
        jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                     abstract_params, param_sh),
        logical, mesh, cfg.mesh.max_unsharded_fraction)
    return param_sh


def _optimizer_shardings(cfg, mesh, tx, abstract_params, param_sh):
    """Optimizer moments sharded like their parameters; with ZeRO-1 also split over `data`."""
    moment_sh = param_sh
    if cfg.mesh.zero1:
        moment_sh = jax.tree.map(
            lambda s, sh: NamedSharding(mesh, add_axis(sh.spec, s.shape, "data", mesh)),
            abstract_params, param_sh)
    return optax.tree_map_params(
        tx, lambda _, sh: sh, jax.eval_shape(tx.init, abstract_params), moment_sh,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
        is_leaf=lambda x: isinstance(x, NamedSharding))
