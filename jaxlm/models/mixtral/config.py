"""Mixtral-style config: the Llama decoder with a Mixture-of-Experts feed-forward in every
`moe_every`-th layer (jaxlm/nn/moe.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlm.config_fields import ConfigError, bounds, choices
from jaxlm.models.llama.config import LlamaConfig


@dataclass
class MixtralConfig(LlamaConfig):
    family: str = "mixtral"
    num_experts: int = field(default=8, metadata=bounds(1))
    experts_per_token: int = field(default=2, metadata=bounds(1))  # top-k
    # every moe_every-th layer is MoE; the scanned unit is then a group of moe_every layers
    # (moe_every - 1 dense, then the MoE one), so the stack stays homogeneous
    moe_every: int = field(default=1, metadata=bounds(1))
    num_shared_experts: int = field(default=0, metadata=bounds(0))
    expert_ffn_dim: int = field(default=0, metadata=bounds(0))  # 0: ffn_dim
    router: str = field(default="softmax", metadata=choices("softmax", "sigmoid"))
    dispatch: str = field(default="dropless", metadata=choices("dropless", "capacity"))
    capacity_factor: float = field(default=1.25, metadata=bounds(0.0))  # dispatch=capacity only
    aux_loss_weight: float = field(default=0.01, metadata=bounds(0.0))  # load balancing
    z_loss_weight: float = field(default=0.001, metadata=bounds(0.0))  # router z-loss

    @property
    def num_units(self) -> int:
        return self.num_layers // self.moe_every

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers // self.moe_every

    def units_description(self) -> str:
        if self.moe_every == 1:
            return super().units_description()
        return f"the {self.num_units} scanned groups of model.moe_every={self.moe_every} layers"

    def validate(self) -> None:
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"model.experts_per_token={self.experts_per_token} exceeds "
                              f"model.num_experts={self.num_experts}")
        if self.num_layers % self.moe_every:
            raise ConfigError(f"model.moe_every={self.moe_every} does not divide "
                              f"model.num_layers={self.num_layers}")
        if self.dispatch == "capacity" and self.capacity_factor <= 0:
            raise ConfigError("model.capacity_factor must be > 0 with model.dispatch=capacity")
        super().validate()

    def check_mesh(self, sizes: dict[str, int]) -> None:
        if self.num_experts % sizes["expert"]:
            raise ConfigError(f"model.num_experts={self.num_experts} is not divisible by "
                              f"mesh.expert={sizes['expert']}")
        if sizes["stage"] > 1:  # MoE units return aux losses the pipeline schedules do not carry
            raise ConfigError(f"mesh.stage={sizes['stage']} with model.num_experts="
                              f"{self.num_experts}: pipeline parallelism does not support MoE "
                              f"models yet")

    def matmul_params(self) -> int:
        """An MoE layer counts only what a token activates: the router, its top-k experts and
        the shared experts (never all E experts)."""
        active = self.experts_per_token + self.num_shared_experts
        ffn = self.expert_ffn_dim or self.ffn_dim
        moe_mlp = self.d_model * self.num_experts + 3 * self.d_model * ffn * active
        dense_mlp = 3 * self.d_model * self.ffn_dim
        return super().matmul_params() + self.num_moe_layers * (moe_mlp - dense_mlp)
