"""T5 config (defaults: t5-small v1.1 shapes; the original T5 is `ffn_activation=relu`,
`gated_ffn=false`, `tie_embeddings=true`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from jaxlm.config_fields import ConfigError, bounds, choices
from jaxlm.models.config import ModelConfig, attention_flops


@dataclass
class T5Config(ModelConfig):
    objective: ClassVar[str] = "seq2seq"

    family: str = "t5"
    vocab_size: int = field(default=32128, metadata=bounds(1))
    d_model: int = field(default=512, metadata=bounds(1))
    num_layers: int = field(default=8, metadata=bounds(1))           # encoder layers
    num_decoder_layers: int = field(default=0, metadata=bounds(0))   # 0: num_layers
    num_heads: int = field(default=6, metadata=bounds(1))
    head_dim: int = field(default=64, metadata=bounds(1))            # T5's d_kv
    ffn_dim: int = field(default=1024, metadata=bounds(1))
    relative_buckets: int = field(default=32, metadata=bounds(2))
    relative_max_distance: int = field(default=128, metadata=bounds(2))
    norm_eps: float = field(default=1e-6, metadata=bounds(0.0))
    # the feed-forward: v1.1's gated GELU (tanh), or the original T5's plain ReLU MLP
    ffn_activation: str = field(default="gelu_tanh",
                                metadata=choices("gelu_tanh", "gelu", "relu", "silu"))
    gated_ffn: bool = True

    @property
    def ffn_matrices(self) -> int:
        return 3 if self.gated_ffn else 2

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    def validate(self) -> None:
        if self.attention_impl == "pallas":
            raise ConfigError("model.attention_impl=pallas cannot add T5's relative position "
                              "bias (the kernel takes no logit bias); use xla, cudnn or auto")
        if self.decoder_layers % self.scan_unroll:
            raise ConfigError(f"model.scan_unroll={self.scan_unroll} does not divide the "
                              f"{self.decoder_layers} decoder layers")
        if self.relative_max_distance <= self.relative_buckets // 4:
            raise ConfigError(f"model.relative_max_distance={self.relative_max_distance} must "
                              f"exceed a quarter of model.relative_buckets="
                              f"{self.relative_buckets} (where the log-spaced buckets start)")
        super().validate()

    def check_mesh(self, sizes: dict[str, int]) -> None:
        if sizes["stage"] > 1:
            raise ConfigError(f"mesh.stage={sizes['stage']}: model.family=t5 does not run on a "
                              f"pipeline (an encoder-decoder has two stacks); use data, fsdp or "
                              f"tensor parallelism")

    def matmul_params(self) -> int:
        """Per encoder token: the encoder layers (q, k, v, o; the MLP) and the decoder's
        cross-attention k, v (computed once per encoder token)."""
        d, w = self.d_model, self.num_heads * self.head_dim
        return (self.num_layers * (4 * d * w + self.ffn_matrices * d * self.ffn_dim)
                + self.decoder_layers * 2 * d * w)

    def decoder_matmul_params(self) -> int:
        """Per decoder token: self-attention q, k, v, o, cross-attention q, o, the MLP
        and the head."""
        d, w = self.d_model, self.num_heads * self.head_dim
        return (self.decoder_layers * (6 * d * w + self.ffn_matrices * d * self.ffn_dim)
                + d * self.vocab_size)

    def flops_per_token(self, seq_len: int, target_len: int = 0) -> float:
        """Per encoder token (what tokens/s counts), the decoder's work included at
        target_len / seq_len decoder tokens per encoder token: bidirectional encoder attention,
        causal decoder self-attention, and cross-attention over all seq_len encoder tokens."""
        w = self.num_heads * self.head_dim
        encoder = 6 * self.matmul_params() + attention_flops(self.num_layers, seq_len, w, False)
        decoder = (6 * self.decoder_matmul_params()
                   + attention_flops(self.decoder_layers, target_len, w, True)
                   + attention_flops(self.decoder_layers, seq_len, w, False))
        return encoder + decoder * target_len / seq_len

    def run_flops_per_token(self, data) -> float:
        from jaxlm.data.span_plan import span_lengths  # numpy only: the derived target length
        target = span_lengths(data.seq_len, data.target_len, data.noise_density,
                              data.mean_noise_span_length).target_len
        return self.flops_per_token(data.seq_len, target)
