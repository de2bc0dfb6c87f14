"""DeepSeek-V3-style config: MLA attention, the first `num_dense_layers` layers dense, the rest
MoE with sigmoid routing, auxiliary-loss-free balancing and shared experts."""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlm.config_fields import ConfigError, bounds, choices
from jaxlm.models.config import ModelConfig, RopeFields, attention_flops
from jaxlm.models.moe_fields import MoEFields


@dataclass
class DeepseekConfig(MoEFields, RopeFields, ModelConfig):
    family: str = "deepseek"
    num_heads: int = field(default=8, metadata=bounds(1))
    q_lora_rank: int = field(default=0, metadata=bounds(0))  # 0: queries without a low rank
    kv_lora_rank: int = field(default=128, metadata=bounds(1))
    qk_nope_head_dim: int = field(default=64, metadata=bounds(1))
    qk_rope_head_dim: int = field(default=32, metadata=bounds(2))
    v_head_dim: int = field(default=64, metadata=bounds(1))
    norm_eps: float = field(default=1e-6, metadata=bounds(0.0))
    ffn_dim: int = field(default=1024, metadata=bounds(1))  # the dense layers' MLP
    num_dense_layers: int = field(default=1, metadata=bounds(0))  # DeepSeek's first_k_dense
    # MoE defaults as DeepSeek-V3: sigmoid scores, shared expert, balancing by a bias
    router: str = field(default="sigmoid", metadata=choices("softmax", "sigmoid"))
    num_shared_experts: int = field(default=1, metadata=bounds(0))
    aux_loss_weight: float = field(default=0.0001, metadata=bounds(0.0))
    z_loss_weight: float = field(default=0.0, metadata=bounds(0.0))
    bias_update_rate: float = field(default=0.001, metadata=bounds(0.0))

    @property
    def num_units(self) -> int:
        """The MoE layers' stack (the dense first layers run as a stack of their own)."""
        return self.num_layers - self.num_dense_layers

    def units_description(self) -> str:
        return (f"the {self.num_units} MoE layers (model.num_layers - model.num_dense_layers) or "
                f"the {self.num_dense_layers} dense ones")

    def validate(self) -> None:
        self.validate_moe()
        self.validate_rope()
        if self.num_dense_layers >= self.num_layers:
            raise ConfigError(f"model.num_dense_layers={self.num_dense_layers} leaves no MoE "
                              f"layer of model.num_layers={self.num_layers}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even "
                              f"for RoPE")
        if self.num_dense_layers % self.scan_unroll:
            raise ConfigError(f"model.scan_unroll={self.scan_unroll} does not divide "
                              f"model.num_dense_layers={self.num_dense_layers}")
        super().validate()

    def check_mesh(self, sizes: dict[str, int]) -> None:
        self.check_moe_mesh(sizes)
        if sizes["stage"] > 1 and self.num_dense_layers:
            raise ConfigError(f"mesh.stage={sizes['stage']} with model.num_dense_layers="
                              f"{self.num_dense_layers}: the dense first layers and the MoE "
                              f"layers are two stacks, and the pipeline splits one")

    def attention_params(self) -> int:
        d, h = self.d_model, self.num_heads
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = (d * self.q_lora_rank + self.q_lora_rank * h * qk) if self.q_lora_rank else d * h * qk
        kv = (d * (self.kv_lora_rank + self.qk_rope_head_dim)
              + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim))
        return q + kv + h * self.v_head_dim * d

    def matmul_params(self) -> int:
        """MLA projections of every layer; the dense layers' MLP; in MoE layers what a token
        activates (router, top-k and shared experts); the head."""
        return (self.num_layers * self.attention_params()
                + self.num_dense_layers * 3 * self.d_model * self.ffn_dim
                + self.num_units * self.moe_matmul_params(self.d_model, self.ffn_dim)
                + self.d_model * self.vocab_size)

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        h = self.num_heads
        return 6 * self.matmul_params() + attention_flops(
            self.num_layers, seq_len, h * (self.qk_nope_head_dim + self.qk_rope_head_dim), causal,
            v_width=h * self.v_head_dim)
