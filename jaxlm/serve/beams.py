"""Beam search in the serving engine: a request's W beams are W paged sequences. After each
round (every beam has computed its newest token) the host picks the W best continuations with
jaxlm.generate.beam's `Beams` (the same rules and the same candidate selection as
jaxlm.generate), and each new beam takes a fork of its parent's pages: a page shared by several
beams is copied only when one of them writes into it (copy-on-write), so beams that share a
history share its KV cache.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.generate.beam import Beams, candidates


@dataclasses.dataclass
class BeamGroup:
    beams: Beams
    members: list                 # the Sequences of the running beams (beam i: members[i])
    logits: dict = dataclasses.field(default_factory=dict)  # member id -> its last logits [V]

    @property
    def width(self) -> int:
        return self.beams.c.width

    def ready(self) -> bool:
        """Every member has computed its newest token (a round may span several steps when the
        token budget splits the group, or a member was preempted)."""
        return all(id(m) in self.logits for m in self.members)

    def choose(self):
        """The round's (parent member index, token) of each of the W beams, or None: over."""
        rows_MxV = jnp.stack([self.logits[id(m)] for m in self.members])
        logp_MxV = jax.nn.log_softmax(rows_MxV.astype(jnp.float32), axis=-1)
        logp_WxV = jnp.broadcast_to(logp_MxV, (self.width, logp_MxV.shape[-1])) \
            if len(self.members) == 1 else logp_MxV  # the first round: the prompt's one row
        self.logits.clear()
        chosen = self.beams.advance(*jax.device_get(candidates(
            jnp.asarray(self.beams.scores_W), logp_WxV)))
        return None if chosen is None or self.beams.over else chosen
