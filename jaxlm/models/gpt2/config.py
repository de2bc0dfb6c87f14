"""GPT-2 config (defaults: the 124M model)."""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlm.config_fields import bounds
from jaxlm.models.config import (ModelConfig, attention_flops, check_heads,
                                 check_learned_positions)


@dataclass
class GPT2Config(ModelConfig):
    family: str = "gpt2"
    vocab_size: int = field(default=50257, metadata=bounds(1))
    d_model: int = field(default=768, metadata=bounds(1))
    num_layers: int = field(default=12, metadata=bounds(1))
    tie_embeddings: bool = True
    num_heads: int = field(default=12, metadata=bounds(1))
    ffn_dim: int = field(default=0, metadata=bounds(0))  # 0: 4 * d_model
    max_positions: int = field(default=1024, metadata=bounds(1))  # learned position table
    norm_eps: float = field(default=1e-5, metadata=bounds(0.0))

    @property
    def resolved_ffn_dim(self) -> int:
        return self.ffn_dim or 4 * self.d_model

    def validate(self) -> None:
        check_heads(self.d_model, self.num_heads)
        super().validate()

    def check_seq_len(self, seq_len: int) -> None:
        check_learned_positions(seq_len, self.max_positions)

    def matmul_params(self) -> int:
        """q, k, v, o and the two MLP matrices per layer, plus the (tied) head; biases, norms and
        the two embedding lookups are not matmuls."""
        d = self.d_model
        return self.num_layers * (4 * d * d + 2 * d * self.resolved_ffn_dim) + d * self.vocab_size

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        return 6 * self.matmul_params() + attention_flops(self.num_layers, seq_len, self.d_model,
                                                          causal)
