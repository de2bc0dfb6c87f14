"""Pipeline parallelism (jaxlm/pipeline.py) never changes the math and keeps its promises: each
schedule trains like one device, the schedule tables have exactly the bubble of the formulas,
1F1B's activation memory does not grow with the number of microbatches (GPipe's does), and bad
pipeline configs fail in one clear line."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.parallel import pipeline
from jaxlm.config import MESH_AXES, ConfigError, check_against_devices
from jaxlm.parallel.sharding import make_mesh
from jaxlm.step import build_step_fns
from helpers import mesh_for, packed_batches, tiny_config, train_on_mesh
from test_sharding import assert_same_training

# 8 layers so stage=8 and stage=4 x virtual_stages=2 divide; 16 rows so each mesh gets 4
# microbatches of rows that divide its data-parallel size (stage=8: 8, circular wants a multiple
# of the stages), and 1f1b on stage=2 wraps its ring of 2S-1 = 3 stashed inputs. Embedding and
# head replicate over `stage` by design (guard relaxed).
BASE = ["model.num_layers=8", "train.global_batch_size=16", "mesh.max_unsharded_fraction=8.0"]
M4 = "pipeline.microbatches=4"
MESHES = {"stage2": ["mesh.data=4", "mesh.stage=2", M4],
          "stage4": ["mesh.data=2", "mesh.stage=4", M4],
          "stage8": ["mesh.data=1", "mesh.stage=8", "pipeline.microbatches=8"],
          # also the head's loss in chunks (jaxlm/head_loss), inside 1F1B's last stage too
          "stage2_data2_tensor2": ["mesh.data=2", "mesh.stage=2", "mesh.tensor=2", M4,
                                   "model.loss_chunks=4"],
          "stage2_fsdp2_data2": ["mesh.data=2", "mesh.stage=2", "mesh.fsdp=2", M4]}
SCHEDULES = {"gpipe": [], "circular": ["pipeline.virtual_stages=2"], "1f1b": []}
# Each schedule on two meshes and each mesh at least once, not the whole grid (its other 8 cells
# ran the same code paths and cost CI ~80 s). FSDP inside 1F1B's hand-written backward is the
# one extra cell, marked slow (`-m "not slow"` is the quick loop).
CELLS = [("stage2", "gpipe"), ("stage4", "circular"), ("stage8", "1f1b"),
         ("stage2_data2_tensor2", "1f1b"), ("stage2_data2_tensor2", "gpipe"),
         ("stage2_fsdp2_data2", "circular")]
GRID = ([pytest.param(m, s, id=f"{m}-{s}") for m, s in CELLS]
        + [pytest.param("stage2_fsdp2_data2", "1f1b", id="stage2_fsdp2_data2-1f1b",
                        marks=pytest.mark.slow)])


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config(*BASE)
    batches = packed_batches(cfg, 3)
    ref = train_on_mesh(cfg, mesh_for(cfg, 1), batches)
    return batches, ref, _eval(cfg, mesh_for(cfg, 1), ref.state, batches[0])


def _eval(cfg, mesh, state, batch):
    fns = build_step_fns(cfg, mesh)
    return jax.device_get(fns.eval_step(state, jax.device_put(batch, fns.batch_sharding)))


@pytest.mark.parametrize("name,schedule", GRID)
def test_pipeline_matches_single_device(reference, name, schedule):
    """Same init, gradients, 3 losses and updated params as the 1-device non-pipelined run; for
    1f1b also the same eval NLL after training (its gradient-free forward is another code path;
    the other schedules' eval is the forward their losses already checked)."""
    batches, ref, ref_eval = reference
    cfg = tiny_config(*BASE, *MESHES[name], f"pipeline.schedule={schedule}", *SCHEDULES[schedule])
    mesh = mesh_for(cfg)
    got = train_on_mesh(cfg, mesh, batches)
    assert_same_training(ref, got)
    if schedule == "1f1b":
        np.testing.assert_allclose(_eval(cfg, mesh, got.state, batches[0]), ref_eval,
                                   rtol=2e-5)


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("circular", 2), ("circular", 4),
                                              ("1f1b", 1)])
