"""Objectives: the loss a family trains with, and how its layer stack runs for it.

An objective takes a model (the protocol of jaxlm/models/protocol.py), a batch and the pipeline
plan (None: one device group runs the whole stack), and returns the summed token loss, the number
of tokens it covers and the stack's aux terms. It alone decides between the plain stack and a
pipeline schedule over `stage` (GPipe, circular, 1F1B), so no model ever imports the pipeline.
A family names its objective (`ModelConfig.objective`): causal LM, masked LM (BERT) or seq2seq
(T5); jaxlm/data builds each one's batch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.head_loss import head_loss
from jaxlm.models.protocol import DecoderLM
from jaxlm.nn.stack import add_aux
from jaxlm.parallel import pipeline


class Loss(NamedTuple):
    nll_sum: jax.Array   # summed over the tokens the loss mask keeps
    tokens: jax.Array    # how many that is
    aux: dict            # the stack's {"losses": {...}, "stats": {...}} ({} for a dense stack)


def causal_lm(model: DecoderLM, batch: dict, plan: pipeline.Plan | None = None,
              loss_chunks: int = 1) -> Loss:
    """Next-token prediction. `batch` holds inputs, targets, positions, loss_mask and, where rows
    pack several documents, segment_ids. loss_chunks > 1 takes the head and its loss in that
    many chunks of positions (jaxlm.head_loss)."""
    h_BxSxD, inputs = model.embed_tokens(batch["inputs"], batch["positions"],
                                         batch.get("segment_ids"))
    mask_BxS = batch["loss_mask"].astype(jnp.float32)
    if plan is not None and plan.schedule == "1f1b":
        return Loss(_one_f_one_b_nll(model, plan, h_BxSxD, inputs, batch["targets"], mask_BxS,
                                     loss_chunks), jnp.sum(mask_BxS), {})
    stack = model.stack()
    if plan is None:
        h_BxSxD, aux, _ = stack(h_BxSxD, inputs)
    else:
        layer, stacked = _pipeline_layer(stack)
        h_BxSxD, aux = pipeline.run_stack(plan, layer, stacked, h_BxSxD, inputs)
    nll, _ = head_loss(model.logits, h_BxSxD, batch["targets"], mask_BxS, loss_chunks)
    return Loss(nll, jnp.sum(mask_BxS), aux)


def masked_lm(model: DecoderLM, batch: dict, plan: pipeline.Plan | None = None,
              loss_chunks: int = 1) -> Loss:
    """Masked LM (BERT): predict the original token at the masked positions (jaxlm/data/mlm.py
    builds the batch: inputs masked, targets the originals, loss_mask the chosen positions); the
    fraction predicted right is logged as mlm_accuracy."""
    if plan is not None:
        raise ValueError("masked LM runs without a pipeline (its families refuse mesh.stage > 1)")
    h_BxSxD, inputs = model.embed_tokens(batch["inputs"], batch["positions"],
                                         batch.get("segment_ids"))
    h_BxSxD, aux, _ = model.stack()(h_BxSxD, inputs)
    return _predictions(model.logits, h_BxSxD, batch, aux, "mlm_accuracy", loss_chunks)


def seq2seq(model, batch: dict, plan: pipeline.Plan | None = None, loss_chunks: int = 1) -> Loss:
    """Encoder-decoder (T5 span corruption, jaxlm/data/span_corruption.py): the encoder reads
    inputs; the decoder reads decoder_inputs and the encoder output, and predicts targets where
    loss_mask is 1. Token accuracy of those predictions is logged as seq2seq_accuracy."""
    if plan is not None:
        raise ValueError("seq2seq runs without a pipeline (its families refuse mesh.stage > 1)")
    memory_BxSxD, aux = model.encode(batch["inputs"], batch["positions"],
                                     batch.get("segment_ids"))
    h_BxTxD, inputs = model.embed_tokens(
        batch["decoder_inputs"], batch["decoder_positions"], batch.get("decoder_segment_ids"),
        memory_BxSxD=memory_BxSxD, memory_segment_ids_BxS=batch.get("segment_ids"))
    h_BxTxD, decoder_aux, _ = model.stack()(h_BxTxD, inputs)
    return _predictions(model.logits, h_BxTxD, batch, add_aux(aux, decoder_aux),
                        "seq2seq_accuracy", loss_chunks)


def _predictions(logits_fn, h_BxSxD, batch, aux, accuracy_name, loss_chunks) -> Loss:
    """Loss of logits_fn(h) against batch targets where loss_mask is 1, plus their accuracy as a
    stat (a per-batch mean; averaged over microbatches like every stat)."""
    mask_BxS = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(mask_BxS)
    nll, right = head_loss(logits_fn, h_BxSxD, batch["targets"], mask_BxS, loss_chunks)
    aux = add_aux(aux, {"stats": {accuracy_name: right / jnp.maximum(tokens, 1.0)}})
    return Loss(nll, tokens, aux)


def _pipeline_layer(stack):
    """(layer(state, h, inputs) -> (h, aux), stacked state): the stack's unit function as the
    pipeline schedules run it."""
    unit, stacked = stack.layer_fn()

    def layer(state, h, inputs):
        h, aux, _ = unit(state, h, inputs, None)
        return h, aux
    return layer, stacked


def _one_f_one_b_nll(model, plan, h_BxSxD, inputs, targets_BxS, mask_BxS, loss_chunks):
    """1F1B needs the loss inside the pipeline: the layer stack runs on the stages and the head +
    NLL on the last stage per microbatch; the embedding stays outside (its gradient arrives as
    the input cotangent)."""
    layer, stacked = _pipeline_layer(model.stack())
    graphdef, layer_state, rest = nnx.split(model, nnx.PathContains("layers"), ...)
    # the head never reads the layers: shapes stand in for them inside the pipeline
    layer_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), layer_state)

    def tail(rest_state, h_BxSxD, targets_BxS, mask_BxS):
        logits_fn = nnx.merge(graphdef, layer_shapes, rest_state).logits
        return head_loss(logits_fn, h_BxSxD, targets_BxS, mask_BxS, loss_chunks)[0]

    return pipeline.one_f_one_b_loss(plan, layer, tail, stacked, rest, h_BxSxD, inputs,
                                     (targets_BxS, mask_BxS))


OBJECTIVES = {"causal_lm": causal_lm, "mlm": masked_lm, "seq2seq": seq2seq}
