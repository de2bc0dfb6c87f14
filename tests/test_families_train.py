"""Every family trains through the same step on every mesh: FSDP and FSDP+TP (and data x fsdp
when resuming) on 8 simulated devices give one device's initial parameters, gradients, losses and updates (the objective's own
batches: masked LM for BERT, span corruption for T5; DeepSeek's balancing bias rides in the train
state); a resumed run continues bit for bit; bad family settings are one clear error each."""
import jax
import numpy as np
import pytest

from helpers import family_config, mesh_for, packed_batches, train_on_mesh
from jaxlm.config import ConfigError, check_against_devices
from test_checkpoint import losses
from test_sharding import assert_same_training

FAMILIES = ["gpt2", "bert", "t5", "deepseek"]
STEPS = {"deepseek": 5}  # its loss first falls by step 4 (routing settles); an odd count, see below
# At these tiny widths the replicated biases and norms are a large share of the parameters (in
# gpt2-small, 0.1%), so the sufficiently-sharded guard gets more room here.
ROOM = "mesh.max_unsharded_fraction=0.5"
# No plain DP here: FSDP splits the batch the same way and shards the parameters too, and the
# resume test below runs data=4 x fsdp=2 (Llama's DP is in tests/test_sharding.py)
MESHES = {"fsdp": ["mesh.data=1", "mesh.fsdp=8", ROOM],
          # the vocab split over tensor, and the loss in chunks of positions (jaxlm/head_loss)
          "fsdp_tp": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "model.loss_chunks=2", ROOM]}


@pytest.fixture(scope="module")
def references():
    out = {}
    for family in FAMILIES:
        steps = STEPS.get(family, 3)
        cfg = family_config(family, f"train.steps={steps}")
        batches = packed_batches(cfg, steps)
        out[family] = batches, train_on_mesh(cfg, mesh_for(cfg, 1), batches)
    return out


# T5 and DeepSeek, the costliest to compile (~45 s of CI together on fsdp=8), run fsdp x tensor
# only: fsdp=4 x tensor=2 splits everything fsdp=8 does, plus the heads and the vocab.
GRID = ([(f, m) for f in FAMILIES for m in MESHES if (f, m) not in {("t5", "fsdp"),
                                                                    ("deepseek", "fsdp")}]
        + [("gpt2", "tp_sp")])
MESHES["tp_sp"] = ["--config=configs/mesh/tp_sp.yaml", ROOM]  # sequence parallel residual


@pytest.mark.parametrize("family,mesh", GRID)
def test_family_trains_like_one_device_on_a_mesh(references, family, mesh):
    batches, ref = references[family]
    files = [o.split("=", 1)[1] for o in MESHES[mesh] if o.startswith("--config=")]
    overrides = [o for o in MESHES[mesh] if not o.startswith("--config=")]
    cfg = family_config(family, f"train.steps={STEPS.get(family, 3)}", *overrides, files=files)
    got = train_on_mesh(cfg, mesh_for(cfg), batches)
    assert_same_training(ref, got)
    if family == "deepseek":  # the balancing bias moved, the same way on the mesh
        bias = jax.device_get(got.state["model_state"])
        jax.tree.map(np.testing.assert_allclose, jax.device_get(ref.state["model_state"]), bias)
        # every step moves every expert's bias by +-rate: after an odd number none is 0
        assert np.abs(jax.tree.leaves(bias)[0]).min() >= 0.01 - 1e-7


# GPT-2 resumes as Llama does (tests/test_checkpoint.py): a causal LM over packed text. These
# three carry more: BERT's masking and T5's spans are drawn per row (the data must resume
# exactly), and DeepSeek's balancing bias rides in the train state.
@pytest.mark.parametrize("family", ["bert", "t5", "deepseek"])
def test_family_resumes_bit_for_bit(family, tmp_path):
    from jaxlm.train import run
    # a constant lr keeps train.steps out of the program: the three runs compile it once
    # (the session's compilation cache, tests/conftest.py)
    common = ["mesh.data=4", "mesh.fsdp=2", "checkpoint.every_steps=2", ROOM,
              "optim.schedule=constant"]
    full = run(family_config(family, f"train.run_dir={tmp_path / 'full'}", "train.steps=4",
                             *common))
    run(family_config(family, f"train.run_dir={tmp_path / 'cut'}", "train.steps=2", *common))
    out = run(family_config(family, f"train.run_dir={tmp_path / 'cut'}", "train.steps=4",
                            *common))
    assert [losses(tmp_path / "cut")[s] for s in (3, 4)] == [
        losses(tmp_path / "full")[s] for s in (3, 4)]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(full["state"]),
                 jax.device_get(out["state"]))


