"""Ragged paged attention for a serving engine: one call per engine step, any mix of decode rows,
prefill chunks and idle slots.

Why this shape of API. A step's queries arrive flat: T token rows [T, H, K] from S sequence slots,
sequence s owning rows [cu_q_lens[s], cu_q_lens[s+1]) and rows from cu_q_lens[S] on being padding
(zeros out), so one compiled program serves every batch mix of the same T. The KV cache is a pool
of fixed-size pages [P, page_size, G, K|V] shared by all sequences: block_tables[s, i] names the
page holding sequence s's tokens [i * page_size, (i + 1) * page_size), so sequences grow, fork
(shared prefix pages) and free memory a page at a time without copying. kv_lens[s] counts the
tokens in the cache including this step's queries (their K/V are already written), so query j of
sequence s sits at position kv_lens[s] - q_len_s + j; block-table entries past a sequence's pages
and page slots past kv_lens are never trusted (slots are masked, V rows zeroed so NaN garbage
cannot leak through 0 * NaN).

GQA without repeating K/V. Query heads h = g * R + r (R = H // G) share kv head g. One kernel
program holds the R heads of several consecutive tokens as the rows of one (rows, K) tile,
token-major: every page it loads serves R query heads, and a decode step (one token per
sequence) still gives the matmul R rows rather than one. The GPU kernel loads those rows in place
from q viewed [T, G, R, K] (R padded to a power of two where it is not one) and stores its
output the same way; the TPU kernel's q is regrouped to [G, T * R, K] by XLA.

Grid (sequence, kv head, query block): query block qb of sequence s holds its tokens
[qb * bq, (qb + 1) * bq); `max_q_len` (static) bounds q_len so the grid has cdiv(max_q_len, bq)
query blocks: 1 for a decode-only step. A program whose block is empty (a short or idle sequence)
returns at once. Each program walks only the pages it needs: all cdiv(kv_len, page_size) of them,
or with causal masking those up to its last query's position (and with a sliding window, on the
gpu kernel, from the first page its first query's window reaches), with an online softmax (fp32
m, l and accumulator). A row that sees no key at all gives zeros.

Backends (`backend=None`: "gpu" on a GPU, "tpu" on a TPU, else "interpret"):
  "gpu"           `_gpu_kernel` for the Triton lowering: full-array refs in global memory, the
                  sequence's pages loaded by dynamic indexing through the block table inside a
                  lax.fori_loop whose trip count is data (its page count); q rows and output
                  stores are masked, so blocks may overhang into the next sequence's rows.
                  Needs power-of-two page_size, K, V >= 16 (Triton tiles and tl.dot).
                  With kv_splits > 1 (flash-decoding) a 4th grid axis shares each block's
                  pages among that many programs; each writes its normalised partial output
                  and log-sum-exp in float32, and XLA merges them (`_merge_splits`). Rows of
                  no sequence are zero-filled by aliasing zero buffers, unless cu_q_lens is a
                  NumPy constant that gives every row a sequence (the dense decode cache).
  "interpret"     the same kernel body with interpret=True: what the CPU tests run.
  "tpu"           `_tpu_kernel`, Mosaic-TPU style: PrefetchScalarGridSpec puts block tables and
                  lengths in SMEM, and the K/V BlockSpec index maps read them, so the pipeline
                  DMAs page block_tables[s, j] at page step j (4th grid axis); steps past the
                  pages a block needs repeat its last page (no new DMA) and compute nothing.
                  BlockSpec outputs cannot overhang into another sequence's rows (whole blocks
                  are written back), so XLA gathers q into per-(sequence, query block) tiles
                  [G, S * n_qb, rows, K] and gathers the output back: memory grows with
                  S * max_q_len, fine for decode-heavy steps.
  "interpret_tpu" the TPU kernel with interpret=True (tests; it also lowers for TPU here).
pages_per_block: pages per loop iteration (gpu, unrolled; default ~64 keys, at most 4 pages) or
per grid step (tpu, one BlockSpec per page of the step; default 1); masking makes any value
correct. Measured on an H200 (jax 0.11.2, bf16, 64 sequences, 16-token pages, H 32, G 8, K 128,
kv 100..2000): a decode step reads K/V at ~1.8 TB/s (4 pages per iteration; 1.4 with 1).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

BACKENDS = ("gpu", "tpu", "interpret", "interpret_tpu")
# Finite: a masked logit never makes inf - inf = NaN in the online softmax.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
GPU_MAX_ROWS = 64    # q rows (tokens x heads of one group) per GPU program: 64 x V fp32 acc
TPU_MAX_ROWS = 128
FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32))


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: the jit cache key)."""
    backend: str
    causal: bool
    sm_scale: float
    max_q_len: int
    pages_per_block: int
    R: int        # query heads per kv head
    bq: int       # tokens per query block
    rows: int     # q tile rows; >= bq * R (the GPU rounds up to a power of two)
    quantized: bool = False  # int8 pages, dequantised page by page in the kernel
    window: int | None = None  # sliding window: a query sees keys less than this many back
    kv_splits: int = 1  # gpu: programs per query block, each over its share of the pages
    # gpu: cu_q_lens is a constant giving every row of q to a sequence (no zero fill needed)
    rows_owned: bool = False

    @property
    def n_qb(self) -> int:
        return -(-self.max_q_len // self.bq)


def default_backend() -> str:
    return {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "interpret")


def _fail(msg):
    raise ValueError(f"paged_attention: {msg}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_inputs(q, k_pages, v_pages, block_tables, kv_lens, cu_q_lens, scales=None):
    """scales: None (float pages) or (k_scales, v_scales) of int8 pages."""
    for name, x, rank, layout in (
            ("q", q, 3, "[tokens, q_heads, head_dim]"),
            ("k_pages", k_pages, 4, "[pages, page_size, kv_heads, head_dim]"),
            ("v_pages", v_pages, 4, "[pages, page_size, kv_heads, v_head_dim]"),
            ("block_tables", block_tables, 2, "[sequences, max_pages]"),
            ("kv_lens", kv_lens, 1, "[sequences]"), ("cu_q_lens", cu_q_lens, 1, "[sequences + 1]")):
        if x.ndim != rank:
            _fail(f"{name} must be rank {rank} {layout}; got shape {x.shape}")
    (T, H, K), (P, B, G, Kk) = q.shape, k_pages.shape
    if H % G:
        _fail(f"q heads ({H}) must be a multiple of k_pages' kv heads ({G})")
    if Kk != K:
        _fail(f"k_pages head_dim ({Kk}) must match q's head_dim ({K})")
    if v_pages.shape[:3] != (P, B, G):
        _fail(f"v_pages must be [pages, page_size, kv_heads] = {(P, B, G)} like k_pages, plus "
              f"v_head_dim; got {v_pages.shape}")
    S = block_tables.shape[0]
    if kv_lens.shape != (S,):
        _fail(f"kv_lens must be [{S}] (one per block_tables row); got {kv_lens.shape}")
    if cu_q_lens.shape != (S + 1,):
        _fail(f"cu_q_lens must be [{S + 1}] (sequences + 1); got {cu_q_lens.shape}")
    for name, x in (("block_tables", block_tables), ("kv_lens", kv_lens),
                    ("cu_q_lens", cu_q_lens)):
        if x.dtype != jnp.int32:
            _fail(f"{name} must be int32; got {x.dtype}")
    if scales is None:
        if q.dtype not in FLOAT_DTYPES or not q.dtype == k_pages.dtype == v_pages.dtype:
            _fail(f"q, k_pages, v_pages must share one of bfloat16/float16/float32 (or pages "
                  f"int8 with k_scales and v_scales); got {q.dtype}, {k_pages.dtype}, "
                  f"{v_pages.dtype}")
        return
    if q.dtype not in FLOAT_DTYPES or not k_pages.dtype == v_pages.dtype == jnp.int8:
        _fail(f"with k_scales and v_scales, the pages must be int8 and q a float; got q "
              f"{q.dtype}, pages {k_pages.dtype}, {v_pages.dtype}")
    for name, x in zip(("k_scales", "v_scales"), scales):
        if x is None or x.shape != (P, B, G) or x.dtype != jnp.float32:
            _fail(f"{name} must be float32 [pages, page_size, kv_heads] = {(P, B, G)} (one "
                  f"scale per stored key/value vector); got "
                  f"{None if x is None else (x.shape, str(x.dtype))}")


def _config(q, k_pages, v_pages, causal, sm_scale, max_q_len, backend, pages_per_block,
            quantized=False, sliding_window=None, kv_splits=1, cu_q_lens=None):
    backend = backend or default_backend()
    if backend not in BACKENDS:
        _fail(f"backend={backend!r}; expected one of {BACKENDS}")
    if quantized and backend in ("tpu", "interpret_tpu"):
        _fail(f"int8 pages run on the gpu and interpret backends, not {backend}")
    if sliding_window is not None and not _positive_int(sliding_window):
        _fail(f"sliding_window must be a positive int (or None); got {sliding_window!r}")
    T, H, K = q.shape
    B, G, V = k_pages.shape[1], k_pages.shape[2], v_pages.shape[3]
    max_q_len = T if max_q_len is None else max_q_len
    if not _positive_int(max_q_len):
        _fail(f"max_q_len must be a positive int (or None: T); got {max_q_len!r}")
    # gpu: ~64 keys per loop iteration (measured on an H200, 16-token pages: 4 pages per
    # iteration 1.3x faster decode than 1, 16 slower); tpu: one page per grid step
    ppb = pages_per_block if pages_per_block is not None else (
        1 if backend in ("tpu", "interpret_tpu") else min(4, max(1, 64 // B)))
    if not _positive_int(ppb):
        _fail(f"pages_per_block must be a positive int; got {pages_per_block!r}")
    if not _positive_int(kv_splits):
        _fail(f"kv_splits must be a positive int; got {kv_splits!r}")
    if backend == "tpu" and (K % LANES or V % LANES):
        _fail(f"the tpu backend needs head_dim and v_head_dim multiples of {LANES} (a kv head is "
              f"a lane block of the page); got {K}, {V}")
    if backend == "gpu":
        for name, n in (("page_size", B), ("head_dim", K), ("v_head_dim", V)):
            if n < 16 or n & (n - 1):
                _fail(f"the gpu (Triton) backend needs {name} a power of two >= 16; got {n}")
    if kv_splits > 1 and backend not in ("gpu", "interpret"):
        _fail(f"kv_splits > 1 runs on the gpu and interpret backends, not {backend}")
    R, max_q_len = H // G, min(max_q_len, max(T, 1))
    if backend in ("gpu", "interpret"):
        # Triton tiles are powers of two and tl.dot wants >= 16 rows: bq tokens x R heads
        # padded to a power of two
        Rp = pl.next_power_of_2(R)
        rows = max(16, Rp, min(GPU_MAX_ROWS, pl.next_power_of_2(max_q_len * Rp)))
        bq = rows // Rp
    else:
        bq = max(1, min(max_q_len, TPU_MAX_ROWS // R))
        rows = bq * R
    scale = K ** -0.5 if sm_scale is None else float(sm_scale)
    # a NumPy cu_q_lens is known while tracing: whether every row belongs to a sequence whose
    # queries all fit the grid's query blocks
    owned = (isinstance(cu_q_lens, np.ndarray) and int(cu_q_lens[-1]) == T
             and int(np.max(np.diff(cu_q_lens), initial=0)) <= max_q_len)
    return _Config(backend, bool(causal), scale, max_q_len, ppb, R, bq, rows, quantized,
                   sliding_window, kv_splits, owned)


# ---- reference ----

def paged_attention_reference(q_TxHxK, k_pages_PxBxGxK, v_pages_PxBxGxV, block_tables_SxM,
                              kv_lens_S, cu_q_lens_S1, *, sm_scale=None, causal=True,
                              max_q_len=None, k_scales_PxBxG=None, v_scales_PxBxG=None,
                              sliding_window=None):
    """Plain jnp in float32: gathers every sequence's pages into [S, M * B] keys and masks.
    Materialises [T, H, M * B] logits: tests only. max_q_len is accepted for symmetry (the
    reference handles any q_len). int8 pages are dequantised by their scales first."""
    del max_q_len
    scales = _scales(k_scales_PxBxG, v_scales_PxBxG)
    _check_inputs(q_TxHxK, k_pages_PxBxGxK, v_pages_PxBxGxV, block_tables_SxM, kv_lens_S,
                  cu_q_lens_S1, scales)
    if scales is not None:
        k_pages_PxBxGxK = _dequantize(k_pages_PxBxGxK, scales[0], jnp.float32)
        v_pages_PxBxGxV = _dequantize(v_pages_PxBxGxV, scales[1], jnp.float32)
    T, H, K = q_TxHxK.shape
    P, B, G, _ = k_pages_PxBxGxK.shape
    S, M = block_tables_SxM.shape
    V = v_pages_PxBxGxV.shape[3]
    scale = K ** -0.5 if sm_scale is None else sm_scale
    pages_SxM = jnp.clip(block_tables_SxM, 0, P - 1)  # entries past a sequence's pages: any
    k_SxNxGxK = k_pages_PxBxGxK[pages_SxM].reshape(S, M * B, G, K).astype(jnp.float32)
    v_SxNxGxV = v_pages_PxBxGxV[pages_SxM].reshape(S, M * B, G, V).astype(jnp.float32)
    kpos_N = jnp.arange(M * B)
    in_cache_SxN = kpos_N[None, :] < kv_lens_S[:, None]
    v_SxNxGxV = jnp.where(in_cache_SxN[:, :, None, None], v_SxNxGxV, 0.0)  # garbage may be NaN
    # owner of each flat row: the number of sequences that end at or before it
    t_T = jnp.arange(T)
    seq_T = jnp.minimum(jnp.sum(cu_q_lens_S1[1:, None] <= t_T[None, :], axis=0), S - 1)
    q_lens_S = cu_q_lens_S1[1:] - cu_q_lens_S1[:-1]
    real_T = t_T < cu_q_lens_S1[S]
    qpos_T = kv_lens_S[seq_T] - q_lens_S[seq_T] + (t_T - cu_q_lens_S1[seq_T])
    vis_TxN = in_cache_SxN[seq_T] & real_T[:, None]
    if causal:
        vis_TxN &= kpos_N[None, :] <= qpos_T[:, None]
    if sliding_window is not None:
        vis_TxN &= jnp.abs(qpos_T[:, None] - kpos_N[None, :]) < sliding_window
    q_TxGxRxK = q_TxHxK.astype(jnp.float32).reshape(T, G, H // G, K)
    logits_TxGxRxN = jnp.einsum("tgrk,tngk->tgrn", q_TxGxRxK, k_SxNxGxK[seq_T],
                                precision=lax.Precision.HIGHEST) * scale
    vis_Tx1x1xN = vis_TxN[:, None, None, :]
    logits_TxGxRxN = jnp.where(vis_Tx1x1xN, logits_TxGxRxN, MASK_VALUE)
    p_TxGxRxN = jnp.where(vis_Tx1x1xN, jax.nn.softmax(logits_TxGxRxN, axis=-1), 0.0)
    out_TxGxRxV = jnp.einsum("tgrn,tngv->tgrv", p_TxGxRxN, v_SxNxGxV[seq_T],
                             precision=lax.Precision.HIGHEST)
    return out_TxGxRxV.reshape(T, H, V).astype(q_TxHxK.dtype)


# ---- what both kernels share ----

def _scales(k_scales, v_scales):
    """(k_scales, v_scales) of int8 pages, or None for float pages (one given: refused)."""
    if k_scales is None and v_scales is None:
        return None
    return k_scales, v_scales


def _dequantize(x_int8, scale, dtype):
    """int8 vectors times their float32 scales (broadcast over the last axis), in dtype."""
    return (x_int8.astype(jnp.float32) * scale[..., None]).astype(dtype)


def _dot(a, b, contract):
    """fp32-accumulating matmul; HIGHEST keeps fp32 inputs fp32 (not TF32 / one bf16 pass)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           preferred_element_type=jnp.float32, precision=prec)


def _block_geometry(cfg, B, M, s, qb, kv_lens_ref, cu_ref):
    """Scalars of query block qb of sequence s: (tokens in the block, position of the block's
    first token, pages the block needs). Works in kernels and in TPU index maps."""
    kv_len, q_start = kv_lens_ref[s], cu_ref[s]
    q_len = cu_ref[s + 1] - q_start
    n_tok = jnp.clip(q_len - qb * cfg.bq, 0, cfg.bq)
    pos0 = kv_len - q_len + qb * cfg.bq
    n_keys = pos0 + n_tok if cfg.causal else kv_len  # causal: up to the block's last query
    n_pages = jnp.where(n_tok > 0, jnp.clip((n_keys + B - 1) // B, 0, M), 0)
    return n_tok, pos0, n_pages


def _visible_RxB(cfg, tok_R1, pos0, kv_len, page_i, B):
    kpos_1xB = page_i * B + lax.broadcasted_iota(jnp.int32, (1, B), 1)
    vis = kpos_1xB < kv_len
    if cfg.causal:
        vis = vis & (kpos_1xB <= pos0 + tok_R1)
    if cfg.window is not None:
        vis = vis & (jnp.abs(pos0 + tok_R1 - kpos_1xB) < cfg.window)
    return vis


def _online_step(cfg, q_RxK, k_BxK, v_BxV, vis_RxB, in_cache_Bx1, m_R1, l_R1, acc_RxV):
    """One page of the online softmax on (rows, 1) statistics; masked keys weigh exactly 0."""
    s_RxB = jnp.where(vis_RxB, _dot(q_RxK, k_BxK, (1, 1)) * cfg.sm_scale, MASK_VALUE)
    m_new_R1 = jnp.maximum(m_R1, s_RxB.max(axis=1, keepdims=True))
    alpha_R1 = jnp.exp(m_R1 - m_new_R1)
    p_RxB = jnp.where(vis_RxB, jnp.exp(s_RxB - m_new_R1), 0.0)
    l_R1 = alpha_R1 * l_R1 + p_RxB.sum(axis=1, keepdims=True)
    v_BxV = jnp.where(in_cache_Bx1, v_BxV, jnp.zeros_like(v_BxV))  # slots past kv_len: garbage
    acc_RxV = alpha_R1 * acc_RxV + _dot(p_RxB.astype(v_BxV.dtype), v_BxV, (1, 0))
    return m_new_R1, l_R1, acc_RxV


def _normalise(acc_RxV, l_R1):
    return jnp.where(l_R1 > 0, acc_RxV / jnp.where(l_R1 > 0, l_R1, 1.0), 0.0)


def _group_q(q_TxHxK, G, pad_rows=0):
    """[T, H, K] -> [G, T * R (+ pad_rows), K]: a kv head's query rows, token-major (TPU)."""
    T, H, K = q_TxHxK.shape
    q_GxTRxK = q_TxHxK.reshape(T, G, H // G, K).transpose(1, 0, 2, 3).reshape(G, -1, K)
    return jnp.pad(q_GxTRxK, ((0, 0), (0, pad_rows), (0, 0))) if pad_rows else q_GxTRxK


# ---- GPU (Triton) kernel ----

def _gpu_kernel(bt_ref, kv_lens_ref, cu_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, *refs, cfg):
    """One (sequence, kv head, query block, key split). q_ref is q as it came, viewed
    [T, G, Rp, K] (Rp: R padded to a power of two): the tile's rows are the block's bq tokens
    x Rp heads, token-major, loaded and stored in place (no regrouped copy of q or of the
    output). ks_ref / vs_ref: the int8 pages' scales [P, page_size, G] (a stand-in, never read,
    for float pages). refs: the zero buffers the outputs alias (only where some rows belong to
    no sequence), then the outputs: [T, G, Rp, V], or with kv_splits > 1 this split's
    normalised partial output and its log-sum-exp [kv_splits, T, G, Rp], merged by
    `_merge_splits`."""
    outs = refs[-(1 if cfg.kv_splits == 1 else 2):]
    s, g, qb, sp = (pl.program_id(i) for i in range(4))
    B, M, ppb = k_ref.shape[1], bt_ref.shape[1], cfg.pages_per_block
    n_tok, pos0, n_pages = _block_geometry(cfg, B, M, s, qb, kv_lens_ref, cu_ref)

    @pl.when(n_tok > 0)
    def _block():
        kv_len = kv_lens_ref[s]
        Rp, K = q_ref.shape[2], q_ref.shape[3]
        tok_R1 = lax.broadcasted_iota(jnp.int32, (cfg.rows, 1), 0) // Rp
        # the block may overhang into the next sequence's tokens (or past T on the GPU, where
        # a masked load reads nothing): masked here and at the store
        tok_ok_Qx1x1 = lax.broadcasted_iota(jnp.int32, (cfg.bq, 1, 1), 0) < n_tok
        toks = pl.ds(cu_ref[s] + qb * cfg.bq, cfg.bq)
        q_RxK = plgpu.load(q_ref.at[toks, g, :, :], mask=tok_ok_Qx1x1, other=0).reshape(
            cfg.rows, K)
        # pages [lo, hi) are this split's: a sliding window skips the pages wholly before its
        # block's first query's (whole loop iterations of them), the rest shared out in turn
        lo = 0
        if cfg.window is not None:
            lo = jnp.maximum(pos0 - cfg.window + 1, 0) // B // ppb * ppb
        share = (n_pages - lo + cfg.kv_splits - 1) // cfg.kv_splits
        lo = jnp.minimum(lo + sp * share, n_pages)
        hi = jnp.minimum(lo + share, n_pages)

        def body(it, carry):
            for u in range(ppb):  # unrolled: a few page loads in flight
                page_i = lo + it * ppb + u
                # past the last page the table entry is arbitrary: reread the last page, masked
                page = bt_ref[s, jnp.minimum(page_i, hi - 1)]
                k_BxK, v_BxV = k_ref[page, :, g, :], v_ref[page, :, g, :]
                if cfg.quantized:
                    k_BxK = _dequantize(k_BxK, ks_ref[page, :, g], q_RxK.dtype)
                    v_BxV = _dequantize(v_BxV, vs_ref[page, :, g], q_RxK.dtype)
                vis_RxB = _visible_RxB(cfg, tok_R1, pos0, kv_len, page_i, B) & (page_i < hi)
                kpos_B1 = page_i * B + lax.broadcasted_iota(jnp.int32, (B, 1), 0)
                carry = _online_step(cfg, q_RxK, k_BxK, v_BxV, vis_RxB, kpos_B1 < kv_len, *carry)
            return carry

        V = v_ref.shape[3]
        init = (jnp.full((cfg.rows, 1), MASK_VALUE, jnp.float32),
                jnp.zeros((cfg.rows, 1), jnp.float32), jnp.zeros((cfg.rows, V), jnp.float32))
        m_R1, l_R1, acc_RxV = lax.fori_loop(0, (hi - lo + ppb - 1) // ppb, body, init)
        out_QxRpxV = _normalise(acc_RxV, l_R1).reshape(cfg.bq, Rp, V)
        if cfg.kv_splits == 1:
            plgpu.store(outs[0].at[toks, g, :, :], out_QxRpxV.astype(outs[0].dtype),
                        mask=tok_ok_Qx1x1)
            return
        # a split that saw no key weighs nothing in the merge
        lse_R1 = jnp.where(l_R1 > 0, m_R1 + jnp.log(jnp.where(l_R1 > 0, l_R1, 1.0)), MASK_VALUE)
        plgpu.store(outs[0].at[sp, toks, g, :, :], out_QxRpxV, mask=tok_ok_Qx1x1)
        plgpu.store(outs[1].at[sp, toks, g, :], lse_R1.reshape(cfg.bq, Rp),
                    mask=tok_ok_Qx1x1[:, :, 0])


def _merge_splits(out_NxTxGxRxV, lse_NxTxGxR):
    """The splits' normalised outputs weighted by their share of the softmax mass,
    exp(lse_i - max lse) / sum: the flash-decoding merge, written out over the few splits so
    that it is elementwise (one XLA fusion; a logsumexp reduction over the split axis made it
    two kernels a layer). Rows no program wrote hold zeros in every split: they merge to
    zero."""
    N = out_NxTxGxRxV.shape[0]
    top_TxGxR = functools.reduce(jnp.maximum, [lse_NxTxGxR[i] for i in range(N)])
    w = [jnp.exp(lse_NxTxGxR[i] - top_TxGxR)[..., None] for i in range(N)]
    return sum(w[i] * out_NxTxGxRxV[i] for i in range(N)) / sum(w)


def _gpu_forward(cfg, q_TxHxK, k_pages, v_pages, block_tables, kv_lens, cu_q_lens,
                 k_scales=None, v_scales=None):
    T, H, K = q_TxHxK.shape
    if k_scales is None:  # float pages: stand-ins the kernel never reads
        k_scales = v_scales = jnp.zeros((1, 1, 1), jnp.float32)
    G, V = k_pages.shape[2], v_pages.shape[3]
    S, R, Rp = block_tables.shape[0], H // G, cfg.rows // cfg.bq
    q_TxGxRpxK = q_TxHxK.reshape(T, G, R, K)
    # the interpreter clamps an overhanging dynamic slice's start (shifting the rows under the
    # mask), so there the tokens get one block of padding; the GPU's masked loads need none
    Tq = T + cfg.bq if cfg.backend == "interpret" else T
    if Rp != R or Tq != T:
        q_TxGxRpxK = jnp.pad(q_TxGxRpxK, ((0, Tq - T), (0, 0), (0, Rp - R), (0, 0)))
    shapes = ((Tq, G, Rp, V),) if cfg.kv_splits == 1 else (
        (cfg.kv_splits, Tq, G, Rp, V), (cfg.kv_splits, Tq, G, Rp))
    dtypes = (q_TxHxK.dtype,) if cfg.kv_splits == 1 else (jnp.float32, jnp.float32)
    # rows of no sequence (cu_q_lens[S] < T) must come out zero: the outputs then alias zero
    # buffers. A copy of each per call (XLA cannot write into a constant), so skipped where
    # cu_q_lens is a constant covering every row, as the dense decode cache's is.
    zeros = () if cfg.rows_owned else tuple(jnp.zeros(sh, dt) for sh, dt in zip(shapes, dtypes))
    outs = pl.pallas_call(
        functools.partial(_gpu_kernel, cfg=cfg), grid=(S, G, cfg.n_qb, cfg.kv_splits),
        out_shape=tuple(jax.ShapeDtypeStruct(sh, dt) for sh, dt in zip(shapes, dtypes)),
        input_output_aliases={8 + i: i for i in range(len(zeros))},
        interpret=cfg.backend == "interpret",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="paged_attention")(block_tables, kv_lens, cu_q_lens, q_TxGxRpxK, k_pages, v_pages,
                                k_scales, v_scales, *zeros)
    out_TxGxRpxV = outs[0] if cfg.kv_splits == 1 else _merge_splits(*outs)
    return out_TxGxRpxV[:T, :, :R].reshape(T, H, V).astype(q_TxHxK.dtype)


# ---- TPU (Mosaic) kernel ----

def _tpu_kernel(bt_ref, kv_lens_ref, cu_ref, q_ref, *refs, cfg, steps):
    """Grid step (s, g, qb, j): pages j * ppb + u (u < ppb) of query block qb of sequence s."""
    ppb = cfg.pages_per_block
    k_refs, v_refs, (o_ref, m_scr, l_scr, acc_scr) = refs[:ppb], refs[ppb:2 * ppb], refs[2 * ppb:]
    s, qb, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    B, M = k_refs[0].shape[0], bt_ref.shape[0] // kv_lens_ref.shape[0]
    n_tok, pos0, n_pages = _block_geometry(cfg, B, M, s, qb, kv_lens_ref, cu_ref)
    kv_len = kv_lens_ref[s]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    tok_R1 = lax.broadcasted_iota(jnp.int32, (cfg.rows, 1), 0) // cfg.R
    for u in range(ppb):
        page_i = j * ppb + u

        @pl.when(page_i < n_pages)
        def _page():
            vis_RxB = _visible_RxB(cfg, tok_R1, pos0, kv_len, page_i, B)
            kpos_B1 = page_i * B + lax.broadcasted_iota(jnp.int32, (B, 1), 0)
            m_R1, l_R1, acc_RxV = _online_step(
                cfg, q_ref[...], k_refs[u][...], v_refs[u][...], vis_RxB, kpos_B1 < kv_len,
                m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
            # statistics live lane-broadcast: (rows, 1) tiles would not fill a vreg
            m_scr[...] = jnp.broadcast_to(m_R1, m_scr.shape)
            l_scr[...] = jnp.broadcast_to(l_R1, l_scr.shape)
            acc_scr[...] = acc_RxV

    @pl.when(j == steps - 1)
    def _finish():
        o_ref[...] = _normalise(acc_scr[...], l_scr[...][:, :1]).astype(o_ref.dtype)


def _tpu_tile_rows(cfg, cu_q_lens, S):
    """Flat q row (in [G, T * R, K]) of each (sequence, query block, tile row), and whether it
    is a real query of that sequence."""
    i_R = jnp.arange(cfg.rows)
    tok_QxR = jnp.arange(cfg.n_qb)[:, None] * cfg.bq + i_R[None, :] // cfg.R
    q_lens_S = cu_q_lens[1:] - cu_q_lens[:-1]
    row_SxQxR = (cu_q_lens[:-1, None, None] + tok_QxR[None]) * cfg.R + i_R % cfg.R
    return row_SxQxR.reshape(S * cfg.n_qb, cfg.rows), \
        (tok_QxR[None] < q_lens_S[:, None, None]).reshape(S * cfg.n_qb, cfg.rows)


def _tpu_forward(cfg, q_TxHxK, k_pages, v_pages, block_tables, kv_lens, cu_q_lens):
    T, H, K = q_TxHxK.shape
    P, B, G, _ = k_pages.shape
    S, M = block_tables.shape
    V, ppb = v_pages.shape[3], cfg.pages_per_block
    steps = -(-M // ppb)
    row_NxR, real_NxR = _tpu_tile_rows(cfg, cu_q_lens, S)
    q_GxTRxK = _group_q(q_TxHxK, G)
    q_GxNxRxK = jnp.take(q_GxTRxK, jnp.clip(row_NxR, 0, T * cfg.R - 1), axis=1)
    q_GxNxRxK = jnp.where(real_NxR[None, :, :, None], q_GxNxRxK, 0)
    # heads folded into lanes (a free reshape): kv head g of a page is the lane block g of width
    # K, a legal (page_size, K) tile when K % 128 == 0; a squeezed head dim in the sublane
    # position would not be (Mosaic wants the last two block dims (8k or full, 128k or full))
    k_PxBxGK, v_PxBxGV = k_pages.reshape(P, B, G * K), v_pages.reshape(P, B, G * V)

    def page_map(u):
        def index_map(s, g, qb, j, bt_ref, kv_lens_ref, cu_ref):
            _, _, n_pages = _block_geometry(cfg, B, M, s, qb, kv_lens_ref, cu_ref)
            # steps past the block's pages repeat its last one: same block index, no new DMA
            page_i = jnp.clip(j * ppb + u, 0, jnp.maximum(n_pages - 1, 0))
            return jnp.clip(bt_ref[s * M + page_i], 0, P - 1), 0, g
        return index_map

    tile = lambda D: pl.BlockSpec(  # noqa: E731
        (None, None, cfg.rows, D), lambda s, g, qb, j, *_: (g, s * cfg.n_qb + qb, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(S, G, cfg.n_qb, steps),
        in_specs=[tile(K)] + [pl.BlockSpec((None, B, K), page_map(u)) for u in range(ppb)]
        + [pl.BlockSpec((None, B, V), page_map(u)) for u in range(ppb)],
        out_specs=tile(V),
        scratch_shapes=[pltpu.VMEM((cfg.rows, LANES), jnp.float32),
                        pltpu.VMEM((cfg.rows, LANES), jnp.float32),
                        pltpu.VMEM((cfg.rows, V), jnp.float32)])
    out_GxNxRxV = pl.pallas_call(
        functools.partial(_tpu_kernel, cfg=cfg, steps=steps), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((G, S * cfg.n_qb, cfg.rows, V), q_TxHxK.dtype),
        interpret=cfg.backend == "interpret_tpu", name="paged_attention",
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(block_tables.reshape(-1), kv_lens, cu_q_lens, q_GxNxRxK, *[k_PxBxGK] * ppb,
      *[v_PxBxGV] * ppb)
    # back to flat rows: token t of its owner s is row (t - cu[s]) % bq of tile (s, qb)
    t_T = jnp.arange(T)
    seq_T = jnp.minimum(jnp.sum(cu_q_lens[1:, None] <= t_T[None, :], axis=0), S - 1)
    j_T = t_T - cu_q_lens[seq_T]
    tile_T = seq_T * cfg.n_qb + jnp.minimum(j_T // cfg.bq, cfg.n_qb - 1)
    row_TxR = (j_T % cfg.bq)[:, None] * cfg.R + jnp.arange(cfg.R)[None, :]
    out_GxTxRxV = out_GxNxRxV[:, tile_T[:, None], row_TxR]
    real_T = (t_T < cu_q_lens[S]) & (j_T < cfg.n_qb * cfg.bq)
    out_GxTxRxV = jnp.where(real_T[None, :, None, None], out_GxTxRxV, 0)
    return out_GxTxRxV.transpose(1, 0, 2, 3).reshape(T, H, V)


# ---- public entry point ----

@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, *arrays):
    if cfg.backend in ("gpu", "interpret"):
        return _gpu_forward(cfg, *arrays)
    return _tpu_forward(cfg, *arrays)


def paged_attention(q_TxHxK, k_pages_PxBxGxK, v_pages_PxBxGxV, block_tables_SxM, kv_lens_S,
                    cu_q_lens_S1, *, sm_scale=None, causal=True, max_q_len=None, backend=None,
                    pages_per_block=None, k_scales_PxBxG=None, v_scales_PxBxG=None,
                    sliding_window=None, kv_splits=1):
    """Attention of T flat query rows over paged K/V; returns [T, H, V] in q's dtype.

    q [T, H, K]; k_pages [P, page_size, G, K]; v_pages [P, page_size, G, V]; block_tables
    [S, max_pages] int32; kv_lens [S] int32 (cached tokens including this step's queries);
    cu_q_lens [S + 1] int32 (sequence s owns rows cu_q_lens[s]:cu_q_lens[s + 1]; rows past
    cu_q_lens[S] come out zero). max_q_len: static bound on any q_len (None: T); rows beyond it
    are not computed. sm_scale None: 1 / sqrt(K). backend: one of BACKENDS (None: by platform);
    pages_per_block: see the module docstring. int8 pages come with k_scales / v_scales
    [P, page_size, G] float32 (one per stored vector; gpu and interpret backends): each page is
    dequantised to q's dtype as it is loaded, so the pool stays int8 in memory.
    sliding_window W: a query at position p sees keys at positions within (p - W, p + W) (and
    causal ones at most p); the gpu kernel skips the pages wholly before that.
    kv_splits N (gpu and interpret backends): each query block's pages are shared out among N
    programs, whose partial outputs are merged by their log-sum-exp (flash-decoding): for a
    grid too small to fill the GPU, as batch-1 decoding (one program per kv head) is."""
    scales = _scales(k_scales_PxBxG, v_scales_PxBxG)
    _check_inputs(q_TxHxK, k_pages_PxBxGxK, v_pages_PxBxGxV, block_tables_SxM, kv_lens_S,
                  cu_q_lens_S1, scales)
    cfg = _config(q_TxHxK, k_pages_PxBxGxK, v_pages_PxBxGxV, causal, sm_scale, max_q_len,
                  backend, pages_per_block, quantized=scales is not None,
                  sliding_window=sliding_window, kv_splits=kv_splits, cu_q_lens=cu_q_lens_S1)
    if q_TxHxK.shape[0] == 0 or block_tables_SxM.shape[0] == 0:
        return jnp.zeros(q_TxHxK.shape[:2] + v_pages_PxBxGxV.shape[3:], q_TxHxK.dtype)
    return _forward(cfg, q_TxHxK, k_pages_PxBxGxK, v_pages_PxBxGxV, block_tables_SxM,
                    kv_lens_S, cu_q_lens_S1, *(scales or ()))
