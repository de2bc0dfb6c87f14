"""Model families. `build_model` is the one constructor the trainer calls."""
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.models.llama import Llama

FAMILIES = {"llama": Llama}


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return FAMILIES[cfg.family](cfg, rngs)
