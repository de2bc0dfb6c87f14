"""What every model family's config has, and what a family is.

A family is a folder under jaxlm/models whose `__init__.py` defines `FAMILY = Family(...)`: its
config dataclass (a `ModelConfig` with the family's own fields, validation and FLOPs formula) and
where its model class lives. `model.family` in a run's config picks one; jaxlm.models.registry
finds them. Nothing here imports JAX, so configs load (and `jaxlm.data prepare` runs) without it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from jaxlm.config_fields import ConfigError, bounds, choices

ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "auto")  # jaxlm.nn.attend implements each


@dataclass
class ModelConfig:
    """Fields every family has. `objective` names the loss in jaxlm.objectives it trains with."""
    objective: ClassVar[str] = "causal_lm"

    family: str = "llama"
    vocab_size: int = field(default=512, metadata=bounds(1))
    d_model: int = field(default=256, metadata=bounds(1))
    num_layers: int = field(default=4, metadata=bounds(1))
    tie_embeddings: bool = False
    init_std: float = field(default=0.02, metadata=bounds(0.0))
    param_dtype: str = field(default="float32", metadata=choices("float32", "bfloat16"))
    dtype: str = field(default="float32", metadata=choices("float32", "bfloat16", "float16"))
    attention_impl: str = field(default="xla", metadata=choices(*ATTENTION_IMPLS))
    scan_layers: bool = True
    # with scan_layers: stack units per scan iteration (all of them = fully unrolled; parameters
    # stay stacked either way, so checkpoints and the 'layers' axis do not change)
    scan_unroll: int = field(default=1, metadata=bounds(1))
    remat: str = field(default="none", metadata=choices("none", "full", "save_dots"))
    # fp8: attention and dense-MLP projections multiply in float8 (e4m3 forward, e5m2
    # gradients, per-tensor scales; jaxlm/nn/fp8.py); default: in `dtype`
    matmul_precision: str = field(default="default", metadata=choices("default", "fp8"))
    # fp8 activation and gradient scales: `current` from the tensor itself (one more pass over
    # it), `delayed` from the amax history of the last fp8_amax_history steps, kept in the
    # train state (1B preset on an H200: 141.0 against 144.5 ms a step; over 1,000 steps its
    # one run ended 3% above bf16's loss, inside fp8's run-to-run spread: benchmarks/RESULTS.md;
    # not on pipeline stages). Weights are always scaled current.
    fp8_scaling: str = field(default="current", metadata=choices("current", "delayed"))
    fp8_amax_history: int = field(default=16, metadata=bounds(1))
    # delayed scaling's headroom in bits: activation and gradient scales 2^margin times what
    # their history's largest amax asks for, so a value up to 2^margin times past it still
    # fits the format (Transformer Engine's DelayedScaling margin), for one bit of precision
    fp8_margin: int = field(default=0, metadata=bounds(0))
    # >1: the head and its cross-entropy run over this many strided chunks of positions, each
    # chunk's logits computed with its gradients and dropped (jaxlm/head_loss.py), so the
    # [tokens, vocab] float32 logits never exist whole; must divide the positions
    loss_chunks: int = field(default=1, metadata=bounds(1))
    # a Hugging Face model directory: the architecture fields come from its config.json and a
    # fresh run starts from its weights (the optimizer state fresh); see jaxlm/hf
    init_from: str = ""

    @property
    def fp8_history(self) -> int:
        """The amax history length layers carry (0: no delayed fp8 scaling state)."""
        delayed = self.matmul_precision == "fp8" and self.fp8_scaling == "delayed"
        return self.fp8_amax_history if delayed else 0

    @property
    def has_aux_losses(self) -> bool:
        """Whether the layer stack returns loss terms beside h (MoE's balancing losses)."""
        return False

    @property
    def num_units(self) -> int:
        """Length of the layer stack as scanned and pipelined (a unit may hold several layers)."""
        return self.num_layers

    def units_description(self) -> str:
        return f"model.num_layers={self.num_layers}"

    def validate(self) -> None:
        """Relations between fields (each field's own range is checked from its metadata)."""
        if self.num_units % self.scan_unroll:
            raise ConfigError(f"model.scan_unroll={self.scan_unroll} does not divide "
                              f"{self.units_description()}")
        if self.fp8_margin and not self.fp8_history:
            raise ConfigError(f"model.fp8_margin={self.fp8_margin} is delayed scaling's "
                              f"headroom: it needs model.matmul_precision=fp8 and "
                              f"model.fp8_scaling=delayed (current scales fit the tensor itself)")

    def check_mesh(self, sizes: dict[str, int]) -> None:
        """Checks that need the resolved mesh axis sizes (a family's parallelism limits)."""

    def check_seq_len(self, seq_len: int) -> None:
        """Checks against data.seq_len (e.g. a table of learned positions)."""

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (the 6N of the FLOPs formula)."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Training FLOPs per token: model FLOPs only, never recomputation."""
        raise NotImplementedError

    def run_flops_per_token(self, data) -> float:
        """FLOPs per token of data.seq_len for a run with this data config: what MFU uses."""
        return self.flops_per_token(data.seq_len)


def check_heads(d_model: int, num_heads: int) -> None:
    """Families whose head dim is d_model / num_heads."""
    if d_model % num_heads:
        raise ConfigError(f"model.d_model={d_model} is not divisible by model.num_heads={num_heads}")


def check_learned_positions(seq_len: int, max_positions: int) -> None:
    """Families with a table of learned positions cannot read rows longer than it."""
    if seq_len > max_positions:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_positions={max_positions}, "
                          f"the learned position table's length")


