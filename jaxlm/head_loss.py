"""The head and its cross-entropy, over the whole sequence at once or in chunks of positions.

Whole, the head writes float32-softmaxed logits for every token: [tokens, vocab] floats, 2 GiB
for 16k tokens of a 32k vocab and 8 GiB at 128k (Llama 3), held until the backward. Chunked
(`model.loss_chunks: N`), the positions are cut into N strided chunks and each chunk's logits
live only inside one iteration of a scan: the forward computes that chunk's loss *and* its
gradients (the loss is the last thing the step computes, so its cotangent is a scale the
backward applies), as Liger's fused linear cross-entropy does. No matmul is recomputed; the
head's weight gradient is summed over chunks in float32.

Chunk k holds positions k, k + N, k + 2N, ...: a strided split keeps each chunk sharded over
the sequence axis exactly like the whole row (a contiguous split would put whole chunks on one
device and the scan would gather them), and a summed loss does not care about order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_nll(logits_BxSxV, targets_BxS, mask_BxS):
    """Summed next-token negative log-likelihood (fp32) over the positions mask_BxS keeps.

    The target's log-probability is picked by a one-hot contraction rather than a gather: the
    sum has one non-zero term, so it is exact, and it partitions where XLA's SPMD partitioner
    aborts on the gather (vocab split over an automatic `tensor` axis inside the 1F1B pipeline's
    stage-manual shard_map; jaxlib 0.10.2 and 0.11.2: "Check failed: partition_group_list")."""
    logp_BxSxV = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32), axis=-1)
    onehot_BxSxV = jax.nn.one_hot(targets_BxS, logp_BxSxV.shape[-1], dtype=logp_BxSxV.dtype)
    nll_BxS = -jnp.sum(logp_BxSxV * onehot_BxSxV, axis=-1)
    return jnp.sum(nll_BxS * mask_BxS)


def right_predictions(logits_BxSxV, targets_BxS, mask_BxS):
    """How many kept positions the argmax predicts right (float32; no gradient)."""
    right_BxS = (jnp.argmax(logits_BxSxV, axis=-1) == targets_BxS).astype(jnp.float32)
    return jax.lax.stop_gradient(jnp.sum(right_BxS * mask_BxS))


def head_loss(logits_fn, h_BxSxD, targets_BxS, mask_BxS, chunks: int = 1):
    """(summed token NLL, number of right argmax predictions) of logits_fn(h) against targets
    where mask is 1; logits_fn maps [B, s, D] -> [B, s, V] for any s (the final norm and head).
    chunks > 1 computes it chunk by chunk (module docstring); the sequence length must divide."""
    if chunks <= 1:
        logits_BxSxV = logits_fn(h_BxSxD)
        return (token_nll(logits_BxSxV, targets_BxS, mask_BxS),
                right_predictions(logits_BxSxV, targets_BxS, mask_BxS))
    B, S = targets_BxS.shape
    if S % chunks:
        raise ValueError(f"model.loss_chunks={chunks} does not divide the {S} positions the "
                         f"loss is taken over")

    def split(x_BxS):  # [B, S, ...] -> [chunks, B, S / chunks, ...], chunk k = positions k::chunks
        x = x_BxS.reshape(B, S // chunks, chunks, *x_BxS.shape[2:])
        return jnp.moveaxis(x, 2, 0)

    h_NxBxCxD = split(h_BxSxD)
    # the head's parameters are closed over by logits_fn: made explicit so the custom VJP can
    # return their gradients
    fn, consts = jax.closure_convert(logits_fn, h_NxBxCxD[0])
    return _chunked(fn, consts, h_NxBxCxD, split(targets_BxS), split(mask_BxS))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(fn, consts, h_NxBxCxD, targets_NxBxC, mask_NxBxC):
    """The loss without gradients (evaluation): one chunk's logits at a time."""
    def body(carry, xs):
        h_BxCxD, t_BxC, m_BxC = xs
        logits_BxCxV = fn(h_BxCxD, *consts)
        nll, right = carry
        return (nll + token_nll(logits_BxCxV, t_BxC, m_BxC),
                right + right_predictions(logits_BxCxV, t_BxC, m_BxC)), None
    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, (zero, zero), (h_NxBxCxD, targets_NxBxC, mask_NxBxC))[0]


def _chunked_fwd(fn, consts, h_NxBxCxD, targets_NxBxC, mask_NxBxC):
    """The loss and, chunk by chunk, its gradients in the head's parameters (summed, float32)
    and in each chunk's hidden states."""
    def body(carry, xs):
        h_BxCxD, t_BxC, m_BxC = xs
        g_consts, nll, right = carry

        def chunk_nll(consts, h_BxCxD):
            logits_BxCxV = fn(h_BxCxD, *consts)
            return token_nll(logits_BxCxV, t_BxC, m_BxC), logits_BxCxV

        nll_c, vjp, logits_BxCxV = jax.vjp(chunk_nll, consts, h_BxCxD, has_aux=True)
        g_c, dh_BxCxD = vjp(jnp.ones_like(nll_c))
        g_consts = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_consts, g_c)
        right = right + right_predictions(logits_BxCxV, t_BxC, m_BxC)
        return (g_consts, nll + nll_c, right), dh_BxCxD

    zero = jnp.zeros((), jnp.float32)
    g0 = jax.tree.map(lambda c: jnp.zeros(c.shape, jnp.float32), consts)
    (g_consts, nll, right), dh_NxBxCxD = jax.lax.scan(
        body, (g0, zero, zero), (h_NxBxCxD, targets_NxBxC, mask_NxBxC))
    g_consts = jax.tree.map(lambda g, c: g.astype(c.dtype), g_consts, consts)
    return (nll, right), (g_consts, dh_NxBxCxD)


def _chunked_bwd(fn, res, ct):
    """Scales the forward's gradients by the loss's cotangent (the right-prediction count has
    none); targets and mask are data and get no gradient."""
    g_consts, dh_NxBxCxD = res
    scale = lambda g: (g * ct[0]).astype(g.dtype)  # noqa: E731
    return jax.tree.map(scale, g_consts), scale(dh_NxBxCxD), None, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
