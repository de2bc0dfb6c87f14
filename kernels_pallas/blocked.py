"""Flash attention as BlockSpec Pallas kernels: the Mosaic TPU backend, and (interpret=True) the one
the CPU tests run. Called through `kernels_pallas.flash`, which validates, pads and owns the vjp.

Layout. q/k/v are transposed to [B, H, S, D] in XLA before the calls (and the results back), so
every block is a (rows, head_dim) tile with the sequence on sublanes and head_dim on lanes, as
Mosaic TPU tiles memory. A TPU block's last two dims must be multiples of (8, 128) or whole, which
a (1, block) slice of a [B, H, S] array is not; so row statistics (lse, delta) and q-side segment
ids travel lane-broadcast as [..., S, 128], kv-side segment ids sublane-broadcast as [B, 8, S].
That costs a transient 512 bytes per (b, h, s) row statistic; the residual kept for the backward
is the plain [B, H, S] lse. On TPU block_kv must be a multiple of 128 unless it is the whole
(padded) sequence; the interpreter takes any multiple of 8.

Kernels (online softmax, fp32 statistics and accumulators in VMEM scratch, FA2 backward):
  forward  grid (B, H, q blocks, kv steps)         -> out, lse
  dq       grid (B, H, q blocks, kv steps)         -> dq
  dk/dv    grid (B, G, kv blocks, H//G, q steps)   -> dk, dv
K/V are never repeated for GQA: kv index maps send q head h to kv head h // (H//G). dk/dv reduce
over the group's H//G q heads and the q blocks along the two trailing "arbitrary" grid axes into
one scratch accumulator per kv block, so no per-q-head dk/dv ever exists.

Skipping. Causal and sliding-window masks are static, so for each q block the kv blocks holding a
visible key form a band [lo, hi] (`_kv_band`; `_q_band` for the dk/dv kernel). The kv grid axis
walks only the widest band (`steps`): with a window of W the grid is about (bq + W) / bk steps
long, not S / bk. Steps past a block's band compute nothing (pl.when) and their index map repeats
the band's last block, so the pipeline fetches nothing new. Block pairs with every (query, key)
visible skip the elementwise mask; the others (causal diagonal, window edges, and every block when
segment ids are given, since those are data) build it from iotas.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Large, finite: a fully masked row (or block) gives exp(MASK - MASK) = 1 terms that the first
# visible key wipes out via exp(MASK - m) = 0, never inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES, SUBLANES = 128, 8
MAX_BLOCK = 128  # default tile: big enough to feed the MXU, small enough for VMEM with D = 256


@dataclasses.dataclass(frozen=True)
class _Tiles:
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int


_BLOCK_FIELDS = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")  # the others are Hopper's


def _explicit_blocks(problem) -> list[int]:
    blocks = [getattr(problem.blocks, f) for f in _BLOCK_FIELDS]
    blocks = [b for b in blocks if b is not None]
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0 or b % SUBLANES:
            raise ValueError(f"flash_attention: block sizes must be positive multiples of "
                             f"{SUBLANES}; got {problem.blocks}")
    return blocks


def seq_multiple(problem, S: int) -> int:
    """Pad S to a multiple of every block: the explicit ones and the default, min(128, the next
    power of two >= S, at least 8) — a short sequence is one block, not padded to 128."""
    default = min(MAX_BLOCK, max(SUBLANES, pl.next_power_of_2(S)))
    return math.lcm(default, *_explicit_blocks(problem))


def _tiles(problem, S: int) -> _Tiles:
    """Block sizes for an already padded S. A default (None) is the largest power of two <= 128
    dividing S: after `seq_multiple` padding that is at least the default padded for."""
    default = min(MAX_BLOCK, S & -S)
    _explicit_blocks(problem)
    tiles = _Tiles(*(getattr(problem.blocks, f) or default for f in _BLOCK_FIELDS))
    for size in dataclasses.astuple(tiles):
        if S % size or size % SUBLANES:
            raise ValueError(f"flash_attention: sequence {S} is not a multiple of block {size} "
                             f"(blocks {tiles}); call through kernels_pallas.flash, which pads")
    if not problem.interpret and any(bk % LANES and bk != S for bk in (tiles.bk, tiles.bk_bwd)):
        # kv blocks are the lane dim of the logits and of the kv segment-id block
        raise ValueError(f"flash_attention: on Mosaic TPU block_kv and block_kv_bwd must be "
                         f"multiples of {LANES} or the whole padded sequence ({S}); got {tiles}")
    return tiles


# ---- static mask geometry: works on Python ints (grid sizes) and traced int32 (index maps) ----

def _minmax(x):
    return (min, max) if isinstance(x, int) else (jnp.minimum, jnp.maximum)


def _kv_band(problem, qi, bq, bk, nk):
    """First and last kv block holding a key visible from some query of q block qi."""
    mn, mx = _minmax(qi)
    q_first, q_last = qi * bq, qi * bq + bq - 1
    W = problem.sliding_window
    lo = 0 if W is None else mx(q_first - W + 1, 0) // bk
    if problem.causal:
        hi = q_last // bk
    elif W is not None:
        hi = mn((q_last + W - 1) // bk, nk - 1)
    else:
        hi = nk - 1
    return lo, hi


def _q_band(problem, ki, bq, bk, nq):
    """First and last q block holding a query that sees some key of kv block ki."""
    mn, mx = _minmax(ki)
    k_first, k_last = ki * bk, ki * bk + bk - 1
    W = problem.sliding_window
    if problem.causal:
        lo = k_first // bq
    elif W is not None:
        lo = mx(k_first - W + 1, 0) // bq
    else:
        lo = 0
    hi = nq - 1 if W is None else mn((k_last + W - 1) // bq, nq - 1)
    return lo, hi


def _steps(band, n_outer):
    """Grid length of the inner axis: the widest band over the outer blocks."""
    return max(hi - lo + 1 for lo, hi in map(band, range(n_outer)))


def _clamped(band):
    """Index map helper: block lo + j of outer block i's band, repeating the last past its end."""
    def block(i, j):
        lo, hi = band(i)
        return jnp.minimum(lo + j, hi)
    return block