def attention_flops(num_layers: int, seq_len: int, width: int, causal: bool,
                    v_width: int | None = None) -> float:
    """Training FLOPs per token of QK^T and PV: 6 * L * S * (qk width + v width), i.e.
    12 * L * S * (heads * head_dim) when the values are as wide as the keys; halved when causal
    (forward 2·S·width per product per layer, backward twice that)."""
    flops = 6 * num_layers * seq_len * (width + (width if v_width is None else v_width))
    return flops / 2 if causal else flops


ROPE_SCALINGS = ("none", "llama3", "yarn")  # jaxlm.nn.rope implements each


@dataclass
class RopeFields:
    """The rotary embedding's fields a family config mixes in (Llama, Mixtral, DeepSeek)."""
    rope_theta: float = field(default=10000.0, metadata=bounds(1.0))
    # llama3 (Llama 3.1) or yarn (DeepSeek-V3, Qwen): long-context frequency scaling
    # (jaxlm.nn.rope.RopeScaling); factor and original_max_positions serve both
    rope_scaling: str = field(default="none", metadata=choices(*ROPE_SCALINGS))
    rope_scaling_factor: float = field(default=8.0, metadata=bounds(1.0))
    rope_original_max_positions: int = field(default=8192, metadata=bounds(1))
    rope_low_freq_factor: float = field(default=1.0, metadata=bounds(0.0))   # llama3
    rope_high_freq_factor: float = field(default=4.0, metadata=bounds(0.0))  # llama3
    rope_beta_fast: float = field(default=32.0, metadata=bounds(0.0))        # yarn
    rope_beta_slow: float = field(default=1.0, metadata=bounds(0.0))         # yarn
    rope_mscale: float = field(default=0.0, metadata=bounds(0.0))            # yarn, 0: unset
    rope_mscale_all_dim: float = field(default=0.0, metadata=bounds(0.0))    # yarn, 0: unset
    rope_attention_factor: float = field(default=0.0, metadata=bounds(0.0))  # yarn, 0: derived
    rope_truncate: bool = True                                               # yarn

    def validate_rope(self) -> None:
        llama3 = self.rope_scaling == "llama3"
        if llama3 and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must "
                              f"exceed model.rope_low_freq_factor={self.rope_low_freq_factor}")


@dataclass(frozen=True)
class Family:
    name: str
    config: type[ModelConfig]
    model: str  # "module:Class", imported only when a model is built


def fields_of(cfg: ModelConfig) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg)}
