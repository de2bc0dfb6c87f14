"""The jitted functions over the train state: the train step (with gradient accumulation) and
the eval step. They know the objective only as a function returning (token NLL sum, token count,
aux), and add the aux loss terms to the objective without knowing what they are."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm import nonfinite
from jaxlm.config import Config
from jaxlm.models.moe_fields import MoEFields
from jaxlm.nn.fp8 import AMAX_KEY, matmul_precision
from jaxlm.objectives import OBJECTIVES
from jaxlm.optim import learning_rate_schedule
from jaxlm.parallel.pipeline import Plan
from jaxlm.parallel.ring import zigzag_order
from jaxlm.parallel.sharding import BATCH_NAMES, batch_sharding, constrain, use_rules
from jaxlm.state import StateSpec, build_state


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
    from_weights: Callable     # ({'params', 'model_state'}, seed) -> state, optimizer fresh
    token_order: np.ndarray | None = None  # the steps' order of a row's tokens (None: natural)

    def lay_out(self, batch: dict) -> dict:
        """A host batch ([B, length] fields) in the order the steps read a row's tokens: under
        ring attention, the zig-zag order that gives every device of the ring an early and a
        late chunk, so causal work is even. Every per-token field moves alike (positions and
        segment ids travel with their tokens; the loss is a sum over tokens)."""
        if self.token_order is None:
            return batch
        n = len(self.token_order)
        return {k: x[:, self.token_order] if x.shape[1] == n else x for k, x in batch.items()}


def build_step_fns(cfg: Config, mesh: Mesh) -> StepFns:
    spec = build_state(cfg, mesh)
    batch_sh = batch_sharding(mesh, cfg.mesh.rules)
    loss_fn = make_loss_fn(cfg, mesh, spec.graphdef)
    replicated = NamedSharding(mesh, P())
    options = compiler_options(cfg, mesh)
    train = jax.jit(make_train_step(cfg, mesh, spec, loss_fn),
                    in_shardings=(spec.shardings, batch_sh),
                    out_shardings=(spec.shardings, replicated), donate_argnums=0,
                    compiler_options=options)

    def eval_step(state, batch):
        (nll, tokens, _), _ = loss_fn(state["params"], batch, state.get("model_state"))
        return nll, tokens

    evaluate = jax.jit(eval_step, in_shardings=(spec.shardings, batch_sh),
                       out_shardings=replicated, compiler_options=options)
    ring = mesh.shape.get("sequence", 1) if cfg.mesh.context_parallel == "ring" else 1
    order = None if ring == 1 else zigzag_order(cfg.data.seq_len, ring)
    return StepFns(spec.graphdef, spec.optimizer, spec.abstract_state, spec.shardings, batch_sh,
                   spec.init, train, evaluate, spec.param_count,
                   spec.from_weights, order)


def compiler_options(cfg: Config, mesh: Mesh) -> dict | None:
    """XLA options for the training and eval steps. On a GPU, a dense model's bf16 matmuls go
    to cuBLAS without XLA autotuning Triton GEMMs against it: cuBLAS's kernels ran the 1B
    step's GEMMs anyway, and the step compiled in 10.9-12.4 s against 15.1-16.6 s and ran
    179.6 ms against 181.1-181.7 (H200, cold CUDA cache, benchmarks/RESULTS.md). fp8 keeps the
    Triton GEMMs: without them its step ran 148.4 ms against 141.5. MoE models keep them too,
    unmeasured without (their experts' ragged products)."""
    gpu = mesh.devices.flat[0].platform == "gpu"
    if not gpu or cfg.model.matmul_precision == "fp8" or isinstance(cfg.model, MoEFields):
        return None
    return {"xla_gpu_enable_triton_gemm": False}


def make_loss_fn(cfg: Config, mesh: Mesh, graphdef):
    """(params, batch, model_state) -> (objectives.Loss, the model state after the forward
    pass), traced under the mesh's rules, with the stack run as the mesh's pipeline plan says.
    model_state: the variables the forward pass updates (None for models without any)."""
    objective = OBJECTIVES[cfg.model.objective]
    plan = Plan.of(mesh, cfg.pipeline)
    rules, cp = cfg.mesh.rules, cfg.mesh.context_parallel

    def loss_fn(params, batch, model_state=None):
        precision = matmul_precision(cfg.model.matmul_precision, cfg.model.fp8_margin)
        with use_rules(mesh, rules, cp), precision:
            model = nnx.merge(graphdef, params, model_state or {})
            loss = objective(model, batch, plan, cfg.model.loss_chunks)
        if model_state is None:
            return loss, None
        updated = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return loss, jax.lax.stop_gradient(updated)
    return loss_fn


def make_train_step(cfg: Config, mesh: Mesh, spec: StateSpec, loss_fn):
    """(state, batch) -> (state, metrics). The objective is the mean token NLL over the whole
    batch plus the aux loss terms (averaged over microbatches); metrics hold the mean token NLL,
    gradient norm, learning rate, token count and the aux stats."""
    tx, micro = spec.optimizer, cfg.train.microbatches
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    rules = cfg.mesh.rules

    def train_step(state, batch):
        params = state["params"]
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

        def grads_of(mb, model_state):
            amax = fp8_histories(model_state)

            def objective(p, amax):  # -> (objective, (mean token NLL, aux stats, model state))
                (nll, _, aux), model_state_out = loss_fn(p, mb, with_leaves(model_state, amax))
                token_loss = nll / total_tokens
                stats = jax.tree.map(lambda s: s / micro, aux.get("stats", {}))
                if not aux.get("losses"):
                    return token_loss, (token_loss, stats, model_state_out)
                extra = sum(aux["losses"].values())  # per microbatch: averaged over them
                return token_loss + extra / micro, (token_loss, stats, model_state_out)
            # delayed fp8 scaling: the "gradient" of the amax histories is their next value
            (_, (loss, stats, model_state)), (grads, amax) = jax.value_and_grad(
                objective, argnums=(0, 1), has_aux=True)(params, amax)
            return loss, stats, grads, with_leaves(model_state, amax)

        if micro == 1:
            loss, stats, grads, model_state = grads_of(batch, state.get("model_state"))
        else:
            # Strided split [B] -> [B/M, M] keeps every microbatch spread over all data shards.
            def split(x):
                x = x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)
                with use_rules(mesh, rules):
                    return constrain(x, (None,) + BATCH_NAMES)
            mbs = jax.tree.map(split, batch)

            def body(carry, mb):  # the model state a microbatch updates is the next one's
                loss, grads, model_state = carry
                l, stats, g, model_state = grads_of(mb, model_state)
                return (loss + l, jax.tree.map(jnp.add, grads, g), model_state), stats
            init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params),
                    state.get("model_state"))
            (loss, grads, model_state), stats_M = jax.lax.scan(body, init, mbs)
            stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats_M)

        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        rng, _ = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "tokens": total_tokens, "stats": stats}
        new_state = {"params": new_params, "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
        if model_state is not None:
            new_state["model_state"] = model_state
        new_state, metrics["nonfinite"] = nonfinite.guard(state, new_state, loss, grad_norm,
                                                          skip=cfg.train.on_nonfinite == "skip")
        return new_state, metrics
    return train_step


def fp8_histories(model_state) -> dict:
    """{'a/b/fp8_amax': array} of the model state's delayed-fp8 amax histories
    (jaxlm.nn.fp8.Fp8Amax, held under the name AMAX_KEY); empty without any."""
    if model_state is None:
        return {}
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(model_state).items()
            if k[-1] == AMAX_KEY}


def with_leaves(model_state, leaves: dict):
    """model_state with the leaves at these 'a/b/c' paths replaced."""
    if not leaves:
        return model_state
    flat = traverse_util.flatten_dict(model_state)
    paths = {"/".join(map(str, k)): k for k in flat}
    return traverse_util.unflatten_dict({**flat, **{paths[k]: v for k, v in leaves.items()}})


def abstract_batch(cfg: Config, sharding: NamedSharding, fields) -> dict:
    """The batch the step is compiled for: a [B, length] array of each of the data's fields
    (name -> (length, dtype), jaxlm.data's `fields`)."""
    B = cfg.train.global_batch_size
    return {k: jax.ShapeDtypeStruct((B, length), dtype, sharding=sharding)
            for k, (length, dtype) in fields.items()}
