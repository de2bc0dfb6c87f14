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

from jaxlm.config import ModelConfig
from jaxlm.models.attention import Attention
from jaxlm.models.layers import MLP, RMSNorm, param
from jaxlm.sharding import _ctx, constrain, logical_to_spec

ACT = ("act_batch", "act_res_seq", "act_embed")  # the residual stream (as in llama.py)
AUX_KEYS = ("moe_lb_loss", "moe_z_loss", "moe_dropped_frac", "moe_load")


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

    @classmethod
    def from_model(cls, m: ModelConfig, out_std: float) -> "MoEConfig":
        return cls(m.d_model, m.num_experts, m.experts_per_token, m.expert_ffn_dim or m.ffn_dim,
                   m.num_shared_experts, m.router, m.dispatch, m.capacity_factor, m.init_std,
                   out_std, jnp.dtype(m.dtype), jnp.dtype(m.param_dtype))


# ---------------------------------------------------------------- routing and aux losses

def route(x_TxD, w_router_DxE, k: int, kind: str):
    """Router in fp32. Returns combine weights [T,k] (normalised over the k picks when k > 1 or
    for sigmoid scores; a single softmax pick keeps its raw probability, as in Switch, so the
    router still gets a gradient from the output),
    expert ids [T,k], per-token probabilities [T,E] (summing to 1, for the balance loss) and the
    raw logits [T,E] (for the z-loss)."""
    logits_TxE = jnp.einsum("td,de->te", x_TxD.astype(jnp.float32),
                            w_router_DxE.astype(jnp.float32))
    if kind == "softmax":
        scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
        probs_TxE = scores_TxE
    else:  # sigmoid (DeepSeek-V3): independent scores; the balance loss uses them normalised
        scores_TxE = jax.nn.sigmoid(logits_TxE)
        probs_TxE = scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
    top_TxK, experts_TxK = jax.lax.top_k(scores_TxE, k)
    if k > 1 or kind == "sigmoid":
        top_TxK = top_TxK / jnp.sum(top_TxK, axis=-1, keepdims=True)
    return top_TxK, experts_TxK, probs_TxE, logits_TxE


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


def _expert_axis():
    """The mesh axis (or None) that the active rules put the `expert` dim on, and its size."""
    mesh, rules = _ctx.mesh, _ctx.rules
    if mesh is None:
        return None, None, 1
    axis = logical_to_spec(("expert",), rules, mesh)[0]
    if axis is None:
        return mesh, None, 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return mesh, axis, math.prod(mesh.shape[a] for a in names)


# ---------------------------------------------------------------- modules

