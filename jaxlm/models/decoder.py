"""What the token-in, logits-out families share (Llama, Mixtral, GPT-2, DeepSeek; BERT with its
own head): a token table, a layer stack in `self.layers`, a final norm and a head tied to the
table or not, behind the model protocol (jaxlm/models/protocol.py). A family builds these in its
__init__ (embedding first, then layers, final norm, head: the order fixes the initial values)
and overrides the hooks where it differs."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.nn import stack
from jaxlm.nn.block import RESIDUAL, LayerInputs
from jaxlm.nn.param import param, project
from jaxlm.parallel.sharding import constrain


class TokenLM(nnx.Module):
    def init_embedding(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                           jnp.dtype(cfg.param_dtype))

    def init_head(self, rngs: nnx.Rngs):
        cfg = self.cfg
        if not cfg.tie_embeddings:
            self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              cfg.init_std, jnp.dtype(cfg.param_dtype))

    def stack_config(self, num_units: int | None = None) -> stack.StackConfig:
        """How a stack of `num_units` (default: the config's) is run."""
        c = self.cfg
        return stack.StackConfig(c.num_units if num_units is None else num_units,
                                 c.scan_layers, c.scan_unroll, c.remat)

    @staticmethod
    def default_positions(tokens_BxS, positions_BxS=None):
        """positions_BxS, or 0..S-1 in every row when None."""
        if positions_BxS is not None:
            return positions_BxS
        B, S = tokens_BxS.shape
        return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))

    def token_embedding(self, tokens_BxS, positions_BxS):
        """The residual stream [B, S, D] the tokens start: table lookup plus what the family
        adds (add_to_embedding), in the compute dtype."""
        # Gather the table's embed dim before the lookup (FSDP's all-gather): a lookup into a
        # table sharded on embed would force the batch-sharded gradient to be resharded.
        table_VxD = constrain(self.embed[...], ("vocab", None))
        h_BxSxD = self.add_to_embedding(jnp.take(table_VxD, tokens_BxS, axis=0), positions_BxS)
        return constrain(h_BxSxD.astype(self.dtype), RESIDUAL)

    # ---------------------------------------------------------------- the model protocol

    def embed_tokens(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None):
        """(residual stream [B, S, D], what every block reads)."""
        positions_BxS = self.default_positions(tokens_BxS, positions_BxS)
        return (self.token_embedding(tokens_BxS, positions_BxS),
                LayerInputs(positions_BxS, segment_ids_BxS))

    def add_to_embedding(self, h_BxSxD, positions_BxS):
        """What a family adds to the token embedding (learned positions); nothing by default."""
        return h_BxSxD

    def stack(self):
        return stack.Stack(self.stack_config(), self.layers)

    def logits(self, h_BxSxD):
        """Final norm and head: logits [B, S, V] in the compute dtype (the loss upcasts)."""
        h_BxSxD = self.final_norm(h_BxSxD)
        if self.cfg.tie_embeddings:
            logits_BxSxV = jnp.einsum("bsd,dv->bsv", h_BxSxD, self.embed[...].T.astype(self.dtype))
        else:
            logits_BxSxV = project("bsd,dv->bsv", h_BxSxD, self.head, self.dtype, fp8=False)
        return constrain(logits_BxSxV, ("act_batch", "act_seq", "act_vocab"))

    def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None):
        h_BxSxD, inputs = self.embed_tokens(tokens_BxS, positions_BxS, segment_ids_BxS)
        h_BxSxD, _, _ = self.stack()(h_BxSxD, inputs)
        return self.logits(h_BxSxD)
