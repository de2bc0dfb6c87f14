"""The model protocol: what the code that schedules a model (jaxlm.objectives for training, plain
or pipelined; decoding) may ask of a family, so that it never needs to know which family it runs.

A decoder-only family's model provides:
- `embed_tokens(tokens_BxS, positions_BxS=None, segment_ids_BxS=None) -> (h_BxSxD, LayerInputs)`:
  the residual stream and what every block reads (jaxlm.nn.block.LayerInputs);
- `stack() -> jaxlm.nn.stack.Stack`: its layer stack (units stored in the attribute `layers`,
  which is what a pipeline splits over stages), callable as a whole or as a pure per-unit
  function over the stacked state;
- `logits(h_BxSxD) -> logits_BxSxV`: final norm and head (everything outside `layers`);
- `__call__(tokens_BxS, positions_BxS=None, segment_ids_BxS=None) -> logits_BxSxV`.
Models never import the pipeline, the step or the trainer.
"""
from __future__ import annotations

from typing import Protocol


class DecoderLM(Protocol):
    def embed_tokens(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None): ...

    def stack(self): ...

    def logits(self, h_BxSxD): ...

    def __call__(self, tokens_BxS, positions_BxS=None, segment_ids_BxS=None): ...
