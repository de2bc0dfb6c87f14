"""jaxlm's `attention_impl: pallas` path: the model trains like the xla reference with the Pallas
kernel (CPU interpret mode here), on one device, per shard on a mesh (shard_map over batch and
heads) and per block with the sequence split (context parallelism)."""
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


@pytest.mark.parametrize("mode", ["ring", "all_gather"])
def test_pallas_trains_with_the_sequence_split(reference, mode):
    """mesh.sequence=2 (x fsdp 2): every attention block goes through the kernel, K/V passed
    around a ring (zig-zag rows) or all-gathered (natural order); packed documents included."""
    batches, ref = reference
    cfg = tiny_config(*HD64, "model.attention_impl=pallas", "mesh.data=1", "mesh.fsdp=2",
                      "mesh.sequence=2", f"mesh.context_parallel={mode}")
    assert_same_training(ref, train_on_mesh(cfg, mesh_for(cfg, 4), batches))


def test_auto_picks_xla_off_gpu():
    import jax.numpy as jnp
    assert jax.default_backend() == "cpu"
    assert attend.resolve_impl("auto", jnp.bfloat16) == "xla"
    assert attend.resolve_impl("pallas", jnp.float32) == "pallas"
