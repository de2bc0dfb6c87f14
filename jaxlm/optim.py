"""The optax chain from `OptimConfig`: schedule, global-norm clipping, AdamW with a decay mask."""
from __future__ import annotations

import jax
import optax

from jaxlm.config import OptimConfig

NO_DECAY_AXES = {"norm"}  # norms (and biases, when a family has them) are not decayed


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(logical_specs):
    """True where weight decay applies: every parameter whose logical axes include no NO_DECAY
    axis (judged by names, not ndim, so stacked [layers, d] norm scales are still excluded)."""
    return jax.tree.map(lambda spec: not (set(spec) & NO_DECAY_AXES), logical_specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def make_optimizer(cfg: OptimConfig, total_steps: int, logical_specs) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask(logical_specs)))
    return optax.chain(*parts)
