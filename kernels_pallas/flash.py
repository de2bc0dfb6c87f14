"""The one public flash-attention entry point: validation, padding, backend choice, custom_vjp.

Backends (`hopper`: Mosaic GPU for sm90 (forward in hopper.py, backward in hopper_bwd.py, what both
use in hopper_common.py); `blocked`: BlockSpec kernels for Mosaic TPU and, with
`interpret`, for CPU tests) each provide `forward(q, k, v, segments, problem) -> (out, lse)`
and `backward(q, k, v, segments, lse, delta, do, problem) -> (dq, dk, dv)` (segments: None or
(q segment ids, kv segment ids), [B, S] int32 each), plus
`seq_multiple(problem, S)`: what the sequence is padded to. Layouts: q [B, S, H, D], k/v
[B, S, G, D] (H a multiple of G, KV never repeated), lse and delta [B, H, S] float32, lse in
natural log. delta = rowsum(out * dout) - dlse, so a gradient flowing into lse is exact too.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

BACKENDS = ("mosaic_gpu", "mosaic_tpu", "interpret")
PAD_SEGMENT = int(jnp.iinfo(jnp.int32).min)  # reserved: the segment id given to padding tokens


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and pipelining knobs. None picks the backend's tuned default; backends that
    have no such knob ignore it (stages and ping_pong are Hopper's)."""
    block_q: int | None = None
    block_kv: int | None = None
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None
    stages: int | None = None        # depth of the shared-memory ring the producer fills
    ping_pong: bool | None = None    # consumers take turns on the tensor cores (forward)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything static a backend needs besides the arrays."""
    causal: bool
    sm_scale: float
    sliding_window: int | None
    has_segments: bool
    blocks: BlockSizes
    interpret: bool = False


def _compute_capability() -> str:
    return str(getattr(jax.devices()[0], "compute_capability", "?"))


def on_hopper() -> bool:
    """A Hopper (sm90) GPU is the default device: what the mosaic_gpu kernels need (wgmma, TMA)."""
    return jax.default_backend() == "gpu" and _compute_capability().startswith("9")


def default_backend() -> str:
    platform = jax.default_backend()
    if platform == "gpu":
        if not on_hopper():
            raise ValueError(f"flash_attention: the GPU kernels need a Hopper GPU (compute "
                             f"capability 9.x); this one is {_compute_capability()}. Use cuDNN "
                             f"attention (jax.nn.dot_product_attention) there")
        return "mosaic_gpu"
    if platform == "tpu":
        return "mosaic_tpu"
    return "interpret"


MOSAIC_GPU_JAX = (0, 11)  # the Pallas Mosaic GPU API the Hopper kernels are written against


def jax_has_mosaic_gpu_api() -> bool:
    return tuple(int(x) for x in jax.__version__.split(".")[:2]) >= MOSAIC_GPU_JAX


def _backend_module(name: str):
    if name == "mosaic_gpu":
        if not jax_has_mosaic_gpu_api():
            raise ValueError(f"flash_attention: the mosaic_gpu (Hopper) kernels need jax >= "
                             f"{'.'.join(map(str, MOSAIC_GPU_JAX))}; this is jax {jax.__version__}")
        from kernels_pallas import hopper
        return hopper
    from kernels_pallas import blocked
    return blocked


