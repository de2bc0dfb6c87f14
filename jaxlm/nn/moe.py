"""Mixture-of-Experts feed-forward (Mixtral / DeepSeek style) with expert parallelism.

A router scores every token against E experts, keeps the top k, and the token's output is the
weighted sum of those k SwiGLU experts (plus optional always-on shared experts). Two dispatch modes:
- dropless: assignments sorted by expert and run as one grouped matmul (`jax.lax.ragged_dot`), so
  no token is ever dropped and no FLOPs go to padding;
- capacity: each expert takes at most C = ceil(capacity_factor * T * k / E) assignments of a group
  of T tokens (top-1 choices first, then top-2, each in token order); the rest are dropped (counted
  in the stats) and contribute zero, as in GShard/Switch. Fixed shapes, but wasted/dropped work.

Expert parallelism: expert weights are sharded over the mesh axis that the `expert` rule names.
Tokens are batch-sharded over that axis too, so inside a `shard_map` manual over just that axis
each device routes its own tokens, sends each assignment to the device that owns its expert with
`all_to_all`, runs its local experts, and the results come back the same way. All other mesh axes
(data, fsdp, tensor) stay automatic. With one expert shard no collective runs: EP=1 is the plain
model, and the math is the same for every EP size (dropless exactly; capacity mode when no group
exceeds its capacity, since groups are the tokens of one expert shard).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlm.nn.mlp import MLP, MLPConfig
from jaxlm.nn.param import param
from jaxlm.parallel.sharding import active, mesh_axis_of


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    d_model: int
    num_experts: int
    experts_per_token: int
    expert_ffn_dim: int
    num_shared_experts: int
    router: str            # 'softmax' | 'sigmoid'
    dispatch: str          # 'dropless' | 'capacity'
    capacity_factor: float
    std: float
    out_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    aux_loss_weight: float = 0.0   # x the load-balancing loss, added to the objective
    z_loss_weight: float = 0.0     # x the router z-loss
    num_moe_layers: int = 1        # losses and stats are divided by it: a stack's sum is the mean
    # DeepSeek-V3 routing: experts in num_groups groups, a token picks among the experts of its
    # best groups_per_token groups; the combine weights times routed_scale
    num_groups: int = 1
    groups_per_token: int = 1
    routed_scale: float = 1.0
    # > 0: auxiliary-loss-free balancing: a bias added to the scores to pick experts (not to
    # weight them), moved by this much after every forward pass toward the uniform load
    bias_update_rate: float = 0.0

    @classmethod
    def of(cls, f, d_model: int, ffn_dim: int, std: float, out_std: float, dtype, param_dtype,
           num_moe_layers: int) -> "MoEConfig":
        """From a family config's MoE fields (jaxlm/models/moe_fields.py)."""
        return cls(d_model, f.num_experts, f.experts_per_token, f.expert_ffn_dim or ffn_dim,
                   f.num_shared_experts, f.router, f.dispatch, f.capacity_factor, std, out_std,
                   jnp.dtype(dtype), jnp.dtype(param_dtype), f.aux_loss_weight, f.z_loss_weight,
                   num_moe_layers, f.num_groups, f.groups_per_token, f.routed_scale,
                   f.bias_update_rate)


class SelectionBias(nnx.Variable):
    """Not trained by gradients: updated by the forward pass (MoE's balancing bias). The step
    carries such variables in the train state's `model_state`."""


# ---------------------------------------------------------------- routing and aux losses

