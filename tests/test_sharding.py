"""A sharding change never changes the math: DP, FSDP, FSDP+TP and mixed meshes give the same
initial parameters, losses, gradients and updated parameters as one device (fp32 tolerance)."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.config import MESH_AXES
from jaxlm.sharding import logical_to_spec, make_mesh, use_rules
from jaxlm.step import build_step_fns, token_nll
from helpers import packed_batches, tiny_config

MESHES = {
    "single": {},
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "fsdp_tp": {"fsdp": 4, "tensor": 2},
    "dp_fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}


def mesh_of(axes):
    sizes = {a: axes.get(a, 1) for a in MESH_AXES}
    n = int(np.prod(list(sizes.values())))
    return make_mesh(sizes, jax.devices()[:n])


def train(cfg, axes, batches):
    mesh = mesh_of(axes)
    fns = build_step_fns(cfg, mesh)
    state = fns.init(cfg.train.seed)
    init_params = jax.device_get(state["params"])
    put = lambda b: jax.device_put(b, fns.batch_sharding)  # noqa: E731

    def grad_fn(params, batch):
        with use_rules(mesh, cfg.mesh.rules):
            return jax.grad(lambda p: token_nll(fns.graphdef, p, batch, True)[0])(params)

    grads = jax.device_get(jax.jit(grad_fn)(state["params"], put(batches[0])))
    losses = []
    for b in batches:
        state, m = fns.train_step(state, put(b))
        losses.append(float(m["loss"]))
    return init_params, grads, losses, jax.device_get(state["params"]), state


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config()
    batches = packed_batches(cfg, 3)
    return cfg, batches, train(cfg, MESHES["single"], batches)


@pytest.mark.parametrize("name", [m for m in MESHES if m != "single"] + ["fsdp_microbatches"])
def test_mesh_matches_single_device(reference, name):
    """Also: gradient accumulation over 2 microbatches on a mesh equals one full batch."""
    cfg, batches, (p0, g0, l0, p1, _) = reference
    if name == "fsdp_microbatches":
        cfg = tiny_config("train.microbatches=2")
    q0, h0, m0, q1, state = train(cfg, MESHES.get(name, {"fsdp": 4}), batches)
    close = lambda a, b, tol: np.testing.assert_allclose(a, b, rtol=tol, atol=tol)  # noqa: E731
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p0, q0)  # same init, bitwise
    jax.tree.map(lambda a, b: close(a, b, 2e-5), g0, h0)
    np.testing.assert_allclose(l0, m0, rtol=2e-5)
    jax.tree.map(lambda a, b: close(a, b, 2e-5), p1, q1)
    assert l0[-1] < l0[0]  # it did learn, so the comparison covered real updates


def test_state_is_sharded_as_the_rules_say():
    cfg = tiny_config()
    mesh = mesh_of({"fsdp": 4, "tensor": 2})
    fns = build_step_fns(cfg, mesh)
    state = fns.init(0)
    wq = state["params"]["layers"]["attn"]["wq"]   # [layers, embed, heads, head_dim]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    mu = state["opt_state"][1][0].mu["layers"]["attn"]["wq"]  # optimizer state follows params
    assert mu.sharding.spec == wq.sharding.spec
    # each device holds 1/8 of this tensor
    assert wq.addressable_shards[0].data.size * 8 == wq.size
    emb = state["params"]["embed"]  # [vocab, embed]
    assert emb.sharding.spec == P("tensor", "fsdp")


def test_logical_to_spec_skips_used_and_size_one_axes():
    mesh = mesh_of({"data": 2, "fsdp": 4})
    rules = [("batch", ["data", "fsdp", "tensor"]), ("embed", "fsdp"), ("mlp", "tensor")]
    assert logical_to_spec(("batch", "embed"), rules, mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp"), rules, mesh) == P("fsdp", None)
    assert logical_to_spec(("unknown", None), rules, mesh) == P(None, None)


def test_indivisible_dimension_names_the_tensor():
    from jaxlm.config import ConfigError
    cfg = tiny_config("model.num_kv_heads=1", "model.num_heads=2", "model.vocab_size=304")
    with pytest.raises(ConfigError, match=r"parameter layers.attn.wk with shape \(2, 32, 1, 16\) "
                       r".*dimension 1 is not divisible by mesh axes tensor=8"):
        build_step_fns(cfg, mesh_of({"tensor": 8}))
