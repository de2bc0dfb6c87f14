"""The head's loss in chunks of positions (jaxlm/head_loss.py, `model.loss_chunks`) is the whole
loss: the same value as a NumPy cross-entropy, the same gradients as autodiff of the whole
logits; and the float32 logits of the whole batch are never held (the compiled step's temporary
memory shrinks). Training with it on meshes equals one device in tests/test_sharding.py
(sequence x fsdp x tensor), tests/test_families_train.py (fsdp_tp: masked LM, seq2seq, tied and
MLA heads) and tests/test_pipeline.py (data x tensor, the 1F1B tail)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import mesh_for, tiny_config
from jaxlm.config import ConfigError
from jaxlm.data import FIELDS, field_specs
from jaxlm.head_loss import head_loss
from jaxlm.step import abstract_batch, build_step_fns

B, S, D, V = 2, 12, 8, 40


def _problem(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (B, S, D))
    w = 0.5 * jax.random.normal(k[1], (D, V))
    norm = 1.0 + 0.1 * jax.random.normal(k[2], (D,))
    targets = jax.random.randint(k[3], (B, S), 0, V)
    mask = (jax.random.uniform(k[4], (B, S)) > 0.25).astype(jnp.float32)
    # a few positions the head predicts right, so the count is tested on something
    logits = np.asarray((h * norm) @ w)
    targets = targets.at[0, :3].set(np.argmax(logits[0, :3], axis=-1))
    return h, w, norm, targets, mask.at[0, :3].set(1.0)


def _numpy_loss(h, w, norm, targets, mask):
    logits = (np.float64(h) * np.float64(norm)) @ np.float64(w)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    right = (logits.argmax(-1) == np.asarray(targets)) * np.asarray(mask)
    return float((nll * np.asarray(mask)).sum()), float(right.sum())


@pytest.mark.parametrize("chunks", [1, 2, 3, 12])
def test_chunked_loss_equals_numpy_and_whole_gradients(chunks):
    h, w, norm, targets, mask = _problem()

    def loss(w, norm, h, chunks):
        nll, right = head_loss(lambda x: (x * norm) @ w, h, targets, mask, chunks)
        return 3.0 * nll, right  # a cotangent other than 1 reaches the backward

    want_nll, want_right = _numpy_loss(h, w, norm, targets, mask)
    assert want_right >= 3
    (got, right), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True),
                                  static_argnums=3)(w, norm, h, chunks)
    np.testing.assert_allclose(float(got), 3.0 * want_nll, rtol=1e-5)
    assert float(right) == want_right
    (_, _), whole = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(w, norm, h, 1)
    for g, want in zip(grads, whole):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
    # evaluation (no gradient) takes the chunked path without its gradients
    np.testing.assert_allclose(float(jax.jit(loss, static_argnums=3)(w, norm, h, chunks)[0]),
                               3.0 * want_nll, rtol=1e-5)


def _step_temp_bytes(*overrides):
    cfg = tiny_config("model.vocab_size=8192", "data.seq_len=128", *overrides)
    fns = build_step_fns(cfg, mesh_for(cfg, 1))
    batch = abstract_batch(cfg, fns.batch_sharding, field_specs(FIELDS, cfg.data.seq_len))
    compiled = fns.train_step.lower(fns.abstract_state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunks_never_hold_the_whole_batchs_logits():
    """8 rows x 128 positions x 8192 vocab: each float32 copy of the logits is 32 MiB. Whole,
    the step holds over four of them; in 16 chunks, less than one (what is left is mostly the
    attention probabilities the backward keeps, ~22 MiB here, and one chunk's logits)."""
    logits_bytes = 8 * 128 * 8192 * 4
    whole, chunked = _step_temp_bytes(), _step_temp_bytes("model.loss_chunks=16")
    assert whole - chunked > 3 * logits_bytes, (whole, chunked)
    assert chunked < logits_bytes, (whole, chunked)


def test_chunks_that_do_not_divide_the_positions_are_refused():
    with pytest.raises(ConfigError, match=r"model.loss_chunks=5 does not divide data.seq_len=32"):
        tiny_config("model.loss_chunks=5")
    with pytest.raises(ConfigError, match="model.loss_chunks"):
        tiny_config("model.loss_chunks=0")
    h, w, norm, targets, mask = _problem()
    with pytest.raises(ValueError, match=r"model.loss_chunks=5 does not divide the 12 positions"):
        head_loss(lambda x: x @ w, h, targets, mask, 5)