def _fully_visible(problem, qi, ki, bq, bk):
    """True (static) or a traced bool: every (query, key) pair of the block pair is unmasked by
    causal/window (segment ids are checked elementwise regardless)."""
    q_first, q_last, k_first, k_last = qi * bq, qi * bq + bq - 1, ki * bk, ki * bk + bk - 1
    conds = []
    if problem.causal:
        conds.append(k_last <= q_first)
    if problem.sliding_window is not None:
        conds += [q_last - k_first < problem.sliding_window,
                  k_last - q_first < problem.sliding_window]
    return functools.reduce(jnp.logical_and, conds) if conds else True


def _visible_QxK(problem, q_first, k_first, bq, bk, seg_q_ref, seg_kv_ref):
    rows_QxK = q_first + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols_QxK = k_first + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    vis_QxK = jnp.ones((bq, bk), jnp.bool_)
    if problem.causal:
        vis_QxK &= cols_QxK <= rows_QxK
    if problem.sliding_window is not None:
        W = problem.sliding_window
        vis_QxK &= (rows_QxK - cols_QxK < W) & (cols_QxK - rows_QxK < W)
    if seg_q_ref is not None:
        vis_QxK &= seg_q_ref[...][:, :1] == seg_kv_ref[...][:1, :]
    return vis_QxK


def _when_needed(problem, in_band, full, step):
    """Run step(masked) only for block pairs in the band, without the mask where none is needed."""
    if problem.has_segments:
        pl.when(in_band)(lambda: step(True))
    elif full is True:
        pl.when(in_band)(lambda: step(False))
    else:
        pl.when(in_band & full)(lambda: step(False))
        pl.when(in_band & jnp.logical_not(full))(lambda: step(True))


