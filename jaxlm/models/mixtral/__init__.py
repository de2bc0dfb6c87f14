"""Mixtral-style MoE decoder family: Llama's assembly with MoE feed-forwards."""
from jaxlm.models.config import Family
from jaxlm.models.mixtral.config import MixtralConfig

FAMILY = Family("mixtral", MixtralConfig, "jaxlm.models.mixtral.model:Mixtral")