@pytest.mark.parametrize("stages,microbatches", [(2, 4), (4, 4), (4, 8), (8, 16)])
def test_schedule_is_complete_ordered_and_has_the_formula_bubble(schedule, virtual, stages,
                                                                 microbatches):
    S, M, V = stages, microbatches, virtual
    table = pipeline.schedule_table(schedule, S, M, V)
    done = {}  # (kind, microbatch, virtual stage, stage) -> tick
    for t, row in enumerate(table):
        for s, cell in enumerate(row):
            assert len({k for k, _, _ in cell}) == len(cell)  # at most one F and one B a tick
            for kind, i, v in cell:
                assert (kind, i, v, s) not in done
                done[(kind, i, v, s)] = t
    for i in range(M):
        for v in range(V):
            for s in range(S):  # every unit of work once, after its input was produced
                t = done[("F", i, v, s)]
                prev = (("F", i, v, s - 1) if s else ("F", i, v - 1, S - 1) if v else None)
                assert prev is None or done[prev] < t
                if schedule == "1f1b":
                    after = done[("B", i, v, s + 1)] if s < S - 1 else done[("F", i, v, s)] - 1
                    assert done[("B", i, v, s)] > after
    assert pipeline.bubble_fraction(table) == pytest.approx(
        pipeline.bubble_formula(schedule, S, M, V), abs=1e-12)
    if schedule == "gpipe":
        assert pipeline.bubble_fraction(table) == pytest.approx((S - 1) / (M + S - 1))
    if schedule == "circular":
        gpipe = pipeline.bubble_fraction(pipeline.schedule_table("gpipe", S, M))
        assert pipeline.bubble_fraction(table) < gpipe


def _wide_layer(w, h_BxSxD, _):  # -> (h, aux terms: none)
    return h_BxSxD + jnp.tanh(h_BxSxD @ w["a"]) @ w["b"], {}


def _square_tail(w_DxO, h_BxSxD, y_BxSxO):
    return jnp.sum((h_BxSxD @ w_DxO - y_BxSxO) ** 2)


