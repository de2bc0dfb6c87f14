"""DeepSeek-V2/V3 style: multi-head latent attention and fine-grained MoE with shared experts."""
from jaxlm.models.config import Family
from jaxlm.models.deepseek.config import DeepseekConfig

FAMILY = Family("deepseek", DeepseekConfig, "jaxlm.models.deepseek.model:Deepseek")