class MoE(nnx.Module):
    """Router + E SwiGLU experts (+ shared experts). Returns (y, aux) with aux per AUX_KEYS."""

    def __init__(self, c: MoEConfig, rngs: nnx.Rngs):
        E, D, F, pdt = c.num_experts, c.d_model, c.expert_ffn_dim, c.param_dtype
        self.router = param(rngs, (D, E), ("embed", None), c.std, pdt)
        self.w_gate = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c.std, pdt)
        self.w_up = param(rngs, (E, D, F), ("expert", "embed", "mlp"), c.std, pdt)
        self.w_down = param(rngs, (E, F, D), ("expert", "mlp", "embed"), c.out_std, pdt)
        if c.num_shared_experts:
            self.shared = MLP(D, c.num_shared_experts * F, std=c.std, out_std=c.out_std,
                              dtype=c.dtype, param_dtype=pdt, rngs=rngs)
        self.c = c

    def __call__(self, x_BxSxD):
        c = self.c
        B, S, D = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(B * S, D)
        weights_TxK, experts_TxK, probs_TxE, logits_TxE = route(
            x_TxD, self.router[...], c.experts_per_token, c.router)
        ws = tuple(w[...].astype(c.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        mesh, axis, ep = _expert_axis()
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
                shard, mesh=mesh, axis_names=names, check_vma=False,
                in_specs=(tok, tok, tok, (exp, exp, exp)), out_specs=(tok, P()))(
                    x_TxD, experts_TxK, weights_TxK, ws)
            dropped = dropped[0]
        y_BxSxD = y_TxD.reshape(B, S, D)
        if c.num_shared_experts:
            y_BxSxD = y_BxSxD + self.shared(x_BxSxD)
        aux = {"moe_lb_loss": load_balance_loss(probs_TxE, experts_TxK),
               "moe_z_loss": router_z_loss(logits_TxE),
               "moe_dropped_frac": dropped / experts_TxK.size,
               "moe_load": expert_load(experts_TxK, c.num_experts)}
        return y_BxSxD, aux


class MoEBlock(nnx.Module):
    """A decoder block whose feed-forward is an MoE; returns (h, aux)."""

    def __init__(self, bc, mc: MoEConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(bc.d_model, bc.norm_eps, bc.param_dtype)
        self.attn = Attention(bc.d_model, bc.num_heads, bc.num_kv_heads, bc.head_dim,
                              rope_theta=bc.rope_theta, impl=bc.attention, std=bc.std,
                              out_std=bc.out_std, dtype=bc.dtype, param_dtype=bc.param_dtype,
                              rngs=rngs)
        self.mlp_norm = RMSNorm(bc.d_model, bc.norm_eps, bc.param_dtype)
        self.moe = MoE(mc, rngs)

    def __call__(self, h_BxSxD, positions_BxS, segment_ids_BxS):
        h_BxSxD = h_BxSxD + self.attn(self.attn_norm(h_BxSxD), positions_BxS, segment_ids_BxS)
        h_BxSxD = constrain(h_BxSxD, ACT)
        y_BxSxD, aux = self.moe(self.mlp_norm(h_BxSxD))
        return constrain(h_BxSxD + y_BxSxD, ACT), aux


class MoEGroup(nnx.Module):
    """moe_every - 1 dense blocks then one MoE block: one scanned unit, so a stack that alternates
    dense and MoE layers stays homogeneous (parameters stacked per group on 'layers')."""

    def __init__(self, make_dense, bc, mc: MoEConfig, num_dense: int, rngs: nnx.Rngs):
        self.dense = nnx.List([make_dense(rngs) for _ in range(num_dense)])
        self.moe_block = MoEBlock(bc, mc, rngs)

    def __call__(self, h_BxSxD, positions_BxS, segment_ids_BxS):
        for block in self.dense:
            h_BxSxD = block(h_BxSxD, positions_BxS, segment_ids_BxS)
        return self.moe_block(h_BxSxD, positions_BxS, segment_ids_BxS)


def make_unit(make_dense, bc, m: ModelConfig, rngs: nnx.Rngs):
    """The scanned unit of an MoE model: an MoEBlock (moe_every=1) or an MoEGroup."""
    mc = MoEConfig.from_model(m, bc.out_std)
    if m.moe_every == 1:
        return MoEBlock(bc, mc, rngs)
    return MoEGroup(make_dense, bc, mc, m.moe_every - 1, rngs)


STAT_KEYS = ("moe_lb_loss", "moe_z_loss", "moe_dropped_frac", "moe_load_max", "moe_load_min")


def aux_loss(aux: dict, m: ModelConfig):
    """Weighted aux losses (averaged over MoE layers) to add to the mean token loss, and the
    float stats (STAT_KEYS) to log."""
    num_moe_layers = m.num_layers // m.moe_every
    lb = aux["moe_lb_loss"] / num_moe_layers
    z = aux["moe_z_loss"] / num_moe_layers
    load_E = aux["moe_load"] / num_moe_layers
    stats = {"moe_lb_loss": lb, "moe_z_loss": z,
             "moe_dropped_frac": aux["moe_dropped_frac"] / num_moe_layers,
             # as multiples of the uniform share 1/E: 1.0 is perfect balance
             "moe_load_max": jnp.max(load_E) * m.num_experts,
             "moe_load_min": jnp.min(load_E) * m.num_experts}
    return m.aux_loss_weight * lb + m.z_loss_weight * z, stats


def num_units(m: ModelConfig) -> int:
    """Length of the scanned stack: layers, or groups of moe_every layers for an MoE model."""
    return m.num_layers // m.moe_every if m.num_experts else m.num_layers


def zero_aux(m: ModelConfig) -> dict:
    """The aux accumulator a layer stack starts from ({} for a dense model)."""
    if not m.num_experts:
        return {}
    z = jnp.zeros((), jnp.float32)
    return {"moe_lb_loss": z, "moe_z_loss": z, "moe_dropped_frac": z,
            "moe_load": jnp.zeros((m.num_experts,), jnp.float32)}


def split_aux(out):
    """A layer's output as (h, aux): dense blocks return h alone, MoE units (h, aux)."""
    return out if isinstance(out, tuple) else (out, {})


def add_aux(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a} if b else a
