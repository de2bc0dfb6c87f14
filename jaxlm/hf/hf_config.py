"""Reading a Hugging Face config.json into jaxlm model fields, field by field: a value jaxlm
cannot honour (an unsupported RoPE type, an activation it lacks, a bias it has no place for) is
one HFError naming the file and the field, never silently dropped. Also the parts several
families share (RoPE both ways)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from jaxlm.hf.files import HFError

_MISSING = object()


class HFConfig:
    """A config.json's fields, with errors that name the file."""

    def __init__(self, values: dict, path: Path | str):
        self.values, self.path = values, Path(path)

    def get(self, key: str, default: Any = _MISSING):
        value = self.values.get(key, default)
        if value is _MISSING or (value is None and default is _MISSING):
            raise HFError(f"{self.path}: missing field '{key}'")
        return default if value is None else value

    def expect(self, key: str, allowed, default=None, why: str = "") -> Any:
        """The field's value, which must be one of `allowed` (absent counts as `default`)."""
        value = self.values.get(key, default)
        if value is None:
            value = default
        if value not in allowed:
            raise HFError(f"{self.path}: {key}={value!r} is not supported by jaxlm"
                          + (f" ({why})" if why else "") + "; expected "
                          + " or ".join(repr(a) for a in allowed))
        return value

    def fail(self, key: str, why: str):
        raise HFError(f"{self.path}: {key}={self.values.get(key)!r}: {why}")


def rope_from_hf(hf: HFConfig, default_theta: float = 10000.0) -> dict:
    """jaxlm RoPE fields (jaxlm/models/config.py RopeFields) from transformers 5's
    `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = hf.values.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params = dict(hf.values.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.values.get("rope_theta", default_theta))
        key = "rope_scaling"
    if not isinstance(params, dict):
        hf.fail(key, "expected a mapping")
    kind = params.get("rope_type", params.get("type", "default"))
    fields = {"rope_theta": float(params.get("rope_theta", default_theta))}
    if kind == "default":
        return {**fields, "rope_scaling": "none"}
    try:
        if kind == "llama3":
            return {**fields, "rope_scaling": "llama3",
                    "rope_scaling_factor": float(params["factor"]),
                    "rope_low_freq_factor": float(params["low_freq_factor"]),
                    "rope_high_freq_factor": float(params["high_freq_factor"]),
                    "rope_original_max_positions": int(
                        params["original_max_position_embeddings"])}
        if kind == "yarn":
            return {**fields, "rope_scaling": "yarn",
                    "rope_scaling_factor": float(params["factor"]),
                    "rope_original_max_positions": int(
                        params["original_max_position_embeddings"]),
                    "rope_beta_fast": float(params.get("beta_fast") or 32.0),
                    "rope_beta_slow": float(params.get("beta_slow") or 1.0),
                    "rope_mscale": float(params.get("mscale") or 0.0),
                    "rope_mscale_all_dim": float(params.get("mscale_all_dim") or 0.0),
                    "rope_attention_factor": float(params.get("attention_factor") or 0.0),
                    "rope_truncate": bool(params.get("truncate", True))}
    except (KeyError, TypeError) as e:
        hf.fail(key, f"rope_type {kind!r} needs {e.args[0]!r}")
    raise HFError(f"{hf.path}: {key}.rope_type={kind!r} is not supported by jaxlm; expected "
                  f"'default', 'llama3' or 'yarn'")


def rope_to_hf(cfg) -> dict:
    """transformers 5's `rope_parameters` for a jaxlm config's RoPE fields."""
    params = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling == "llama3":
        params.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                      low_freq_factor=cfg.rope_low_freq_factor,
                      high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_positions)
    if cfg.rope_scaling == "yarn":
        params.update(rope_type="yarn", factor=cfg.rope_scaling_factor,
                      original_max_position_embeddings=cfg.rope_original_max_positions,
                      beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if not cfg.rope_truncate:  # transformers' default is true
            params["truncate"] = False
        params.update({k: v for k, v in (("mscale", cfg.rope_mscale),
                                         ("mscale_all_dim", cfg.rope_mscale_all_dim),
                                         ("attention_factor", cfg.rope_attention_factor)) if v})
    return {"rope_parameters": params}
