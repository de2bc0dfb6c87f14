"""Honest numbers: MFU against a per-device peak, and the run's loggers.

MFU counts model FLOPs only (each family's `flops_per_token`: 6 x matmul parameters + attention),
never recomputation, so remat shows up as lower MFU rather than a flattering one. The same
functions feed the trainer's log line and the benchmarks.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax


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


LINE_FORMATS = [("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"),
                ("eval_ppl", "ppl {:.2f}"), ("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
                ("tokens_per_sec", "{:,.0f} tok/s"), ("step_time_s", "{:.3f} s/step"),
                ("data_wait_s", "data {:.3f} s/step"), ("mfu", "MFU {:.1%}"),
                ("peak_mem_gib", "mem {:.2f} GiB")]


def format_line(step: int, m: dict, stats: dict | None = None) -> str:
    """The log line: the known metrics that are set, then the model's own stats by name."""
    parts = [f"step {step}"]
    for key, f in LINE_FORMATS:
        if m.get(key) is not None:
            parts.append(f.format(m[key]))
    parts += [f"{k} {v:.4g}" for k, v in (stats or {}).items()]
    return " | ".join(parts)
