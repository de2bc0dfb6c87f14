"""Time jaxlm's compiled train step in a bare loop over device-resident synthetic batches.

The benchmarks share this so "the step" means the same thing everywhere: compile time apart,
warm-up steps excluded, and the loop doing nothing but dispatching steps (no data loading,
logging or checkpoints: `jaxlm.train` is measured against this to find its host overhead).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import Mesh

from jaxlm.config import Config
from jaxlm.data import synthetic_dataset
from jaxlm.step import build_step_fns


@dataclasses.dataclass
class StepTiming:
    step_s: float          # mean over the timed steps (they run back to back)
    compile_s: float
    temp_bytes: int | None  # the compiled step's temporaries per device
    tokens_per_sec: float
    metrics: dict          # the last step's metrics, on the host


def time_train_step(cfg: Config, mesh: Mesh, steps: int = 10, warmup: int = 3) -> StepTiming:
    fns = build_step_fns(cfg, mesh)
    state = fns.init(cfg.train.seed)
    data = synthetic_dataset(cfg.data, cfg.model.vocab_size, cfg.model.objective)
    B = cfg.train.global_batch_size
    rows = [data.get(np.arange(i * B, (i + 1) * B)) for i in range(2)]
    batches = [jax.device_put(fns.lay_out({k: r[k] for k in data.fields}), fns.batch_sharding)
               for r in rows]  # laid out as jaxlm.train lays them (zig-zag under ring attention)
    t0 = time.perf_counter()
    step = fns.train_step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    analysis = step.memory_analysis()
    for i in range(warmup):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    return StepTiming(dt, compile_s, analysis.temp_size_in_bytes if analysis else None,
                      B * cfg.data.seq_len / dt, jax.device_get(m))
