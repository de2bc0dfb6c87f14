"""The train state and the jitted functions over it: init (already sharded), train step, eval step.

The state is a plain pytree: {'params': pure dict, 'opt_state': optax state, 'step': int32,
'rng': uint32[2]}. The model is rebuilt from params with `nnx.merge` inside each traced function,
so jit sees only arrays and the graph definition stays static.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm import nonfinite, pipeline
from jaxlm.config import Config
from jaxlm.models import build_model, moe
from jaxlm.optim import learning_rate_schedule, make_optimizer
from jaxlm.sharding import (add_axis, check_divisible, check_sufficiently_sharded, constrain,
                            logical_to_spec, tree_shardings, use_rules)

BATCH_NAMES = ("act_batch", "act_seq")


@dataclasses.dataclass
class StepFns:
    """Everything derived from (config, mesh) that the training loop needs."""
    graphdef: Any
    optimizer: optax.GradientTransformation
    abstract_state: Any        # ShapeDtypeStructs carrying their shardings
    state_shardings: Any
    batch_sharding: NamedSharding
    init: Callable             # seed -> state (jitted, sharded outputs)
    train_step: Callable       # (state, batch) -> (state, metrics)   (jitted, donates state)
    eval_step: Callable        # (params, batch) -> (nll_sum, token_count)
    param_count: int


def token_nll(graphdef, params, batch, use_segments: bool, with_aux: bool = False):
    """Summed next-token negative log-likelihood over unmasked positions, and their count; with
    `with_aux` also the model's MoE aux dict ({} for a dense model)."""
    model = nnx.merge(graphdef, params)
    if pipeline.wants_1f1b():  # the schedule needs the loss inside the pipeline
        out = pipeline.token_nll_1f1b(model, batch, use_segments)
        return (*out, {}) if with_aux else out
    logits_BxSxV, aux = model(batch["inputs"], batch["positions"],
                              batch["segment_ids"] if use_segments else None, return_aux=True)
    logp_BxSxV = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32), axis=-1)
    nll_BxS = -jnp.take_along_axis(logp_BxSxV, batch["targets"][..., None], axis=-1)[..., 0]
    mask_BxS = batch["loss_mask"].astype(jnp.float32)
    out = (jnp.sum(nll_BxS * mask_BxS), jnp.sum(mask_BxS))
    return (*out, aux) if with_aux else out


def build_step_fns(cfg: Config, mesh: Mesh) -> StepFns:
    rules = cfg.mesh.rules
    use_segments = cfg.data.source != "synthetic"  # synthetic rows hold one document each
    abstract_model = nnx.eval_shape(lambda: build_model(cfg.model, nnx.Rngs(0)))
    graphdef, abstract_params_state = nnx.split(abstract_model)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params_state))
    abstract_params = nnx.to_pure_dict(abstract_params_state)
    param_sh = tree_shardings(logical, mesh, rules)
    check_divisible(abstract_params, param_sh)
    check_sufficiently_sharded(
        jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                     abstract_params, param_sh),
        logical, mesh, cfg.mesh.max_unsharded_fraction)
    opt_param_sh = param_sh
    if cfg.mesh.zero1:  # ZeRO-1: optimizer moments split over `data` as well
        opt_param_sh = jax.tree.map(
            lambda s, sh: NamedSharding(mesh, add_axis(sh.spec, s.shape, "data", mesh)),
            abstract_params, param_sh)

    tx = make_optimizer(cfg.optim, cfg.train.steps, logical)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_opt, opt_param_sh,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
        is_leaf=lambda x: isinstance(x, NamedSharding))
    replicated = NamedSharding(mesh, P())
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}
    batch_sh = NamedSharding(mesh, logical_to_spec(BATCH_NAMES, rules, mesh))

    def init(seed):
        key = jax.random.key(seed)
        params_key, state_key = jax.random.split(key)
        model = build_model(cfg.model, nnx.Rngs(params=params_key))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(state_key)}

    init_jit = jax.jit(init, static_argnums=0, out_shardings=state_sh)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init, 0), state_sh)

    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    micro = cfg.train.microbatches

    def train_step(state, batch):
        with use_rules(mesh, rules), pipeline.use_pipeline(mesh, cfg.pipeline):
            params = state["params"]
            total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

            def grads_of(mb):
                def loss(p):  # -> (objective, (mean token NLL, MoE stats))
                    nll, _, aux = token_nll(graphdef, p, mb, use_segments, with_aux=True)
                    if not aux:
                        return nll / total_tokens, (nll / total_tokens, {})
                    extra, stats = moe.aux_loss(aux, cfg.model)  # per microbatch: average them
                    return (nll / total_tokens + extra / micro,
                            (nll / total_tokens, jax.tree.map(lambda s: s / micro, stats)))
                (_, (l, stats)), g = jax.value_and_grad(loss, has_aux=True)(params)
                return l, stats, g

            if micro == 1:
                loss, moe_stats, grads = grads_of(batch)
            else:
                # Strided split [B] -> [B/M, M] keeps every microbatch spread over all data shards.
                def split(x):
                    x = x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)
                    return constrain(x, (None,) + BATCH_NAMES)
                mbs = jax.tree.map(split, batch)

                def body(carry, mb):
                    return jax.tree.map(jnp.add, carry, grads_of(mb)), None
                zero = jnp.zeros((), jnp.float32)
                stat_keys = moe.STAT_KEYS if cfg.model.num_experts else ()
                zeros = (zero, {k: zero for k in stat_keys}, jax.tree.map(jnp.zeros_like, params))
                (loss, moe_stats, grads), _ = jax.lax.scan(body, zeros, mbs)

            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            rng, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))
            metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                       "lr": schedule(state["step"]), "tokens": total_tokens, **moe_stats}
            new_state = {"params": new_params, "opt_state": opt_state,
                         "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
            new_state, metrics["nonfinite"] = nonfinite.guard(
                state, new_state, loss, grads, skip=cfg.train.on_nonfinite == "skip")
            return new_state, metrics

    train_jit = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                        out_shardings=(state_sh, replicated), donate_argnums=0)

    def eval_step(params, batch):
        with use_rules(mesh, rules), pipeline.use_pipeline(mesh, cfg.pipeline):
            return token_nll(graphdef, params, batch, use_segments)

    eval_jit = jax.jit(eval_step, in_shardings=(param_sh, batch_sh), out_shardings=replicated)
    n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
    return StepFns(graphdef, tx, abstract_state, state_sh, batch_sh, init_jit, train_jit, eval_jit,
                   n_params)


def abstract_batch(cfg: Config, sharding: NamedSharding) -> dict:
    B, S = cfg.train.global_batch_size, cfg.data.seq_len
    i32 = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=sharding)
    return {"inputs": i32, "targets": i32, "segment_ids": i32, "positions": i32,
            "loss_mask": jax.ShapeDtypeStruct((B, S), jnp.float32, sharding=sharding)}
