"""The optax chain from `OptimConfig`: schedule, global-norm clipping, AdamW with a decay mask."""
from __future__ import annotations

import jax
import optax

from jaxlm.config import OptimConfig

NO_DECAY_AXES = {"norm"}  # norm scales (and LayerNorm biases) are not decayed; nor are biases


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


def is_bias(name: str) -> bool:
    return name == "bias" or name.startswith("b_")  # jaxlm.nn names its biases so


def decay_mask(logical_specs):
    """True where weight decay applies: every parameter whose logical axes include no NO_DECAY
    axis and that is not a bias (judged by names, not ndim, so stacked [layers, d] norm scales
    and [layers, heads, head_dim] biases are still excluded)."""
    def decays(path, spec):
        return not (set(spec) & NO_DECAY_AXES) and not is_bias(str(getattr(path[-1], "key", "")))
    return jax.tree_util.tree_map_with_path(
        decays, logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def make_optimizer(cfg: OptimConfig, total_steps: int, logical_specs) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask(logical_specs)))
    return optax.chain(*parts)
