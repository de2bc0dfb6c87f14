"""Mixture of Experts: the block against a plain loop over experts, the two dispatch modes against
each other and against hand-picked drops, aux losses against hand-computed values, gradients to
the router, active-parameter FLOPs, config errors, and expert parallelism on 8 simulated devices
giving the same training as one device."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import MESH_AXES, ConfigError, check_against_devices, load_config
from jaxlm.nn import moe
from jaxlm.parallel.sharding import make_mesh
from jaxlm.step import build_step_fns
from helpers import mesh_for, packed_batches, tiny_config, train_on_mesh


def moe_config(**kw):
    base = dict(d_model=32, num_experts=4, experts_per_token=2, expert_ffn_dim=24,
                num_shared_experts=0, router="softmax", dispatch="dropless", capacity_factor=1.0,
                std=0.3, out_std=0.3, dtype=jnp.float32, param_dtype=jnp.float32)
    base.update(kw)
    return moe.MoEConfig(**base)


def swiglu(x_D, wg_DxF, wu_DxF, wd_FxD):
    g = x_D @ wg_DxF
    return ((g / (1 + np.exp(-g))) * (x_D @ wu_DxF)) @ wd_FxD


def reference(layer, x_TxD, k, kind, keep_TxK=None):
    """Plain numpy (fp64): route each token, loop over its chosen experts."""
    p = {n: np.asarray(getattr(layer, n)[...], np.float64)
         for n in ("router", "w_gate", "w_up", "w_down")}
    x = np.asarray(x_TxD, np.float64)
    logits = x @ p["router"]
    if kind == "softmax":
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    else:
        scores = 1 / (1 + np.exp(-logits))
    y = np.zeros_like(x)
    for t in range(len(x)):
        top = np.argsort(-scores[t], kind="stable")[:k]
        w = scores[t, top] / (scores[t, top].sum() if (k > 1 or kind == "sigmoid") else 1.0)
        for j, e in enumerate(top):
            if keep_TxK is None or keep_TxK[t, j]:
                y[t] += w[j] * swiglu(x[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
    if hasattr(layer, "shared"):
        s = layer.shared
        y += np.stack([swiglu(xt, *(np.asarray(w[...], np.float64)
                                    for w in (s.w_gate, s.w_up, s.w_down))) for xt in x])
    return y


@pytest.mark.parametrize("kw", [
    dict(), dict(router="sigmoid", num_shared_experts=1), dict(experts_per_token=1),
    dict(dispatch="capacity", capacity_factor=4.0, num_experts=8, experts_per_token=3)])
def test_block_matches_loop_reference(kw):
    c = moe_config(**kw)
    layer = moe.MoE(c, nnx.Rngs(0))
    x_BxSxD = jax.random.normal(jax.random.key(1), (2, 8, c.d_model))
    y_BxSxD, aux = layer(x_BxSxD)
    want = reference(layer, np.asarray(x_BxSxD).reshape(16, -1), c.experts_per_token, c.router)
    assert np.abs(want).mean() > 1e-2  # the experts do contribute
    np.testing.assert_allclose(np.asarray(y_BxSxD).reshape(16, -1), want, rtol=1e-4, atol=1e-5)
    stats = aux["stats"]
    assert float(stats["moe_dropped_frac"]) == 0.0
    experts_TxK = moe.route(x_BxSxD.reshape(16, -1), layer.router[...], c.experts_per_token,
                            c.router)[1]
    load_E = moe.expert_load(experts_TxK, c.num_experts)
    np.testing.assert_allclose(float(jnp.sum(load_E)), 1.0, rtol=1e-6)
    assert float(stats["moe_load_max"]) == pytest.approx(float(load_E.max()) * c.num_experts)
    assert float(stats["moe_load_min"]) == pytest.approx(float(load_E.min()) * c.num_experts)


def test_dropless_equals_capacity_when_capacity_is_large():
    x_BxSxD = jax.random.normal(jax.random.key(2), (4, 8, 32))
    outs = []
    for dispatch in ("dropless", "capacity"):
        # capacity_factor = E/k: every expert could take every token
        layer = moe.MoE(moe_config(dispatch=dispatch, capacity_factor=2.0), nnx.Rngs(0))
        outs.append(layer(x_BxSxD))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    assert float(outs[1][1]["stats"]["moe_dropped_frac"]) == 0.0


def test_capacity_drops_the_right_tokens():
    """E=3, C=2, k=2. First choices are served before any second choice, each in token order."""
    experts_TxK = jnp.array([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [1, 2]])
    weights_TxK = jnp.full((6, 2), 0.5)
    # first choices: e0 <- t0,t1 (t2 dropped); e1 <- t3,t5; e2 <- t4
    # second choices: t0->e1 full, dropped; t1->e2 kept (2nd slot); t2->e1 dropped; t3->e0 full,
    # dropped; t4->e1 dropped; t5->e2 full, dropped
    keep_TxK = np.array([[1, 0], [1, 1], [0, 0], [1, 0], [1, 0], [1, 0]], bool)
    c = moe_config(num_experts=3, dispatch="capacity")
    layer = moe.MoE(c, nnx.Rngs(0))
    ws = (layer.w_gate[...], layer.w_up[...], layer.w_down[...])
    x_TxD = jax.random.normal(jax.random.key(3), (6, 32))
    y_TxD, dropped = moe.capacity_local(x_TxD, experts_TxK, weights_TxK, ws, 3, cap=2)
    assert float(dropped) == (~keep_TxK).sum() == 6
    p = [np.asarray(w, np.float64) for w in ws]
    want = np.zeros((6, 32))
    for t in range(6):
        for j in range(2):
            if keep_TxK[t, j]:
                e = int(experts_TxK[t, j])
                want[t] += 0.5 * swiglu(np.asarray(x_TxD[t], np.float64), p[0][e], p[1][e], p[2][e])
    np.testing.assert_allclose(y_TxD, want, rtol=1e-4, atol=1e-5)
    assert moe.capacity(6, dataclasses.replace(c, capacity_factor=1.0)) == 4  # ceil(1*6*2/3)


def test_aux_losses_by_hand():
    probs_TxE = jnp.array([[0.9, 0.1], [0.6, 0.4]])
    # both tokens pick expert 0: f = [1, 0], P = [0.75, 0.25] -> 2 * (1 * 0.75) = 1.5
    assert float(moe.load_balance_loss(probs_TxE, jnp.array([[0], [0]]))) == pytest.approx(1.5)
    # one each: f = [.5, .5] -> 2 * (.5 * .75 + .5 * .25) = 1.0 (balanced)
    assert float(moe.load_balance_loss(probs_TxE, jnp.array([[0], [1]]))) == pytest.approx(1.0)
    # top-2 of 2 experts: every expert gets half the assignments -> 1.0 whatever the probs
    both = jnp.array([[0, 1], [1, 0]])
    assert float(moe.load_balance_loss(probs_TxE, both)) == pytest.approx(1.0)
    # z-loss: logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 -> mean(ln2^2, 4 ln2^2)
    logits_TxE = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert float(moe.router_z_loss(logits_TxE)) == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)
    np.testing.assert_allclose(moe.expert_load(jnp.array([[0, 2], [0, 1]]), 4), [.5, .25, .25, 0])


def test_gradients_reach_the_router():
    """Through the combine weights (the output alone) and through the aux losses (alone), and the
    output gradient matches a finite difference."""
    c = moe_config(aux_loss_weight=1.0, z_loss_weight=1.0)
    layer = moe.MoE(c, nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x_BxSxD = jax.random.normal(jax.random.key(4), (2, 8, c.d_model))
    r_BxSxD = jax.random.normal(jax.random.key(5), (2, 8, c.d_model))

    def f(state, which):
        y, aux = nnx.merge(graphdef, state)(x_BxSxD)
        return jnp.sum(y * r_BxSxD) if which == "out" else sum(aux["losses"].values())

    for which in ("out", "aux"):
        g = jax.grad(f)(state, which)["router"][...]
        assert float(jnp.abs(g).max()) > 1e-4, which
    g = jax.grad(f)(state, "out")["router"][...]
    d = jax.random.normal(jax.random.key(6), g.shape) * 1e-3

    def at(sign):  # small steps where no routing decision changes, so the output is smooth
        moved = jax.tree.map(lambda x: x, state)
        moved["router"] = nnx.Param(state["router"][...] + sign * d)
        picks = [moe.route(x_BxSxD.reshape(16, -1), s["router"][...], 2, "softmax")[1]
                 for s in (state, moved)]
        np.testing.assert_array_equal(*picks)
        return f(moved, "out")
    fd = float(at(1) - at(-1)) / 2  # central difference
    assert fd == pytest.approx(float(jnp.sum(g * d)), rel=1e-2)


def test_active_param_flops():
    m = load_config(None, ["model.family=mixtral", "model.d_model=64", "model.num_layers=4", "model.num_heads=4",
                           "model.num_kv_heads=4", "model.ffn_dim=100", "model.vocab_size=10",
                           "model.num_experts=8", "model.experts_per_token=2",
                           "model.expert_ffn_dim=50", "model.moe_every=2",
                           "model.num_shared_experts=1"]).model
    attn = 4 * 64 * 64
    dense_mlp = 3 * 64 * 100
    moe_mlp = 64 * 8 + 3 * 64 * 50 * (2 + 1)  # router + top-2 + 1 shared, not all 8 experts
    assert m.matmul_params() == 4 * attn + 2 * dense_mlp + 2 * moe_mlp + 64 * 10


@pytest.mark.parametrize("overrides,message", [
    (["model.num_experts=4", "model.experts_per_token=5"], "experts_per_token=5 exceeds"),
    (["model.num_experts=4", "model.moe_every=3"], "moe_every=3 does not divide"),
    (["model.num_experts=4", "model.router=relu"], "model.router: 'relu' is not one of"),
    (["model.num_experts=4", "model.dispatch=capacity", "model.capacity_factor=0"],
     "capacity_factor must be > 0"),
])
def test_bad_moe_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("model.family=mixtral", *overrides)


def test_experts_must_divide_expert_axis():
    cfg = tiny_config("model.family=mixtral", "model.num_experts=6", "mesh.data=1",
                      "mesh.expert=8")
    with pytest.raises(ConfigError, match="num_experts=6 is not divisible by mesh.expert=8"):
        check_against_devices(cfg, 8)


# ---------------------------------------------------------------- expert parallelism

MOE = ["model.family=mixtral", "model.num_experts=8", "model.experts_per_token=2", "model.moe_every=2",
       "model.num_shared_experts=1", "model.expert_ffn_dim=32", "data.seq_len=16"]


def assert_same(ref, got):
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-6)  # noqa: E731
    jax.tree.map(close, ref.grads, got.grads)
    for m0, m1 in zip(ref.metrics, got.metrics):
        np.testing.assert_allclose(m0["loss"], m1["loss"], rtol=5e-5, atol=1e-7)
        for k in ("moe_lb_loss", "moe_z_loss", "moe_load_max", "moe_dropped_frac"):
            np.testing.assert_allclose(m0["stats"][k], m1["stats"][k], rtol=5e-5, atol=1e-7,
                                       err_msg=k)
    jax.tree.map(close, ref.params, got.params)
    assert ref.metrics[-1]["loss"] < ref.metrics[0]["loss"]  # it learned, so updates were compared


@pytest.fixture(scope="module")
def batches():
    return packed_batches(tiny_config(*MOE), 2)


# dropless: all-to-all over all 8 devices; capacity: EP=2 beside data and tensor (auto axes)
@pytest.mark.parametrize("dispatch,mesh", [
    ("dropless", ["mesh.data=1", "mesh.expert=8"]),
    ("capacity", ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2"]),
])
def test_expert_parallel_matches_one_device(batches, dispatch, mesh):
    extra = [f"model.dispatch={dispatch}", "model.capacity_factor=4.0"]  # capacity never exceeded
    ref_cfg = tiny_config(*MOE, *extra)
    ref = train_on_mesh(ref_cfg, mesh_for(ref_cfg, 1), batches)
    cfg = tiny_config(*MOE, *extra, *mesh)
    got = train_on_mesh(cfg, mesh_for(cfg), batches)
    assert_same(ref, got)
    assert all(float(m["stats"]["moe_dropped_frac"]) == 0.0 for m in got.metrics)
    w = got.state["params"]["layers"]["blocks"][1]["moe"]["w_gate"]  # [groups, E, D, F]
    ep = cfg.mesh.expert
    assert w.sharding.shard_shape(w.shape)[1] == 8 // ep  # each device holds E/ep experts


def test_aux_losses_enter_the_objective_not_the_logged_loss(batches):
    """Same init and batch: the logged loss (token NLL) is equal whatever the aux weights, but the
    gradient (its norm; Adam's first update is only its sign) differs once the weights are on."""
    out = []
    for w in ("0.0", "1.0"):
        cfg = tiny_config(*MOE, f"model.aux_loss_weight={w}", f"model.z_loss_weight={w}")
        mesh = make_mesh({a: 1 for a in MESH_AXES}, jax.devices()[:1])
        fns = build_step_fns(cfg, mesh)
        _, m = fns.train_step(fns.init(0), jax.device_put(batches[0], fns.batch_sharding))
        out.append((float(m["loss"]), float(m["stats"]["moe_lb_loss"]), float(m["grad_norm"])))
    assert out[0][0] == out[1][0] and out[0][1] == out[1][1]
    assert abs(out[0][2] - out[1][2]) > 1e-3 * out[0][2]
