"""Llama-style decoder-only family (also Mistral-shaped models: GQA, RoPE, SwiGLU)."""
from jaxlm.models.config import Family
from jaxlm.models.llama.config import LlamaConfig

FAMILY = Family("llama", LlamaConfig, "jaxlm.models.llama.model:Llama")
