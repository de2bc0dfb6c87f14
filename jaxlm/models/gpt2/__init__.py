"""GPT-2: decoder-only, learned absolute positions, LayerNorm, GELU MLP, biases, tied head."""
from jaxlm.models.config import Family
from jaxlm.models.gpt2.config import GPT2Config

FAMILY = Family("gpt2", GPT2Config, "jaxlm.models.gpt2.model:GPT2")
