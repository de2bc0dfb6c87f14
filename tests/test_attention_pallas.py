"""jaxlm's `attention_impl: pallas` path: the model trains like the xla reference with the Pallas
kernel (CPU interpret mode here), on one device and per shard on a mesh (shard_map over batch and
heads), and meshes the kernel cannot serve are refused in one line."""
import jax
import pytest
from helpers import mesh_for, packed_batches, tiny_config, train_on_mesh
from test_sharding import assert_same_training

from jaxlm.nn import attend

HD64 = ["model.head_dim=64", "train.steps=2"]  # the kernel takes head_dim 64/128/256


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config(*HD64)
    batches = packed_batches(cfg, 2)
    return batches, train_on_mesh(cfg, mesh_for(cfg, 1), batches)


@pytest.mark.parametrize("mesh", [[], ["mesh.data=2", "mesh.fsdp=1", "mesh.tensor=2"]],
                         ids=["one_device", "data2_tensor2"])
def test_pallas_attention_trains_like_xla(reference, mesh):
    """Packed documents (segment ids) included: same init, grads, losses and params."""
    batches, ref = reference
    cfg = tiny_config(*HD64, "model.attention_impl=pallas", *mesh)
    got = train_on_mesh(cfg, mesh_for(cfg, 1 if not mesh else 4), batches)
    assert_same_training(ref, got)


def test_pallas_refuses_a_sequence_sharded_mesh():
    """With the sequence split and K/V all-gathered, the per-shard kernel cannot run (ring
    attention, the default, computes its blocks itself)."""
    cfg = tiny_config(*HD64, "model.attention_impl=pallas", "mesh.data=1", "mesh.fsdp=1",
                      "mesh.sequence=2", "mesh.context_parallel=all_gather")
    with pytest.raises(ValueError, match="attention_impl=pallas runs per shard and cannot split the "
                                         "sequence"):
        train_on_mesh(cfg, mesh_for(cfg, 2), packed_batches(cfg, 1))


def test_auto_picks_xla_off_gpu():
    import jax.numpy as jnp
    assert jax.default_backend() == "cpu"
    assert attend.resolve_impl("auto", jnp.bfloat16) == "xla"
    assert attend.resolve_impl("pallas", jnp.float32) == "pallas"