def _dot(a, b, contract):
    """fp32-accumulating matmul; contract = (a's dim, b's dim). HIGHEST keeps fp32 inputs fp32 on
    the MXU (its default would round them to bf16)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32, precision=prec)


def _logits_QxK(problem, q_ref, k_ref, masked, q_first, k_first, seg_q_ref, seg_kv_ref):
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    s_QxK = _dot(q_ref[...], k_ref[...], (1, 1)) * problem.sm_scale
    if masked:
        vis_QxK = _visible_QxK(problem, q_first, k_first, bq, bk, seg_q_ref, seg_kv_ref)
        s_QxK = jnp.where(vis_QxK, s_QxK, MASK_VALUE)
    return s_QxK


def _lanes(x_Qx1):
    return jnp.broadcast_to(x_Qx1, (x_Qx1.shape[0], LANES))


# ---- kernels ----

def _kv_visit(problem, q_ref, k_ref, nk):
    """(qi, j, ki, hi) at a step of the forward / dq grid (`_q_row_grid`): q block qi's j-th
    step visits kv block ki of its band, whose last block is hi."""
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    qi, j = pl.program_id(2), pl.program_id(3)
    lo, hi = _kv_band(problem, qi, bq, bk, nk)
    return qi, j, lo + j, hi


def _fwd_kernel(*refs, problem, nk, steps):
    q_ref, k_ref, v_ref, *refs = refs
    seg_q_ref, seg_kv_ref = (refs.pop(0), refs.pop(0)) if problem.has_segments else (None, None)
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    qi, j, ki, hi = _kv_visit(problem, q_ref, k_ref, nk)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(masked):
        s_QxK = _logits_QxK(problem, q_ref, k_ref, masked, qi * bq, ki * bk, seg_q_ref, seg_kv_ref)
        m_prev_Qx1 = m_scr[...][:, :1]
        m_new_Qx1 = jnp.maximum(m_prev_Qx1, s_QxK.max(axis=1, keepdims=True))
        alpha_Qx1 = jnp.exp(m_prev_Qx1 - m_new_Qx1)
        p_QxK = jnp.exp(s_QxK - m_new_Qx1)
        l_scr[...] = _lanes(alpha_Qx1 * l_scr[...][:, :1] + p_QxK.sum(axis=1, keepdims=True))
        m_scr[...] = _lanes(m_new_Qx1)
        v_KxD = v_ref[...]
        acc_scr[...] = alpha_Qx1 * acc_scr[...] + _dot(p_QxK.astype(v_KxD.dtype), v_KxD, (1, 0))

    _when_needed(problem, ki <= hi, _fully_visible(problem, qi, ki, bq, bk), step)

    @pl.when(j == steps - 1)
    def _finish():
        # every query sees itself (flash.py gives padding its own segment), so l > 0
        l_Qx1 = l_scr[...][:, :1]
        o_ref[...] = (acc_scr[...] / l_Qx1).astype(o_ref.dtype)
        lse_ref[...] = _lanes(m_scr[...][:, :1] + jnp.log(l_Qx1))


def _dq_kernel(*refs, problem, nk, steps):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
    seg_q_ref, seg_kv_ref = (refs.pop(0), refs.pop(0)) if problem.has_segments else (None, None)
    dq_ref, dq_scr = refs
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    qi, j, ki, hi = _kv_visit(problem, q_ref, k_ref, nk)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def step(masked):
        s_QxK = _logits_QxK(problem, q_ref, k_ref, masked, qi * bq, ki * bk, seg_q_ref, seg_kv_ref)
        p_QxK = jnp.exp(s_QxK - lse_ref[...][:, :1])
        dp_QxK = _dot(do_ref[...], v_ref[...], (1, 1))
        ds_QxK = p_QxK * (dp_QxK - delta_ref[...][:, :1])
        k_KxD = k_ref[...]
        dq_scr[...] += _dot(ds_QxK.astype(k_KxD.dtype), k_KxD, (1, 0))

    _when_needed(problem, ki <= hi, _fully_visible(problem, qi, ki, bq, bk), step)

    @pl.when(j == steps - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * problem.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, problem, nq, steps, group):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
    seg_q_ref, seg_kv_ref = (refs.pop(0), refs.pop(0)) if problem.has_segments else (None, None)
    dk_ref, dv_ref, dk_scr, dv_scr = refs
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    ki, r, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    lo, hi = _q_band(problem, ki, bq, bk, nq)
    qi = lo + j

    @pl.when((r == 0) & (j == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(masked):
        s_QxK = _logits_QxK(problem, q_ref, k_ref, masked, qi * bq, ki * bk, seg_q_ref, seg_kv_ref)
        p_QxK = jnp.exp(s_QxK - lse_ref[...][:, :1])
        do_QxD = do_ref[...]
        dv_scr[...] += _dot(p_QxK.astype(do_QxD.dtype), do_QxD, (0, 0))
        dp_QxK = _dot(do_QxD, v_ref[...], (1, 1))
        ds_QxK = p_QxK * (dp_QxK - delta_ref[...][:, :1])
        q_QxD = q_ref[...]
        dk_scr[...] += _dot(ds_QxK.astype(q_QxD.dtype), q_QxD, (0, 0))

    _when_needed(problem, qi <= hi, _fully_visible(problem, qi, ki, bq, bk), step)

    @pl.when((r == group - 1) & (j == steps - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * problem.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---- wrappers ----

def _segment_operands(segments):
    q_segment_ids_BxS, kv_segment_ids_BxS = segments
    B, S = q_segment_ids_BxS.shape
    seg_q_BxSxL = jnp.broadcast_to(q_segment_ids_BxS[:, :, None], (B, S, LANES))
    seg_kv_Bx8xS = jnp.broadcast_to(kv_segment_ids_BxS[:, None, :], (B, SUBLANES, S))
    return seg_q_BxSxL, seg_kv_Bx8xS


def _call(kernel, problem, grid, in_specs, out_specs, out_shape, scratch, operands):
    semantics = ("parallel",) * 3 + ("arbitrary",) * (len(grid) - 3)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch, interpret=problem.interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))(*operands)


def _bhsd(x_BxSxNxD):
    return jnp.swapaxes(x_BxSxNxD, 1, 2)


def _tile(rows, cols, index_map):
    """A (rows, cols) block of a [B, heads, S, cols] array, batch and head dims squeezed."""
    return pl.BlockSpec((None, None, rows, cols), index_map)


def _q_row_grid(problem, bq, bk, nq, nk, R):
    """The forward's and dq's grid (b, h, i, j): q block i of q head h walks its kv band, j-th
    step at `_kv_visit`. -> (steps, q_rows, kv_rows, segment specs ([] without segments))."""
    band = functools.partial(_kv_band, problem, bq=bq, bk=bk, nk=nk)
    kv_block = _clamped(band)
    q_rows = lambda b, h, i, j: (b, h, i, 0)  # noqa: E731
    kv_rows = lambda b, h, i, j: (b, h // R, kv_block(i, j), 0)  # noqa: E731
    seg_specs = []
    if problem.has_segments:
        seg_specs = [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
                     pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_block(i, j)))]
    return _steps(band, nq), q_rows, kv_rows, seg_specs


def forward(q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, segments, problem):
    """-> (out [B, S, H, D] in q's dtype, lse [B, H, S] float32, natural log)."""
    B, S, H, D = q_BxSxHxD.shape
    R = H // k_BxSxGxD.shape[2]
    t = _tiles(problem, S)
    bq, bk, nq, nk = t.bq, t.bk, S // t.bq, S // t.bk
    steps, q_rows, kv_rows, seg_specs = _q_row_grid(problem, bq, bk, nq, nk, R)
    in_specs = [_tile(bq, D, q_rows), _tile(bk, D, kv_rows), _tile(bk, D, kv_rows), *seg_specs]
    operands = [_bhsd(q_BxSxHxD), _bhsd(k_BxSxGxD), _bhsd(v_BxSxGxD)]
    if problem.has_segments:
        operands += _segment_operands(segments)
    out_specs = [_tile(bq, D, q_rows), _tile(bq, LANES, q_rows)]
    out_shape = [jax.ShapeDtypeStruct((B, H, S, D), q_BxSxHxD.dtype),
                 jax.ShapeDtypeStruct((B, H, S, LANES), jnp.float32)]
    scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
               pltpu.VMEM((bq, D), jnp.float32)]
    kernel = functools.partial(_fwd_kernel, problem=problem, nk=nk, steps=steps)
    out_BxHxSxD, lse_BxHxSxL = _call(kernel, problem, (B, H, nq, steps), in_specs, out_specs,
                                     out_shape, scratch, operands)
    return _bhsd(out_BxHxSxD), lse_BxHxSxL[..., 0]


