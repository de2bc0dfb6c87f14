"""Small shared builders for the tests: a tiny config, fixed packed batches, and a short training
run on a mesh (what every "this mesh trains like one device" test compares)."""
import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from jaxlm.config import MESH_AXES, check_against_devices, load_config
from jaxlm.data import ByteTokenizer, pack_documents
from jaxlm.data.transforms import objective_transform
from jaxlm.parallel.sharding import make_mesh
from jaxlm.step import build_step_fns, make_loss_fn

TINY = ["model.vocab_size=300", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_dim=64", "data.seq_len=32", "data.max_bytes=100000",
        "train.global_batch_size=8", "optim.warmup_steps=2", "optim.lr=0.01", "train.steps=6",
        "log.progress=false", "log.tensorboard=false", "log.every_steps=1", "train.eval_every=0",
        "train.eval_batches=1", "checkpoint.every_steps=3", "checkpoint.async_save=false"]


# Each family's tiny model keys (TINY's are Llama's), for the tests every family runs.
FAMILY_TINY = {
    "llama": [],
    "gpt2": ["model.family=gpt2", "model.max_positions=32"],
    "bert": ["model.family=bert", "model.ffn_dim=64", "model.max_positions=32"],
    "t5": ["model.family=t5", "model.head_dim=8", "model.ffn_dim=64", "model.relative_buckets=8",
           "model.relative_max_distance=16"],
    "deepseek": ["model.family=deepseek", "model.q_lora_rank=16", "model.kv_lora_rank=16",
                 "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8",
                 "model.ffn_dim=64", "model.num_layers=3", "model.num_dense_layers=1",
                 "model.num_experts=4", "model.experts_per_token=2", "model.expert_ffn_dim=16",
                 "model.num_groups=2", "model.groups_per_token=1", "model.routed_scale=2.0",
                 "model.bias_update_rate=0.01"],
}
LLAMA_ONLY = ("model.num_kv_heads=", "model.ffn_dim=")


def tiny_config(*overrides):
    return load_config(None, TINY + list(overrides))


def family_config(family, *overrides, files=()):
    """TINY for any family: the shared sizes, the family's own keys (after `files`: presets)."""
    base = [o for o in TINY if family == "llama" or not o.startswith(LLAMA_ONLY)]
    return load_config(list(files), base + FAMILY_TINY[family] + list(overrides))


def packed_batches(cfg, n, seed=0):
    """n global batches of real packed text with several documents per row, as the config's
    objective reads them (masked, or span-corrupted into encoder and decoder sides)."""
    rng = np.random.default_rng(seed)
    docs = [bytes(rng.integers(32, 127, rng.integers(5, 40)).astype(np.uint8)) for _ in range(400)]
    ds = pack_documents(docs, ByteTokenizer(), cfg.data.seq_len)
    ds = objective_transform(cfg.data, cfg.model.objective, ByteTokenizer(),
                             cfg.model.vocab_size).apply(ds, split=0, source=0)
    B = cfg.train.global_batch_size
    return [ds.get(np.arange(i * B, (i + 1) * B)) for i in range(n)]


class Run(NamedTuple):
    """What one short training run on a mesh produced, for comparing meshes with one device."""
    init_params: dict   # on the host
    grads: dict         # of the first batch's summed NLL at init (as the mesh runs it), on the host
    metrics: list       # each step's metrics dict, on the host
    params: dict        # after the last step, on the host
    state: dict         # the final train state, still sharded on the mesh


def mesh_for(cfg, devices=8):
    """One device (every axis 1), or the config's mesh over the first `devices` devices."""
    if devices == 1:
        return make_mesh({a: 1 for a in MESH_AXES}, jax.devices()[:1])
    return make_mesh(check_against_devices(cfg, devices), jax.devices()[:devices],
                     dcn_sizes=dataclasses.asdict(cfg.mesh.dcn))


def train_on_mesh(cfg, mesh, batches) -> Run:
    fns = build_step_fns(cfg, mesh)
    state = fns.init(cfg.train.seed)
    init_params = jax.device_get(state["params"])
    put = lambda b: jax.device_put(fns.lay_out(b), fns.batch_sharding)  # noqa: E731

    loss_fn = make_loss_fn(cfg, mesh, fns.graphdef)

    def grad_fn(params, model_state, batch):
        return jax.grad(lambda p: loss_fn(p, batch, model_state)[0].nll_sum)(params)

    grads = jax.device_get(jax.jit(grad_fn)(state["params"], state.get("model_state"),
                                            put(batches[0])))
    metrics = []
    for b in batches:
        state, m = fns.train_step(state, put(b))
        metrics.append(jax.device_get(m))
    return Run(init_params, grads, metrics, jax.device_get(state["params"]), state)