def route(x_TxD, w_router_DxE, k: int, kind: str, bias_E=None, groups=(1, 1), scale=1.0):
    """Router in fp32. Returns combine weights [T,k] (normalised over the k picks when k > 1 or
    for sigmoid scores; a single softmax pick keeps its raw probability, as in Switch, so the
    router still gets a gradient from the output), expert ids [T,k], per-token probabilities
    [T,E] (summing to 1, for the balance loss) and the raw logits [T,E] (for the z-loss).
    `bias_E` shifts the scores that pick the experts (not the weights); `groups` =
    (num_groups, groups_per_token) limits each token to the experts of its best groups, a
    group's score being the sum of its two best (DeepSeek-V3); `scale` multiplies the weights."""
    logits_TxE = jnp.einsum("td,de->te", x_TxD.astype(jnp.float32),
                            w_router_DxE.astype(jnp.float32))
    if kind == "softmax":
        scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
        probs_TxE = scores_TxE
    else:  # sigmoid (DeepSeek-V3): independent scores; the balance loss uses them normalised
        scores_TxE = jax.nn.sigmoid(logits_TxE)
        probs_TxE = scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
    choice_TxE = scores_TxE if bias_E is None else scores_TxE + jax.lax.stop_gradient(bias_E)
    num_groups, groups_per_token = groups
    if num_groups > 1:
        T, E = choice_TxE.shape
        grouped_TxGxM = choice_TxE.reshape(T, num_groups, E // num_groups)
        group_score_TxG = jnp.sum(jax.lax.top_k(grouped_TxGxM, 2)[0], axis=-1)
        best_TxG = jax.lax.top_k(group_score_TxG, groups_per_token)[1]
        keep_TxG = jnp.zeros((T, num_groups), bool).at[jnp.arange(T)[:, None], best_TxG].set(True)
        choice_TxE = jnp.where(jnp.repeat(keep_TxG, E // num_groups, axis=1), choice_TxE, -jnp.inf)
    if bias_E is None and num_groups == 1:
        top_TxK, experts_TxK = jax.lax.top_k(scores_TxE, k)
    else:
        experts_TxK = jax.lax.top_k(choice_TxE, k)[1]
        top_TxK = jnp.take_along_axis(scores_TxE, experts_TxK, axis=-1)
    if k > 1 or kind == "sigmoid":
        top_TxK = top_TxK / jnp.sum(top_TxK, axis=-1, keepdims=True)
    return top_TxK * scale if scale != 1.0 else top_TxK, experts_TxK, probs_TxE, logits_TxE


def load_balance_loss(probs_TxE, experts_TxK):
    """Switch/Mixtral form E * sum_e f_e * P_e: f_e the fraction of the T*k assignments that chose
    expert e, P_e the mean router probability of e. 1.0 when perfectly balanced; gradient flows
    through P_e only (f_e comes from a top-k)."""
    E = probs_TxE.shape[-1]
    f_E = expert_load(experts_TxK, E)
    return E * jnp.sum(f_E * jnp.mean(probs_TxE, axis=0))


def router_z_loss(logits_TxE):
    """ST-MoE z-loss: mean squared log-partition function, keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1)))


def expert_load(experts_TxK, num_experts: int):
    """Fraction of assignments per expert (before any dropping); sums to 1."""
    counts_E = jnp.zeros((num_experts,), jnp.float32).at[experts_TxK.reshape(-1)].add(1.0)
    return counts_E / experts_TxK.size


def capacity(num_tokens: int, c: MoEConfig) -> int:
    return max(1, math.ceil(c.capacity_factor * num_tokens * c.experts_per_token / c.num_experts))


# ---------------------------------------------------------------- expert compute

def _swiglu_grouped(xs_MxD, sizes_G, wg_GxDxF, wu_GxDxF, wd_GxFxD):
    """Rows sorted by group; rows past sum(sizes) come out as zeros."""
    gate = jax.lax.ragged_dot(xs_MxD, wg_GxDxF, sizes_G)
    up = jax.lax.ragged_dot(xs_MxD, wu_GxDxF, sizes_G)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, wd_GxFxD, sizes_G)


def _swiglu_batched(x_GxCxD, wg_GxDxF, wu_GxDxF, wd_GxFxD):
    h = jax.nn.silu(jnp.einsum("gcd,gdf->gcf", x_GxCxD, wg_GxDxF)) * jnp.einsum(
        "gcd,gdf->gcf", x_GxCxD, wu_GxDxF)
    return jnp.einsum("gcf,gfd->gcd", h, wd_GxFxD)


def _a2a(x, axis, ep):
    """Block j of dim 0 goes to device j; received blocks are stacked by source on dim 0."""
    if ep == 1:
        return x
    return jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=0, tiled=True)


def dropless_local(x_TxD, experts_TxK, weights_TxK, ws, num_experts, axis=None, ep=1):
    """One expert shard's view: its tokens, its E/ep experts' weights `ws` (gate, up, down)."""
    T, K = experts_TxK.shape
    D = x_TxD.shape[-1]
    e_local = num_experts // ep
    flat_M = experts_TxK.reshape(-1)                      # M = T*K assignments, token-major
    order_M = jnp.argsort(flat_M, stable=True)            # grouped by expert, hence by device
    e_sorted_M = flat_M[order_M]
    xs_MxD = x_TxD[order_M // K]
    sizes_E = jnp.zeros((num_experts,), jnp.int32).at[flat_M].add(1)
    if ep == 1:
        ys_MxD = _swiglu_grouped(xs_MxD, sizes_E, *ws)
    else:
        # Send buffer [ep, M, D]: row r of the sorted list goes to its expert's device at its rank
        # among that device's rows (worst case all M to one device: dropless needs the room).
        dest_M = e_sorted_M // e_local
        start_P = jnp.cumsum(sizes_E.reshape(ep, e_local).sum(1)) - sizes_E.reshape(
            ep, e_local).sum(1)
        slot_M = jnp.arange(T * K) - start_P[dest_M]
        send_PxMxD = jnp.zeros((ep, T * K, D), x_TxD.dtype).at[dest_M, slot_M].set(xs_MxD)
        recv_PxMxD = _a2a(send_PxMxD, axis, ep)
        rsizes_PxL = _a2a(sizes_E.reshape(ep, e_local), axis, ep)  # [source, local expert]
        # Rows from each source are already grouped by local expert; regroup across sources.
        bounds_PxL = jnp.cumsum(rsizes_PxL, axis=1)
        rank_PxM = jnp.broadcast_to(jnp.arange(T * K), (ep, T * K))
        lid_PxM = jax.vmap(lambda b, r: jnp.searchsorted(b, r, side="right"))(bounds_PxL, rank_PxM)
        lid_N = lid_PxM.reshape(-1)                       # e_local marks padding rows
        order_N = jnp.argsort(lid_N, stable=True)
        out_N = _swiglu_grouped(recv_PxMxD.reshape(-1, D)[order_N], rsizes_PxL.sum(0), *ws)
        back_PxMxD = jnp.zeros_like(out_N).at[order_N].set(out_N).reshape(ep, T * K, D)
        ys_MxD = _a2a(back_PxMxD, axis, ep)[dest_M, slot_M]
    y_MxD = jnp.zeros_like(ys_MxD).at[order_M].set(ys_MxD)
    y_TxKxD = y_MxD.reshape(T, K, D)
    y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD.astype(jnp.float32), weights_TxK)
    return y_TxD.astype(x_TxD.dtype), jnp.zeros((), jnp.float32)


def capacity_local(x_TxD, experts_TxK, weights_TxK, ws, num_experts, cap, axis=None, ep=1):
    """Capacity dispatch for one group (one expert shard's tokens). Returns the output and the
    number of dropped assignments."""
    T, K = experts_TxK.shape
    D = x_TxD.shape[-1]
    E, C = num_experts, cap
    # Priority: every token's first choice before any second choice, each in token order.
    e_KT = experts_TxK.T.reshape(-1)
    onehot_KTxE = jax.nn.one_hot(e_KT, E, dtype=jnp.int32)
    pos_KT = jnp.sum((jnp.cumsum(onehot_KTxE, axis=0) - 1) * onehot_KTxE, axis=-1)
    keep_KT = pos_KT < C
    slot_KT = jnp.where(keep_KT, e_KT * C + pos_KT, E * C)  # E*C: a dump row, cut off below
    tok_KT = jnp.tile(jnp.arange(T), K)
    buf_ExCxD = jnp.zeros((E * C + 1, D), x_TxD.dtype).at[slot_KT].add(x_TxD[tok_KT])
    buf_ExCxD = buf_ExCxD[:E * C].reshape(E, C, D)
    # [ep(dest), E/ep, C, D] -> [ep(source), E/ep, C, D]: local experts see every group's slots.
    e_local = E // ep
    recv = _a2a(buf_ExCxD.reshape(ep, e_local, C, D), axis, ep)
    x_LxNxD = recv.transpose(1, 0, 2, 3).reshape(e_local, ep * C, D)
    y_LxNxD = _swiglu_batched(x_LxNxD, *ws)
    back = y_LxNxD.reshape(e_local, ep, C, D).transpose(1, 0, 2, 3)
    out_ExCxD = _a2a(back, axis, ep).reshape(E * C, D)
    y_KTxD = jnp.where(keep_KT[:, None], out_ExCxD[jnp.minimum(slot_KT, E * C - 1)], 0)
    y_TxKxD = y_KTxD.reshape(K, T, D).transpose(1, 0, 2)
    y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD.astype(jnp.float32), weights_TxK)
    return y_TxD.astype(x_TxD.dtype), jnp.sum(~keep_KT).astype(jnp.float32)


# ---------------------------------------------------------------- modules

class MoE(nnx.Module):
    """Router + E SwiGLU experts (+ shared experts). Returns (y, aux): aux["losses"] are the
    weighted load-balancing and z-losses to add to the objective, aux["stats"] what to log
    (both already divided by the number of MoE layers, so a stack's sum is their mean)."""

    def __init__(self, c: MoEConfig, rngs: nnx.Rngs):
        E, D, F, pdt = c.num_experts, c.d_model, c.expert_ffn_dim, c.param_dtype
        self.router = param(rngs, (D, E), ("embed", None), c.std, pdt)
        self.w_gate = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c.std, pdt)
        self.w_up = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c.std, pdt)
        self.w_down = param(rngs, (E, F, D), ("expert", "mlp", "embed"), c.out_std, pdt)
        if c.num_shared_experts:
            self.shared = MLP(MLPConfig(D, c.num_shared_experts * F, c.std, c.out_std, c.dtype,
                                        pdt), rngs)
        if c.bias_update_rate:
            self.selection_bias = SelectionBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,),
                                                eager_sharding=False)
        self.c = c

    def __call__(self, x_BxSxD):
        c = self.c
        B, S, D = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(B * S, D)
        bias_E = self.selection_bias[...] if c.bias_update_rate else None
        weights_TxK, experts_TxK, probs_TxE, logits_TxE = route(
            x_TxD, self.router[...], c.experts_per_token, c.router, bias_E,
            (c.num_groups, c.groups_per_token), c.routed_scale)
        if c.bias_update_rate:  # toward uniform load: raise the bias of underloaded experts
            load_E = expert_load(experts_TxK, c.num_experts)
            self.selection_bias[...] = jax.lax.stop_gradient(
                bias_E + c.bias_update_rate * jnp.sign(1.0 / c.num_experts - load_E))
        ws = tuple(w[...].astype(c.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        axis, ep = mesh_axis_of("expert")
        if c.dispatch == "dropless":
            fn = lambda *a, axis=None, ep=1: dropless_local(*a, c.num_experts, axis, ep)  # noqa
        else:
            cap = capacity(B * S // ep, c)
            fn = lambda *a, axis=None, ep=1: capacity_local(*a, c.num_experts, cap, axis, ep)  # noqa
        if ep == 1:
            y_TxD, dropped = fn(x_TxD, experts_TxK, weights_TxK, ws)
        else:
            names = set(axis) if isinstance(axis, tuple) else {axis}

            def shard(x, e, w, ws):
                y, d = fn(x, e, w, ws, axis=axis, ep=ep)
                return y, jax.lax.psum(d, axis)[None]

            tok, exp = P(axis), P(axis, None, None)
            y_TxD, dropped = jax.shard_map(
                shard, mesh=active()[0], axis_names=names, check_vma=False,
                in_specs=(tok, tok, tok, (exp, exp, exp)), out_specs=(tok, P()))(
                    x_TxD, experts_TxK, weights_TxK, ws)
            dropped = dropped[0]
        y_BxSxD = y_TxD.reshape(B, S, D)
        if c.num_shared_experts:
            y_BxSxD = y_BxSxD + self.shared(x_BxSxD)
        return y_BxSxD, self._aux(probs_TxE, logits_TxE, experts_TxK, dropped)

    def _aux(self, probs_TxE, logits_TxE, experts_TxK, dropped):
        c, n = self.c, self.c.num_moe_layers
        lb = load_balance_loss(probs_TxE, experts_TxK)
        z = router_z_loss(logits_TxE)
        load_E = expert_load(experts_TxK, c.num_experts) * c.num_experts  # 1.0: uniform share
        losses = {"moe_lb_loss": c.aux_loss_weight * lb / n, "moe_z_loss": c.z_loss_weight * z / n}
        stats = {"moe_lb_loss": lb / n, "moe_z_loss": z / n,
                 "moe_dropped_frac": dropped / experts_TxK.size / n,
                 "moe_load_max": jnp.max(load_E) / n, "moe_load_min": jnp.min(load_E) / n}
        return {"losses": losses, "stats": stats}
