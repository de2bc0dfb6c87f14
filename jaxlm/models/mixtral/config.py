"""Mixtral-style config: the Llama decoder with a Mixture-of-Experts feed-forward in every
`moe_every`-th layer (jaxlm/nn/moe.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlm.config_fields import ConfigError, bounds
from jaxlm.models.llama.config import LlamaConfig
from jaxlm.models.moe_fields import MoEFields


@dataclass
class MixtralConfig(MoEFields, LlamaConfig):
    family: str = "mixtral"
    # every moe_every-th layer is MoE; the scanned unit is then a group of moe_every layers
    # (moe_every - 1 dense, then the MoE one), so the stack stays homogeneous
    moe_every: int = field(default=1, metadata=bounds(1))

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
        self.validate_moe()
        if self.num_layers % self.moe_every:
            raise ConfigError(f"model.moe_every={self.moe_every} does not divide "
                              f"model.num_layers={self.num_layers}")
        super().validate()

    def check_mesh(self, sizes: dict[str, int]) -> None:
        self.check_moe_mesh(sizes)

    def matmul_params(self) -> int:
        dense_mlp = 3 * self.d_model * self.ffn_dim
        moe_mlp = self.moe_matmul_params(self.d_model, self.ffn_dim)
        return super().matmul_params() + self.num_moe_layers * (moe_mlp - dense_mlp)