@pytest.mark.parametrize("family,overrides,message", [
    ("gpt2", ["model.num_decoder_layers=2"],
     "unknown key 'model.num_decoder_layers' for model.family=gpt2; it belongs to "
     "model.family=t5"),
    ("gpt2", ["data.seq_len=64"], "data.seq_len=64 exceeds model.max_positions=32"),
    ("bert", ["model.num_heads=5"], "model.d_model=32 is not divisible by model.num_heads=5"),
    ("t5", ["model.attention_impl=pallas"],
     "model.attention_impl=pallas cannot add T5's relative position bias"),
    ("t5", ["model.num_kv_heads=2"], "unknown key 'model.num_kv_heads' for model.family=t5"),
    ("deepseek", ["model.num_dense_layers=3"],
     "model.num_dense_layers=3 leaves no MoE layer of model.num_layers=3"),
    ("deepseek", ["model.qk_rope_head_dim=5"], "model.qk_rope_head_dim=5 must be even"),
    ("deepseek", ["model.num_groups=3"], "model.num_groups=3 does not divide model.num_experts=4"),
    ("deepseek", ["model.groups_per_token=3"],
     "model.groups_per_token=3 exceeds model.num_groups=2"),
    ("deepseek", ["model.experts_per_token=3"],
     "model.num_groups=2: groups of 2 experts .* cannot hold model.experts_per_token=3 picks"),
])
def test_bad_family_config_is_one_clear_error(family, overrides, message):
    with pytest.raises(ConfigError, match=message):
        family_config(family, *overrides)


@pytest.mark.parametrize("family,mesh,message", [
    ("bert", ["mesh.data=4", "mesh.stage=2"], "mesh.stage=2: model.family=bert does not run on a "
                                              "pipeline"),
    ("t5", ["mesh.data=4", "mesh.stage=2"], "mesh.stage=2: model.family=t5 does not run on a "
                                            "pipeline"),
    ("deepseek", ["mesh.data=4", "mesh.stage=2"],
     "mesh.stage=2 with model.bias_update_rate=0.01: the pipeline schedules do not carry the "
     "balancing bias"),
    ("deepseek", ["mesh.data=4", "mesh.stage=2", "model.bias_update_rate=0"],
     "mesh.stage=2 with model.num_dense_layers=1: the dense first layers and the MoE layers are "
     "two stacks, and the pipeline splits one"),
    ("deepseek", ["mesh.data=1", "mesh.expert=8"], "model.num_experts=4 is not divisible by "
                                                   "mesh.expert=8"),
])
def test_family_refuses_a_mesh_it_cannot_run(family, mesh, message):
    with pytest.raises(ConfigError, match=message):
        check_against_devices(family_config(family, *mesh), 8)


def test_mla_rank_that_does_not_divide_its_mesh_axis_is_refused():
    from jaxlm.step import build_step_fns
    cfg = family_config("deepseek", "model.kv_lora_rank=6", "mesh.data=1", "mesh.fsdp=4",
                        "mesh.tensor=2")
    with pytest.raises(ConfigError, match=r"parameter dense_layers.attn.wkv_b with shape "
                                          r"\(1, 6, 4, 16\).*dimension 6 is not divisible by "
                                          r"mesh axes fsdp=4"):
        build_step_fns(cfg, mesh_for(cfg))


def test_gpt2_pipeline_trains_like_one_device(references):
    """The decoder-only families pipeline: GPT-2 on stage=2 (1F1B: the loss inside the last
    stage, the learned positions in the embedding outside the stages)."""
    batches, ref = references["gpt2"]
    cfg = family_config("gpt2", "train.steps=3", "mesh.data=4", "mesh.stage=2",
                        "pipeline.schedule=1f1b", "pipeline.microbatches=2",
                        "mesh.max_unsharded_fraction=8.0")
    assert_same_training(ref, train_on_mesh(cfg, mesh_for(cfg), batches))
