"""Rotary position embedding (rotate-half convention, as in Llama and Hugging Face), with the
frequency scalings that stretch a model's context: Llama 3's and YaRN (DeepSeek-V3, Qwen)."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """llama3: wavelengths longer than original_max_positions / low_freq_factor are slowed by
    `factor`, those shorter than original_max_positions / high_freq_factor kept, the band
    between interpolated smoothly. yarn: dims that rotate fewer than beta_slow times over the
    original context are interpolated (slowed by `factor`), those rotating more than beta_fast
    times kept, a linear ramp between; cos/sin are multiplied by an attention factor."""
    kind: str                      # llama3 | yarn
    factor: float
    original_max_positions: int
    low_freq_factor: float = 1.0   # llama3
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0        # yarn
    beta_slow: float = 1.0
    mscale: float = 0.0            # yarn: 0 = unset (as transformers' rope_parameters)
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0  # yarn: x cos and sin; 0 = derived from factor and mscales
    truncate: bool = True

    @classmethod
    def of(cls, f) -> "RopeScaling | None":
        """From a family config's RoPE fields (jaxlm/models/config.py RopeFields)."""
        if f.rope_scaling == "none":
            return None
        return cls(f.rope_scaling, f.rope_scaling_factor, f.rope_original_max_positions,
                   f.rope_low_freq_factor, f.rope_high_freq_factor, f.rope_beta_fast,
                   f.rope_beta_slow, f.rope_mscale, f.rope_mscale_all_dim,
                   f.rope_attention_factor, f.rope_truncate)

    def apply(self, inv_freq_K2, dim: int, theta: float):
        if self.kind == "yarn":
            return self._yarn(inv_freq_K2, dim, theta)
        wavelen_K2 = 2 * math.pi / inv_freq_K2
        low_wavelen = self.original_max_positions / self.low_freq_factor
        high_wavelen = self.original_max_positions / self.high_freq_factor
        slowed_K2 = jnp.where(wavelen_K2 > low_wavelen, inv_freq_K2 / self.factor, inv_freq_K2)
        smooth_K2 = ((self.original_max_positions / wavelen_K2 - self.low_freq_factor)
                     / (self.high_freq_factor - self.low_freq_factor))
        smoothed_K2 = (1 - smooth_K2) * slowed_K2 / self.factor + smooth_K2 * slowed_K2
        medium_K2 = (wavelen_K2 >= high_wavelen) & (wavelen_K2 <= low_wavelen)
        return jnp.where(medium_K2, smoothed_K2, slowed_K2)

    def _yarn(self, inv_freq_K2, dim: int, theta: float):
        def dim_of(rotations):  # the dim that turns `rotations` times over the original context
            return (dim * math.log(self.original_max_positions / (rotations * 2 * math.pi))
                    / (2 * math.log(theta)))
        low, high = dim_of(self.beta_fast), dim_of(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp_K2 = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        keep_K2 = 1 - ramp_K2  # 1: extrapolate (keep the frequency), 0: interpolate
        return inv_freq_K2 / self.factor * (1 - keep_K2) + inv_freq_K2 * keep_K2

    @property
    def cos_sin_scale(self) -> float:
        if self.kind != "yarn":
            return 1.0
        if self.attention_factor:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor,
                                                                        self.mscale_all_dim)
        return _yarn_mscale(self.factor)

    @property
    def logit_scale(self) -> float:
        """DeepSeek's YaRN also multiplies the attention logits by mscale(mscale_all_dim)^2."""
        if self.kind != "yarn" or not self.mscale_all_dim:
            return 1.0
        return _yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """fp32 [head_dim / 2]: theta^(-2i / head_dim), scaled."""
    half = head_dim // 2
    inv_freq_K2 = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    return inv_freq_K2 if scaling is None else scaling.apply(inv_freq_K2, head_dim, theta)


def rope(x_BxSxHxK, positions_BxS, theta: float, scaling: RopeScaling | None = None):
    """Rotary embedding of the last dim; angles computed in fp32."""
    half = x_BxSxHxK.shape[-1] // 2
    inv_freq_K2 = inv_frequencies(x_BxSxHxK.shape[-1], theta, scaling)
    ang_BxSxK2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq_K2
    scale = 1.0 if scaling is None else scaling.cos_sin_scale
    cos = (jnp.cos(ang_BxSxK2) * scale)[:, :, None, :].astype(x_BxSxHxK.dtype)
    sin = (jnp.sin(ang_BxSxK2) * scale)[:, :, None, :].astype(x_BxSxHxK.dtype)
    x1, x2 = x_BxSxHxK[..., :half], x_BxSxHxK[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