def _check_inputs(q, k, v, segment_ids, kv_segment_ids, sliding_window, backend):
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: backend={backend!r}; expected one of {BACKENDS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash_attention: q, k, v must be [batch, seq, heads, head_dim]; got "
                         f"shapes {q.shape}, {k.shape}, {v.shape}")
    B, S, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(f"flash_attention: k and v must be [{B}, {S}, kv_heads, {D}] to match q "
                         f"{q.shape}; got k {k.shape}, v {v.shape}")
    G = k.shape[2]
    if H % G:
        raise ValueError(f"flash_attention: q heads ({H}) must be a multiple of kv heads ({G})")
    if D not in (64, 128, 256):
        raise ValueError(f"flash_attention: head_dim must be 64, 128 or 256; got {D}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    allowed = (jnp.bfloat16, jnp.float16) if backend == "mosaic_gpu" else \
        (jnp.bfloat16, jnp.float16, jnp.float32)
    if q.dtype not in [jnp.dtype(d) for d in allowed]:
        raise ValueError(f"flash_attention: dtype {q.dtype} not supported on {backend}; expected "
                         f"one of {[jnp.dtype(d).name for d in allowed]}")
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("flash_attention: kv_segment_ids needs segment_ids (the queries' ids) "
                         "too")
    for name, ids in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if ids is not None and (ids.shape != (B, S) or not jnp.issubdtype(ids.dtype, jnp.integer)):
            raise ValueError(f"flash_attention: {name} must be an integer [{B}, {S}] array; "
                             f"got {ids.dtype} {ids.shape}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"flash_attention: sliding_window must be a positive int; got "
                         f"{sliding_window!r}")


def flash_attention(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None,
                    sm_scale=None, sliding_window=None, block_sizes: BlockSizes | None = None,
                    backend: str | None = None):
    """softmax(q k^T * sm_scale + mask) v with fp32 accumulation; returns [B, S, H, D].
    `kv_segment_ids`: the keys' segment ids where they are not the queries' (a block of a
    longer sequence, as ring attention computes); needs `segment_ids`."""
    return flash_attention_with_lse(q, k, v, causal=causal, segment_ids=segment_ids,
                                    kv_segment_ids=kv_segment_ids, sm_scale=sm_scale,
                                    sliding_window=sliding_window, block_sizes=block_sizes,
                                    backend=backend)[0]


def flash_attention_with_lse(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None,
                             sm_scale=None, sliding_window=None,
                             block_sizes: BlockSizes | None = None, backend: str | None = None):
    """As `flash_attention`, also returning the row logsumexp [B, H, S] (float32, natural log).
    A row that sees no key gets a hugely negative lse (and the mean of all values), so it
    weighs nothing when blocks are merged by lse."""
    call = _Call.of(q, k, v, causal, segment_ids, kv_segment_ids, sm_scale, sliding_window,
                    block_sizes, backend)
    out, lse = _flash(*call.pad(q, k, v), call.segments, call.problem, call.backend)
    return call.unpad(out, seq_axis=1), call.unpad(lse, seq_axis=2)


def flash_attention_block_grads(q, k, v, lse, delta, do, *, causal=True, segment_ids=None,
                                kv_segment_ids=None, sm_scale=None, sliding_window=None,
                                block_sizes: BlockSizes | None = None,
                                backend: str | None = None):
    """The backward of one block of a softmax that spans more keys than k/v hold (ring
    attention): this block's share of (dq, dk, dv), given the whole row's lse [B, H, S] and
    delta = rowsum(out * dout) [B, H, S] over the whole output."""
    call = _Call.of(q, k, v, causal, segment_ids, kv_segment_ids, sm_scale, sliding_window,
                    block_sizes, backend)
    lse, delta = (call.pad_rows(x.astype(jnp.float32)) for x in (lse, delta))
    dq, dk, dv = _backend_module(call.backend).backward(*call.pad(q, k, v), call.segments, lse,
                                                        delta, *call.pad(do), call.problem)
    return tuple(call.unpad(x, seq_axis=1) for x in (dq, dk, dv))


@dataclasses.dataclass(frozen=True)
class _Call:
    """One validated call: the backend, its Problem, and the padding to the tile multiple
    (padding keys sit in a segment of their own, so real queries never see them)."""
    backend: str
    problem: Problem
    segments: tuple | None  # (q segment ids, kv segment ids), padded
    S: int
    pad_len: int

    @classmethod
    def of(cls, q, k, v, causal, segment_ids, kv_segment_ids, sm_scale, sliding_window,
           block_sizes, backend):
        backend = backend or default_backend()
        _check_inputs(q, k, v, segment_ids, kv_segment_ids, sliding_window, backend)
        B, S, _, D = q.shape
        problem = Problem(causal=bool(causal),
                          sm_scale=float(D ** -0.5 if sm_scale is None else sm_scale),
                          sliding_window=sliding_window, has_segments=segment_ids is not None,
                          blocks=block_sizes or BlockSizes(), interpret=backend == "interpret")
        pad = -S % _backend_module(backend).seq_multiple(problem, S)
        segments = None
        if segment_ids is not None or pad:
            q_seg = jnp.zeros((B, S), jnp.int32) if segment_ids is None else segment_ids
            kv_seg = q_seg if kv_segment_ids is None else kv_segment_ids
            segments = tuple(jnp.pad(x.astype(jnp.int32), ((0, 0), (0, pad)),
                                     constant_values=PAD_SEGMENT) for x in (q_seg, kv_seg))
            problem = dataclasses.replace(problem, has_segments=True)
        return cls(backend, problem, segments, S, pad)

    def pad(self, *xs_BxSx___):
        widths = ((0, 0), (0, self.pad_len), (0, 0), (0, 0))
        return tuple(jnp.pad(x, widths) if self.pad_len else x for x in xs_BxSx___)

    def pad_rows(self, x_BxHxS):
        return jnp.pad(x_BxHxS, ((0, 0), (0, 0), (0, self.pad_len))) if self.pad_len else x_BxHxS

    def unpad(self, x, seq_axis):
        return jax.lax.slice_in_dim(x, 0, self.S, axis=seq_axis) if self.pad_len else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, segments, problem, backend):
    return _backend_module(backend).forward(q, k, v, segments, problem)


def _flash_fwd(q, k, v, segments, problem, backend):
    out, lse = _backend_module(backend).forward(q, k, v, segments, problem)
    return (out, lse), (q, k, v, segments, out, lse)


def _flash_bwd(problem, backend, residuals, cotangents):
    q, k, v, segments, out, lse = residuals
    do_BxSxHxD, dlse_BxHxS = cotangents
    # d lse / d logits = probs, so an lse cotangent only shifts the softmax-backward row term.
    # HIGHEST: a DEFAULT-precision f32 einsum runs as one bf16 pass on TPU (TF32 on GPU).
    delta_BxHxS = jnp.einsum("bshd,bshd->bhs", out.astype(jnp.float32),
                             do_BxSxHxD.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST) - dlse_BxHxS
    dq, dk, dv = _backend_module(backend).backward(q, k, v, segments, lse, delta_BxHxS,
                                                   do_BxSxHxD, problem)
    seg_ct = None if segments is None else tuple(
        jnp.zeros(x.shape, jax.dtypes.float0) for x in segments)
    return dq, dk, dv, seg_ct


_flash.defvjp(_flash_fwd, _flash_bwd)