def backward(q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, segments, lse_BxHxS, delta_BxHxS, do_BxSxHxD,
             problem):
    """-> (dq like q, dk like k, dv like v). delta = rowsum(out * dout) - dlse (see flash.py)."""
    B, S, H, D = q_BxSxHxD.shape
    G = k_BxSxGxD.shape[2]
    R = H // G
    t = _tiles(problem, S)
    bq, bk, nq, nk = t.bq_bwd, t.bk_bwd, S // t.bq_bwd, S // t.bk_bwd
    q, k, v, do = map(_bhsd, (q_BxSxHxD, k_BxSxGxD, v_BxSxGxD, do_BxSxHxD))
    lse_BxHxSxL = jnp.broadcast_to(lse_BxHxS[..., None], (B, H, S, LANES))
    delta_BxHxSxL = jnp.broadcast_to(delta_BxHxS.astype(jnp.float32)[..., None], (B, H, S, LANES))
    operands = [q, k, v, do, lse_BxHxSxL, delta_BxHxSxL]
    if problem.has_segments:
        operands += _segment_operands(segments)

    # dq: one q block of one q head per (b, h, i), walking its kv band
    kv_steps, q_rows, kv_rows, seg_specs = _q_row_grid(problem, bq, bk, nq, nk, R)
    in_specs = [_tile(bq, D, q_rows), _tile(bk, D, kv_rows), _tile(bk, D, kv_rows),
                _tile(bq, D, q_rows), _tile(bq, LANES, q_rows), _tile(bq, LANES, q_rows),
                *seg_specs]
    dq_BxHxSxD = _call(
        functools.partial(_dq_kernel, problem=problem, nk=nk, steps=kv_steps), problem,
        (B, H, nq, kv_steps), in_specs, _tile(bq, D, q_rows),
        jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, D), jnp.float32)], operands)

    # dk/dv: one kv block of one kv head per (b, g, i), reducing over (q head of the group, q band)
    q_band = functools.partial(_q_band, problem, bq=bq, bk=bk, nq=nq)
    q_steps, q_block = _steps(q_band, nk), _clamped(q_band)
    q_rows = lambda b, g, i, r, j: (b, g * R + r, q_block(i, j), 0)  # noqa: E731
    kv_rows = lambda b, g, i, r, j: (b, g, i, 0)  # noqa: E731
    in_specs = [_tile(bq, D, q_rows), _tile(bk, D, kv_rows), _tile(bk, D, kv_rows),
                _tile(bq, D, q_rows), _tile(bq, LANES, q_rows), _tile(bq, LANES, q_rows)]
    if problem.has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), lambda b, g, i, r, j: (b, q_block(i, j), 0)),
                     pl.BlockSpec((None, SUBLANES, bk), lambda b, g, i, r, j: (b, 0, i))]
    dk_BxGxSxD, dv_BxGxSxD = _call(
        functools.partial(_dkv_kernel, problem=problem, nq=nq, steps=q_steps, group=R), problem,
        (B, G, nk, R, q_steps), in_specs, [_tile(bk, D, kv_rows)] * 2,
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)], operands)
    return _bhsd(dq_BxHxSxD), _bhsd(dk_BxGxSxD), _bhsd(dv_BxGxSxD)
