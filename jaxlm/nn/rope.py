"""Rotary position embedding (rotate-half convention, as in Llama and Hugging Face), with the
frequency scaling Llama 3 uses to stretch a model's context."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 scaling: wavelengths longer than original_max_positions / low_freq_factor are
    slowed by `factor`, those shorter than original_max_positions / high_freq_factor kept, and
    the band between interpolated smoothly."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int

    @classmethod
    def of(cls, f) -> "RopeScaling | None":
        """From a family config's RoPE fields (jaxlm/models/config.py RopeFields)."""
        if f.rope_scaling == "none":
            return None
        return cls(f.rope_scaling_factor, f.rope_low_freq_factor, f.rope_high_freq_factor,
                   f.rope_original_max_positions)

    def apply(self, inv_freq_K2):
        wavelen_K2 = 2 * math.pi / inv_freq_K2
        low_wavelen = self.original_max_positions / self.low_freq_factor
        high_wavelen = self.original_max_positions / self.high_freq_factor
        slowed_K2 = jnp.where(wavelen_K2 > low_wavelen, inv_freq_K2 / self.factor, inv_freq_K2)
        smooth_K2 = ((self.original_max_positions / wavelen_K2 - self.low_freq_factor)
                     / (self.high_freq_factor - self.low_freq_factor))
        smoothed_K2 = (1 - smooth_K2) * slowed_K2 / self.factor + smooth_K2 * slowed_K2
        medium_K2 = (wavelen_K2 >= high_wavelen) & (wavelen_K2 <= low_wavelen)
        return jnp.where(medium_K2, smoothed_K2, slowed_K2)


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """fp32 [head_dim / 2]: theta^(-2i / head_dim), scaled."""
    half = head_dim // 2
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    return inv_freq_K2 if scaling is None else scaling.apply(inv_freq_K2)


def rope(x_BxSxHxK, positions_BxS, theta: float, scaling: RopeScaling | None = None):
    """Rotary embedding of the last dim; angles computed in fp32."""
    half = x_BxSxHxK.shape[-1] // 2
    inv_freq_K2 = inv_frequencies(x_BxSxHxK.shape[-1], theta, scaling)
    ang_BxSxK2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq_K2
    cos = jnp.cos(ang_BxSxK2)[:, :, None, :].astype(x_BxSxHxK.dtype)
    sin = jnp.sin(ang_BxSxK2)[:, :, None, :].astype(x_BxSxHxK.dtype)
    x1, x2 = x_BxSxHxK[..., :half], x_BxSxHxK[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
