"""Llama-style decoder config: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlm.config_fields import ConfigError, bounds
from jaxlm.models.config import ModelConfig, RopeFields, attention_flops


@dataclass
class LlamaConfig(RopeFields, ModelConfig):
    family: str = "llama"
    num_heads: int = field(default=4, metadata=bounds(1))
    num_kv_heads: int = field(default=4, metadata=bounds(1))
    head_dim: int = field(default=0, metadata=bounds(0))  # 0: d_model // num_heads
    ffn_dim: int = field(default=768, metadata=bounds(1))
    norm_eps: float = field(default=1e-6, metadata=bounds(0.0))
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    sliding_window: int = field(default=0, metadata=bounds(0))  # > 0: local attention (Mistral)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def validate(self) -> None:
        self.validate_rope()
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} is not divisible by "
                              f"model.num_kv_heads={self.num_kv_heads}")
        if not self.head_dim and self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                              f"{self.num_heads}; set model.head_dim explicitly")
        super().validate()
        if self.resolved_head_dim % 2:
            how = (f"model.head_dim={self.head_dim}" if self.head_dim else
                   f"model.d_model={self.d_model} / model.num_heads={self.num_heads}")
            raise ConfigError(f"head dim {self.resolved_head_dim} ({how}) must be even for RoPE")

    def attention_params(self) -> int:
        return self.d_model * self.resolved_head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

    def matmul_params(self) -> int:
        """Attention and MLP projections of every layer, plus the output head (tied or not, the
        head's matmul runs). The embedding lookup is a gather, and norms are negligible."""
        mlp = 3 * self.d_model * self.ffn_dim
        return self.num_layers * (self.attention_params() + mlp) + self.d_model * self.vocab_size

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        width = self.num_heads * self.resolved_head_dim
        return 6 * self.matmul_params() + attention_flops(self.num_layers, seq_len, width, causal)
