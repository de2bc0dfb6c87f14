"""The Mixture-of-Experts fields a family config mixes in (Mixtral, DeepSeek): how many experts,
how tokens are routed to them, the balancing terms, and what a token's active parameters are."""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlm.config_fields import ConfigError, bounds, choices


@dataclass
class MoEFields:
    num_experts: int = field(default=8, metadata=bounds(1))
    experts_per_token: int = field(default=2, metadata=bounds(1))  # top-k
    num_shared_experts: int = field(default=0, metadata=bounds(0))
    expert_ffn_dim: int = field(default=0, metadata=bounds(0))  # 0: ffn_dim
    router: str = field(default="softmax", metadata=choices("softmax", "sigmoid"))
    dispatch: str = field(default="dropless", metadata=choices("dropless", "capacity"))
    capacity_factor: float = field(default=1.25, metadata=bounds(0.0))  # dispatch=capacity only
    aux_loss_weight: float = field(default=0.01, metadata=bounds(0.0))  # load balancing
    z_loss_weight: float = field(default=0.001, metadata=bounds(0.0))  # router z-loss
    # DeepSeek-V3 routing: experts in groups, a token picks among its best groups' experts
    num_groups: int = field(default=1, metadata=bounds(1))
    groups_per_token: int = field(default=1, metadata=bounds(1))
    routed_scale: float = field(default=1.0, metadata=bounds(0.0))  # x the combine weights
    # auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the scores that pick the
    # experts, moved this much toward uniform load after every step; 0 = off
    bias_update_rate: float = field(default=0.0, metadata=bounds(0.0))

    def validate_moe(self) -> None:
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"model.experts_per_token={self.experts_per_token} exceeds "
                              f"model.num_experts={self.num_experts}")
        if self.dispatch == "capacity" and self.capacity_factor <= 0:
            raise ConfigError("model.capacity_factor must be > 0 with model.dispatch=capacity")
        if self.num_experts % self.num_groups:
            raise ConfigError(f"model.num_groups={self.num_groups} does not divide "
                              f"model.num_experts={self.num_experts}")
        if self.groups_per_token > self.num_groups:
            raise ConfigError(f"model.groups_per_token={self.groups_per_token} exceeds "
                              f"model.num_groups={self.num_groups}")
        per_group = self.num_experts // self.num_groups
        if self.num_groups > 1 and (per_group < 2 or
                                    self.groups_per_token * per_group < self.experts_per_token):
            raise ConfigError(
                f"model.num_groups={self.num_groups}: groups of {per_group} experts (a group's "
                f"score is its best two) x model.groups_per_token={self.groups_per_token} cannot "
                f"hold model.experts_per_token={self.experts_per_token} picks")

    def check_moe_mesh(self, sizes: dict[str, int]) -> None:
        if self.num_experts % sizes["expert"]:
            raise ConfigError(f"model.num_experts={self.num_experts} is not divisible by "
                              f"mesh.expert={sizes['expert']}")
        if sizes["stage"] > 1 and self.bias_update_rate:  # forward-updated state
            raise ConfigError(f"mesh.stage={sizes['stage']} with model.bias_update_rate="
                              f"{self.bias_update_rate}: the pipeline schedules do not carry the "
                              f"balancing bias the forward pass moves")

    @property
    def has_aux_losses(self) -> bool:
        return True  # the balancing and z losses (jaxlm.nn.moe), whatever their weights

    def moe_matmul_params(self, d_model: int, ffn_dim: int) -> int:
        """What one token activates in an MoE layer: the router, its top-k experts and the
        shared experts (never all E experts)."""
        active = self.experts_per_token + self.num_shared_experts
        return d_model * self.num_experts + 3 * d_model * (self.expert_ffn_dim or ffn_dim) * active
