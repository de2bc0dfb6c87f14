"""Learning-rate schedules and the weight-decay mask do what the config says."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm.config import OptimConfig
from jaxlm.optim import decay_mask, learning_rate_schedule, make_optimizer


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    cfg = OptimConfig(lr=1e-3, schedule=kind, warmup_steps=10, min_lr_ratio=0.1)
    f = learning_rate_schedule(cfg, total_steps=110)
    assert float(f(0)) == 0.0
    np.testing.assert_allclose(float(f(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(f(10)), 1e-3, rtol=1e-6)
    end = {"cosine": 1e-4, "linear": 1e-4, "constant": 1e-3}[kind]
    np.testing.assert_allclose(float(f(110)), end, rtol=1e-5)
    if kind == "cosine":  # halfway through the decay: lr = min + (max - min) / 2
        np.testing.assert_allclose(float(f(60)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)


def test_decay_mask_by_logical_names():
    specs = {"w": P("embed", "mlp"), "stacked_norm": P("layers", "norm"), "norm": P("norm")}
    assert decay_mask(specs) == {"w": True, "stacked_norm": False, "norm": False}


def test_weight_decay_hits_matrices_not_norms():
    specs = {"w": P("embed", "mlp"), "scale": P("layers", "norm")}
    params = {"w": jnp.ones((2, 3)), "scale": jnp.ones((2, 3))}
    cfg = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, clip_norm=0)
    tx = make_optimizer(cfg, 10, specs)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], np.zeros((2, 3)))


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_clipping_by_global_norm_before_adam(clip):
    """Two steps, a huge gradient then a tiny one, with b1=0, b2=0.5, eps=0: Adam's update is
    g2 / sqrt(nu_hat), and clipping changes nu through the first gradient. Worked out by hand."""
    specs = {"w": P("embed", "mlp")}
    params = {"w": jnp.zeros((4, 4))}
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0,
                      clip_norm=clip, b1=0.0, b2=0.5, eps=0.0)
    tx = make_optimizer(cfg, 10, specs)
    state = tx.init(params)
    g1 = {"w": jnp.full((4, 4), 100.0)}  # global norm 400
    g2 = {"w": jnp.full((4, 4), 0.01)}   # global norm 0.04: never clipped
    _, state = tx.update(g1, state, params)
    upd, _ = tx.update(g2, state, params)
    first = 100.0 * (1.0 / 400.0 if clip else 1.0)
    nu = 0.5 * 0.5 * first**2 + 0.5 * 0.01**2
    expected = -0.01 / np.sqrt(nu / (1 - 0.5**2))
    np.testing.assert_allclose(upd["w"], np.full((4, 4), expected), rtol=1e-5)
