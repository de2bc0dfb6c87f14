"""Pallas kernels for jaxlm. `flash_attention` is the public entry point (kernels_pallas/flash.py)."""
from kernels_pallas.flash import (BlockSizes, flash_attention, flash_attention_block_grads,
                                  flash_attention_with_lse)

__all__ = ["BlockSizes", "flash_attention", "flash_attention_block_grads",
           "flash_attention_with_lse"]