def test_1f1b_activation_memory_does_not_grow_with_microbatches():
    """Compiled temp bytes per device of loss+grads at fixed microbatch size, M = 4, 8, 16, on a
    stack of layers whose hidden activation F is 32x the residual D. GPipe keeps every
    microbatch's hidden activations until the backward: it grows by >= L/S hidden buffers per
    microbatch. 1F1B grows only by the input-gradient rows (the batch itself: 1 residual buffer
    per microbatch, < 2 with slack), and gives the same gradients as plain autodiff."""
    S, L, Bm, T, D, F = 2, 4, 4, 8, 16, 512
    mesh = make_mesh({**{a: 1 for a in MESH_AXES}, "stage": S}, jax.devices()[:S])
    k = jax.random.split(jax.random.key(0), 4)
    w = {"a": jax.random.normal(k[0], (L, D, F)) * .1, "b": jax.random.normal(k[1], (L, F, D)) * .1}
    w_out = jax.random.normal(k[2], (D, 3))
    residual_bytes, hidden_bytes = Bm * T * D * 4, Bm * T * F * 4
    temp = {}
    for schedule in ("gpipe", "1f1b"):
        for M in (4, 8, 16):
            x = jax.random.normal(k[3], (M * Bm, T, D))
            y, pos = jnp.ones((M * Bm, T, 3)), jnp.zeros((M * Bm, T), jnp.int32)
            plan = pipeline.Plan.of(mesh, types.SimpleNamespace(
                schedule=schedule, microbatches=M, virtual_stages=1))

            def loss(w, w_out, x):
                if schedule == "1f1b":
                    return pipeline.one_f_one_b_loss(plan, _wide_layer, _square_tail, w, w_out, x,
                                                     (pos,), (y,))
                return _square_tail(w_out, pipeline.run_stack(plan, _wide_layer, w, x, pos)[0], y)

            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(w, w_out, x).compile()
            temp[schedule, M] = compiled.memory_analysis().temp_size_in_bytes
            if M == 4:
                def plain(w, w_out, x):
                    h = jax.lax.scan(lambda h, wl: (_wide_layer(wl, h, None)[0], None), x, w)[0]
                    return _square_tail(w_out, h, y)
                want = jax.grad(plain, argnums=(0, 1, 2))(w, w_out, x)
                # float32 sums in another order: errors scale with the largest terms (x's
                # gradient reaches ~900, and CI saw 2e-4 on an element of 0.07)
                jax.tree.map(lambda a, b: np.testing.assert_allclose(
                    a, b, rtol=1e-4, atol=1e-6 * float(np.abs(a).max())), want,
                    compiled(w, w_out, x))
    for schedule, per_microbatch_ok in (("1f1b", lambda g: g < 2 * residual_bytes),
                                        ("gpipe", lambda g: g >= L // S * hidden_bytes)):
        growth = [(temp[schedule, b] - temp[schedule, a]) / (b - a) for a, b in ((4, 8), (8, 16))]
        assert all(per_microbatch_ok(g) for g in growth), (schedule, temp)
    assert temp["1f1b", 16] < temp["gpipe", 4]


def test_1f1b_refuses_layers_with_aux_terms():
    """The config refuses MoE on 1f1b; a layer that returns aux terms anyway (a family that
    forgot has_aux_losses) is one error at trace time, not terms silently dropped."""
    mesh = make_mesh({**{a: 1 for a in MESH_AXES}, "stage": 2}, jax.devices()[:2])
    plan = pipeline.Plan.of(mesh, types.SimpleNamespace(schedule="1f1b", microbatches=2,
                                                        virtual_stages=1))

    def layer(w, h, inputs):
        return _wide_layer(w, h, inputs)[0], {"losses": {"balance": jnp.sum(h)}}

    w = {"a": jnp.zeros((2, 4, 8)), "b": jnp.zeros((2, 8, 4))}
    x, y, pos = jnp.ones((4, 2, 4)), jnp.ones((4, 2, 3)), jnp.zeros((4, 2), jnp.int32)

    def loss(w, x):
        return pipeline.one_f_one_b_loss(plan, layer, _square_tail, w, jnp.ones((4, 3)), x,
                                         (pos,), (y,))
    with pytest.raises(ValueError, match="the 1f1b schedule does not carry the layers' aux"):
        jax.eval_shape(jax.grad(loss), w, x)


def test_moe_pipeline_matches_one_device_accumulating_as_many_microbatches():
    """MoE on GPipe with expert parallelism inside each stage (tests/test_moe.py's tiny Mixtral: a
    unit is a dense and an MoE layer; 2 units here, one per stage). The balancing losses and load
    stats are per microbatch, so one device matches the pipeline when it accumulates as many
    microbatches (the same strided rows). Circular runs the same stage code (run_stack)."""
    from test_moe import MOE, assert_same
    small = [*BASE, *MOE, "model.num_layers=4"]
    cfg = tiny_config(*small, "train.microbatches=4")
    batches = packed_batches(cfg, 3)
    ref = train_on_mesh(cfg, mesh_for(cfg, 1), batches)
    piped = tiny_config(*small, "mesh.data=2", "mesh.expert=2", "mesh.stage=2", M4)
    assert_same(ref, train_on_mesh(piped, mesh_for(piped), batches))


@pytest.mark.parametrize("overrides,message", [
    (["mesh.stage=4", "model.num_layers=6"],
     r"model.num_layers=6 is not divisible by mesh.stage=4 = 4 layer groups"),
    (["mesh.stage=2", "pipeline.schedule=circular", "pipeline.virtual_stages=2",
      "pipeline.microbatches=2", "model.num_layers=6"],
     r"model.num_layers=6 is not divisible by mesh.stage=2 x pipeline.virtual_stages=2 = 4"),
    (["pipeline.microbatches=3"],
     r"train.global_batch_size=16 / train.microbatches=1 = 16 rows, not divisible by "
     r"pipeline.microbatches=3"),
    (["train.microbatches=2", "pipeline.microbatches=16"],
     r"train.global_batch_size=16 / train.microbatches=2 = 8 rows, not divisible by "
     r"pipeline.microbatches=16"),
    (["mesh.stage=2", "model.scan_layers=false"],
     r"mesh.stage=2 needs model.scan_layers=true"),
    (["mesh.data=1", "mesh.stage=-1", "model.scan_layers=false"],
     r"mesh.stage=8 needs model.scan_layers=true"),
    (["pipeline.virtual_stages=2"], r"pipeline.virtual_stages=2 needs pipeline.schedule=circular"),
    (["mesh.stage=4", "pipeline.schedule=circular", "pipeline.virtual_stages=2",
      "pipeline.microbatches=2"],
     r"pipeline.schedule=circular needs pipeline.microbatches=2 to be a multiple of mesh.stage=4"),
    (["mesh.data=4", "mesh.stage=2", "pipeline.microbatches=8"],
     r"2 rows per pipeline microbatch .* not divisible by the data-parallel size "
     r"data\*fsdp\*expert=4"),
    (["mesh.stage=2", "model.family=mixtral", "model.num_experts=4", "pipeline.schedule=1f1b"],
     r"pipeline.schedule=1f1b with model.family=mixtral: 1F1B's hand-written backward does not "
     r"carry the MoE layers' aux losses; use pipeline.schedule=gpipe or circular"),
    (["mesh.stage=2", "model.family=mixtral", "model.bias_update_rate=0.01"],
     r"mesh.stage=2 with model.bias_update_rate=0.01: the pipeline schedules do not carry the "
     r"balancing bias"),
])
def test_bad_pipeline_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_against_devices(tiny_config(*BASE, *overrides), 8)
