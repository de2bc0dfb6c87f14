"""Honest numbers: model FLOPs per token, MFU against a per-device peak, and the run's loggers.

MFU counts model FLOPs only (6 x matmul parameters + attention), never recomputation, so remat
shows up as lower MFU rather than a flattering one. The same functions feed the trainer's log line
and the benchmarks.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax

from jaxlm.config import ModelConfig

# Dense bf16 peak FLOP/s per device (datasheet, without sparsity).
PEAK_FLOPS = {
    "h100": 989.4e12,
    "h200": 989.4e12,
    "h800": 989.4e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def matmul_params(m: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: attention and MLP projections of every
    layer, plus the output head (tied or not, the head's matmul runs). The embedding lookup is
    a gather, not a matmul, and norms are negligible. An MoE layer counts only what a token
    activates: the router, its top-k experts and the shared experts (never all E experts)."""
    hd = m.resolved_head_dim
    attn = m.d_model * hd * (2 * m.num_heads + 2 * m.num_kv_heads)
    mlp = 3 * m.d_model * m.ffn_dim
    dense = m.num_layers * (attn + mlp) + m.d_model * m.vocab_size
    if not m.num_experts:
        return dense
    active = m.experts_per_token + m.num_shared_experts
    moe_mlp = m.d_model * m.num_experts + 3 * m.d_model * (m.expert_ffn_dim or m.ffn_dim) * active
    return dense + (m.num_layers // m.moe_every) * (moe_mlp - mlp)


def flops_per_token(m: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus attention's
    QK^T and PV: 12 * L * S * (heads * head_dim), halved when causal."""
    attn = 12 * m.num_layers * seq_len * m.num_heads * m.resolved_head_dim
    return 6 * matmul_params(m) + (attn / 2 if causal else attn)


def peak_flops(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Per-device peak FLOP/s from the table (None where unknown, e.g. CPU: then no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return None


def mfu(tokens_per_sec: float, flops_token: float, peak_per_device: float | None,
        num_devices: int) -> float | None:
    if not peak_per_device:
        return None
    return tokens_per_sec * flops_token / (peak_per_device * num_devices)


def peak_memory_bytes() -> int | None:
    """Largest peak across local devices, where the backend reports it (GPU/TPU; not CPU)."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # backends without memory stats
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


class MetricsWriter:
    """JSONL + TensorBoard in the run directory; only process 0 writes."""

    def __init__(self, run_dir: Path, jsonl: bool, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        if jsonl:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if v is not None and not
                 (isinstance(v, float) and math.isnan(v))}
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tb:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self):
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def format_line(step: int, m: dict) -> str:
    parts = [f"step {step}"]
    fmt = [("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"), ("eval_ppl", "ppl {:.2f}"),
           ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
           ("step_time_s", "{:.3f} s/step"), ("data_wait_s", "data {:.3f} s/step"),
           ("mfu", "MFU {:.1%}"), ("moe_lb_loss", "lb {:.3f}"),
           ("moe_dropped_frac", "dropped {:.2%}"),
           ("peak_mem_gib", "mem {:.2f} GiB")]
    for key, f in fmt:
        if m.get(key) is not None:
            parts.append(f.format(m[key]))
    return " | ".join(parts)
