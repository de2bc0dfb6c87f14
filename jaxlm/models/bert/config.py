"""BERT config (defaults: bert-base, 110M)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from jaxlm.config_fields import ConfigError, bounds
from jaxlm.models.config import (ModelConfig, attention_flops, check_heads,
                                 check_learned_positions)


@dataclass
class BertConfig(ModelConfig):
    objective: ClassVar[str] = "mlm"

    family: str = "bert"
    vocab_size: int = field(default=30522, metadata=bounds(1))
    d_model: int = field(default=768, metadata=bounds(1))
    num_layers: int = field(default=12, metadata=bounds(1))
    tie_embeddings: bool = True  # the MLM decoder reads the token table
    num_heads: int = field(default=12, metadata=bounds(1))
    ffn_dim: int = field(default=3072, metadata=bounds(1))
    max_positions: int = field(default=512, metadata=bounds(1))
    type_vocab_size: int = field(default=2, metadata=bounds(1))  # token types (all 0 in MLM)
    norm_eps: float = field(default=1e-12, metadata=bounds(0.0))
    pre_norm: bool = False  # the original is post-norm (norm after each residual add)

    def validate(self) -> None:
        check_heads(self.d_model, self.num_heads)
        super().validate()

    def check_seq_len(self, seq_len: int) -> None:
        check_learned_positions(seq_len, self.max_positions)

    def check_mesh(self, sizes: dict[str, int]) -> None:
        if sizes["stage"] > 1:
            raise ConfigError(f"mesh.stage={sizes['stage']}: model.family=bert does not run "
                              f"on a pipeline (only the decoder-only families do); use data, "
                              f"fsdp or tensor parallelism")

    def matmul_params(self) -> int:
        """Per layer q, k, v, o and the two MLP matrices; the MLM head's transform (d x d) and
        its decoder (tied to the token table). Embeddings are lookups."""
        d = self.d_model
        return self.num_layers * (4 * d * d + 2 * d * self.ffn_dim) + d * d + d * self.vocab_size

    def flops_per_token(self, seq_len: int, causal: bool = False) -> float:
        return 6 * self.matmul_params() + attention_flops(self.num_layers, seq_len, self.d_model,
                                                          causal)
