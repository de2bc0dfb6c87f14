"""Pipeline parallelism over the `stage` mesh axis: GPipe, circular (virtual stages) and 1F1B.

The rules table cannot express a pipeline: it splits the stacked layer parameters over `stage`
('layers' -> 'stage'), but something must move activations between the devices that hold
consecutive layers. Here that is a `jax.shard_map` that is manual over `stage` only (the other
mesh axes stay automatic, so FSDP/TP/data sharding inside a stage is still the rules table's job)
and a `ppermute` ring between neighbouring stages, one hop per tick.

Schedules (S stages, M microbatches, V virtual stages per device):
- gpipe: all forwards, then (by autodiff of the forward scan) all backwards. Every tick's
  activations stay alive until its backward, so activation memory grows with M.
- circular: each device holds V non-contiguous layer groups (device s: groups s, s+S, ...); a
  microbatch goes round the ring V times. Same autodiff backward; bubble (S-1)/(MV+S-1).
- 1f1b: a hand-written schedule in one scan, forward of microbatch t-s and backward of
  microbatch t-(2S-2-s) on stage s at tick t, the loss head on the last stage in between. Each
  stage keeps only the inputs of the microbatches in flight (a ring of 2S-1 slots) and recomputes
  its layers in the backward (jax.vjp per tick), so activation memory does not grow with M. It
  computes loss and gradients together and reaches autodiff through a custom_vjp.

`schedule_table` is the same schedule as plain data (who does what at each tick), for counting
the bubble; the executors below follow the same index formulas.

Known costs, kept for one simple layout: embedding and head stay outside the stage split
(replicated over `stage`, computed by every stage on the same rows; on 1f1b the head and loss run
every tick on every stage, masked off except on the last). Circular takes the parameters in the
contiguous order the rules table splits ('layers' -> stage: device s holds layers s*L/S...), so
`_layout` moves them to the circular order (an all-to-all over `stage`) every step, and autodiff
moves their gradients back; storing them circularly would make the parameter order, and so the
checkpoints, depend on the mesh.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxlm.parallel import sharding

AXIS = "stage"


# ---------------------------------------------------------------- the schedule as data

def schedule_table(schedule: str, stages: int, microbatches: int, virtual: int = 1):
    """table[t][s] = list of (kind, microbatch, virtual stage) that stage s runs at tick t, kind
    'F' or 'B'. Backward ticks are listed for 1f1b only (the others get theirs from autodiff, a
    mirror image of the forward with the same bubble)."""
    S, M, V = stages, microbatches, virtual
    if schedule == "1f1b":
        ticks = M + 2 * S - 2
        return [[[("F", t - s, 0)] * (0 <= t - s < M) + [("B", t - (2 * S - 2 - s), 0)]
                 * (0 <= t - (2 * S - 2 - s) < M) for s in range(S)] for t in range(ticks)]
    ticks = M * V + S - 1
    table = []
    for t in range(ticks):
        row = []
        for s in range(S):
            u = t - s
            row.append([("F",) + _circular_index(u, S, V)] if 0 <= u < M * V else [])
        table.append(row)
    return table


def _circular_index(u, S, V):
    """(microbatch, virtual stage) that a stage runs `u` ticks after it started: microbatches go in
    groups of S, each group round the ring V times before the next group enters."""
    k, r = u // (S * V), u % (S * V)
    return k * S + r % S, r // S


def bubble_fraction(table) -> float:
    """Idle (stage, tick) slots over all slots, a 1f1b tick counting as one F slot plus one B
    slot, so all schedules are measured in the same unit (one forward's worth of work)."""
    slots = idle = 0
    kinds = {k for row in table for cell in row for k, _, _ in cell}
    for row in table:
        for cell in row:
            for kind in sorted(kinds):
                slots += 1
                idle += not any(k == kind for k, _, _ in cell)
    return idle / slots


def bubble_formula(schedule: str, stages: int, microbatches: int, virtual: int = 1) -> float:
    S, M, V = stages, microbatches, virtual
    if schedule == "1f1b":
        return (2 * S - 2) / (M + 2 * S - 2)  # per direction: the forward stream lags B by S-1
    return (S - 1) / (M * V + S - 1)


# ---------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Plan:
    """How a step runs the layer stack over `stage`; built once per (config, mesh) and passed to
    whoever runs the stack (jaxlm.objectives)."""
    mesh: Mesh
    schedule: str
    microbatches: int
    virtual: int

    @property
    def stages(self) -> int:
        return self.mesh.shape[AXIS]

    @classmethod
    def of(cls, mesh: Mesh, pipeline_cfg) -> "Plan | None":
        """The plan for a mesh with stage > 1, else None (the stack runs as one scan)."""
        if mesh.shape[AXIS] == 1:
            return None
        return cls(mesh, pipeline_cfg.schedule, pipeline_cfg.microbatches,
                   pipeline_cfg.virtual_stages if pipeline_cfg.schedule == "circular" else 1)


# ---------------------------------------------------------------- helpers

def _split_microbatches(x, M):
    """[B, ...] -> [M, B/M, ...], strided so each microbatch stays spread over the data shards."""
    return x.reshape(x.shape[0] // M, M, *x.shape[1:]).swapaxes(0, 1)


def _merge_microbatches(x):
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _layout(stacked, S, V):
    """[L, ...] -> [S, V, L/(SV), ...] with device s holding layer groups s, s+S, ... (circular);
    for V=1 a pure reshape of the contiguous split the rules table already made."""
    def one(x):
        L = x.shape[0]
        x = x.reshape(V, S, L // (S * V), *x.shape[1:])
        return x.swapaxes(0, 1)
    return jax.tree.map(one, stacked)


def _ring(x, S, step=1):
    return jax.lax.ppermute(x, AXIS, [(i, (i + step) % S) for i in range(S)])


def _index(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def _select(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _group_fn(layer_fn):
    """Runs one layer group (a stack of L/(SV) layers) on one microbatch: (h, the layers' aux
    terms summed)."""
    def run(group_state, h, inputs):
        def body(h, layer_state):
            return layer_fn(layer_state, h, inputs)
        h, aux_L = jax.lax.scan(body, h, group_state)
        return h, jax.tree.map(lambda a: jnp.sum(a, axis=0), aux_L)
    return run


def _shard_map(plan, fn, in_specs, out_specs):
    """Manual over `stage` only. Activation constraints inside must name the mesh as seen there
    (stage Manual), not the outer one, so the active rules are re-entered on that mesh."""
    rules = sharding.active()[1]

    def body(*args):
        if rules is None:
            return fn(*args)
        with sharding.use_rules(jax.sharding.get_abstract_mesh(), rules):
            return fn(*args)

    return jax.shard_map(body, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=frozenset({AXIS}), check_vma=False)


# ---------------------------------------------------------------- GPipe / circular

def run_stack(plan: Plan, layer_fn: Callable, stacked, h_BxSxD, inputs_BxS):
    """The layer stack on the plan: layer_fn(layer_state, h, inputs) -> (h, aux), applied in
    order over the leading (layer) dim of `stacked`. `inputs` (a pytree of per-row arrays every
    layer reads: positions, segment ids; None allowed) is split into microbatches like h.
    Returns (h_out, aux): aux (e.g. MoE's balancing losses and load stats) summed over the layers
    and averaged over the microbatches, as `train.microbatches` averages them."""
    S, M, V = plan.stages, plan.microbatches, plan.virtual
    xs = _split_microbatches(h_BxSxD, M)
    aux = jax.tree.map(lambda a: _split_microbatches(a, M), inputs_BxS)
    laid = _layout(stacked, S, V)
    group = _group_fn(layer_fn)

    def per_stage(laid_1, xs_MxBxSxD, aux_M):
        params_V = jax.tree.map(lambda a: a[0], laid_1)  # this device's V layer groups
        s = jax.lax.axis_index(AXIS)

        def tick(carry, t):
            buf, out = carry
            u = t - s
            on = (u >= 0) & (u < M * V)
            uc = jnp.clip(u, 0, M * V - 1)
            i = (uc // (S * V)) * S + uc % S
            v = (uc % (S * V)) // S
            x = jnp.where((s == 0) & (v == 0), _index(xs_MxBxSxD, i), buf)
            y, terms = group(_index(params_V, v), x, _index(aux_M, i))
            y = jnp.where(on, y, buf)
            done = on & (s == S - 1) & (v == V - 1)
            out = jnp.where(done, jax.lax.dynamic_update_index_in_dim(out, y, i, 0), out)
            terms = jax.tree.map(lambda a: jnp.where(on, a, jnp.zeros_like(a)), terms)
            return (_ring(y, S), out), terms

        init = (jnp.zeros_like(xs_MxBxSxD[0]), jnp.zeros_like(xs_MxBxSxD))
        (_, out), terms_T = jax.lax.scan(tick, init, jnp.arange(M * V + S - 1))
        # every stage's layers, every microbatch: summed over ticks and stages, then a mean
        terms = jax.lax.psum(jax.tree.map(lambda a: jnp.sum(a, axis=0), terms_T), AXIS)
        return out[None], jax.tree.map(lambda a: a / M, terms)  # out: only the last stage's

    spec_l = jax.tree.map(lambda _: P(AXIS), laid)
    out_SxMx, terms = _shard_map(plan, per_stage, (spec_l, P(), jax.tree.map(lambda _: P(), aux)),
                                 (P(AXIS), P()))(laid, xs, aux)
    return _merge_microbatches(out_SxMx[S - 1]), terms


# ---------------------------------------------------------------- 1F1B

def one_f_one_b_loss(plan: Plan, layer_fn, tail_fn, stacked, tail_params, h_BxSxD, inputs_BxS,
                     tail_aux_BxS):
    """Sum over rows of tail_fn(tail_params, h_out_mb, *tail_aux_mb) (e.g. the head and the
    summed token NLL) where h_out = the layer stack applied to h_BxSxD, on the 1F1B schedule.
    layer_fn is run_stack's, its aux terms empty: 1F1B does not carry them (MoE is refused on
    1f1b at config time, and here at trace time).
    Differentiable in stacked, tail_params and h_BxSxD; the gradients are computed in the
    forward (that is the schedule) and only scaled by the cotangent in the backward."""
    def plain(stacked, tail_params, h):  # no gradients wanted (eval): a GPipe forward
        h_out, _ = run_stack(plan, layer_fn, stacked, h, inputs_BxS)
        return tail_fn(tail_params, h_out, *tail_aux_BxS)

    @jax.custom_vjp
    def loss_fn(stacked, tail_params, h):
        return plain(stacked, tail_params, h)

    def fwd(stacked, tail_params, h):
        loss, grads = _one_f_one_b(plan, layer_fn, tail_fn, stacked, tail_params, h, inputs_BxS,
                                   tail_aux_BxS)
        return loss, grads

    def bwd(grads, ct):
        return jax.tree.map(lambda g: (g * ct).astype(g.dtype), grads)

    loss_fn.defvjp(fwd, bwd)
    return loss_fn(stacked, tail_params, h_BxSxD)


def _one_f_one_b(plan, layer_fn, tail_fn, stacked, tail_params, h_BxSxD, inputs_BxS,
                 tail_aux_BxS):
    S, M = plan.stages, plan.microbatches
    K = 2 * S - 1  # inputs in flight on stage 0: forwarded at tick i, backwarded at i + 2S - 2
    xs = _split_microbatches(h_BxSxD, M)
    aux = jax.tree.map(lambda a: _split_microbatches(a, M), inputs_BxS)
    tail_aux = jax.tree.map(lambda a: _split_microbatches(a, M), tail_aux_BxS)
    laid = _layout(stacked, S, 1)
    group = _group_fn(layer_fn)

    def per_stage(laid_1, tail_p, xs_MxBxSxD, aux_M, tail_aux_M):
        params = jax.tree.map(lambda a: a[0, 0], laid_1)
        s = jax.lax.axis_index(AXIS)
        last = s == S - 1
        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731

        def tick(carry, t):
            fwd_buf, bwd_buf, stash, dxs, g_params, g_tail, loss = carry
            f, b = t - s, t - (2 * S - 2 - s)
            f_on, b_on = (f >= 0) & (f < M), (b >= 0) & (b < M)
            fc, bc = jnp.clip(f, 0, M - 1), jnp.clip(b, 0, M - 1)
            # forward of microbatch f
            x = jnp.where(s == 0, _index(xs_MxBxSxD, fc), fwd_buf)
            stash = jnp.where(f_on, jax.lax.dynamic_update_index_in_dim(stash, x, fc % K, 0),
                              stash)
            y, terms = group(params, x, _index(aux_M, fc))
            if jax.tree.leaves(terms):  # config refuses this (has_aux_losses), unless a new
                # family with aux losses forgets to say so: then this, not silently dropped terms
                raise ValueError("the 1f1b schedule does not carry the layers' aux losses "
                                 "(MoE); use pipeline.schedule=gpipe or circular")
            # the last stage turns its output straight into a loss and a cotangent
            l, tail_vjp = jax.vjp(lambda tp, yy: tail_fn(tp, yy, *_index(tail_aux_M, fc)),
                                  tail_p, y)
            dtail, dy = tail_vjp(jnp.ones_like(l))
            keep = f_on & last
            loss = loss + jnp.where(keep, l, 0)
            g_tail = _select(keep, jax.tree.map(jnp.add, g_tail, dtail), g_tail)
            # backward of microbatch b (= f on the last stage), recomputing this stage's layers
            x_b = jax.lax.dynamic_index_in_dim(stash, bc % K, keepdims=False)
            _, stage_vjp = jax.vjp(lambda p, xx: group(p, xx, _index(aux_M, bc))[0], params,
                                   x_b)
            dparams, dx = stage_vjp(jnp.where(last, dy, bwd_buf))
            g_params = _select(b_on, jax.tree.map(jnp.add, g_params, dparams), g_params)
            dxs = jnp.where(b_on & (s == 0), jax.lax.dynamic_update_index_in_dim(dxs, dx, bc, 0),
                            dxs)
            return (_ring(y, S), _ring(dx, S, -1), stash, dxs, g_params, g_tail, loss), None

        x0 = jnp.zeros_like(xs_MxBxSxD[0])
        init = (x0, x0, jnp.zeros((K,) + x0.shape, x0.dtype), jnp.zeros_like(xs_MxBxSxD),
                zeros(params), zeros(tail_p), jnp.zeros((), jnp.float32))
        (_, _, _, dxs, g_params, g_tail, loss), _ = jax.lax.scan(
            tick, init, jnp.arange(M + 2 * S - 2))
        # loss, tail grads and input grads live on one stage each: sum them onto all
        loss, g_tail, dxs = jax.lax.psum((loss, g_tail, dxs), AXIS)
        g_params = jax.tree.map(lambda a: a[None, None], g_params)
        return loss, g_params, g_tail, dxs

    rep = lambda t: jax.tree.map(lambda _: P(), t)  # noqa: E731
    spec_l = jax.tree.map(lambda _: P(AXIS), laid)
    loss, g_laid, g_tail, dxs = _shard_map(
        plan, per_stage, (spec_l, rep(tail_params), P(), rep(aux), rep(tail_aux)),
        (P(), spec_l, rep(tail_params), P()))(laid, tail_params, xs, aux, tail_aux)
    g_stacked = jax.tree.map(lambda g, a: g.swapaxes(0, 1).reshape(a.shape), g_laid, stacked)
    return loss, (g_stacked, g_tail, _merge_microbatches(dxs).astype(h_BxSxD.dtype))
