"""Ring attention (jaxlm/parallel/ring.py) against the plain reference `attend` on one device:
outputs and gradients of q, k and v on 8 simulated devices (sequence=8, and sequence=2 x fsdp=2
x tensor=2), causal with packed documents whose positions restart, padding, GQA, a sliding
window and bidirectional; the same rows laid out in zig-zag order give the same results; the
zig-zag layout evens out causal work and is the order the training steps read rows in; what
ring attention cannot serve is refused in one line. Training with it (rows in zig-zag order)
equals one device in tests/test_sharding.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import check_against_devices, load_config
from jaxlm.config_fields import ConfigError
from jaxlm.config_schema import DEFAULT_RULES
from jaxlm.nn.attend import MaskSpec, attend
from jaxlm.parallel.ring import zigzag_order
from jaxlm.parallel.sharding import make_mesh, use_rules

B, S, H, G, K = 2, 32, 4, 2, 8
MESHES = {"sequence8": dict(sequence=8), "sequence2_fsdp2_tensor2": dict(sequence=2, fsdp=2,
                                                                          tensor=2)}
MASKS = {"causal": dict(causal=True), "window": dict(causal=True, sliding_window=5),
         "bidirectional": dict(causal=False)}


def rows():
    """Row 0: two packed documents (positions restart at the second); row 1: one document,
    then padding (segment 0)."""
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.normal(size=s), jnp.float32)
                  for s in ((B, S, H, K), (B, S, G, K), (B, S, G, K), (B, S, H, K)))
    seg = np.ones((B, S), np.int32)
    seg[0, 11:], seg[1, 25:] = 2, 0
    pos = np.stack([np.r_[np.arange(11), np.arange(S - 11)], np.arange(S)]).astype(np.int32)
    return q, k, v, w, jnp.asarray(seg), jnp.asarray(pos)


def attention(q, k, v, seg, pos, mask_kw, mesh=None, impl="xla", mode="ring"):
    mask = MaskSpec(q_segment_ids=seg, positions=pos, **mask_kw)
    if mesh is None:
        return attend(q, k, v, mask)[0]
    with use_rules(mesh, DEFAULT_RULES, mode):
        return attend(q, k, v, mask, impl=impl)[0]


def value_and_grads(mesh, mask_kw, order=None, impl="xla", segments=True, mode="ring"):
    q, k, v, w, seg, pos = rows()
    if not segments:  # one document per row, no padding
        seg, pos = None, jnp.broadcast_to(jnp.arange(S), (B, S))
    if order is not None:  # every row laid out in that order (positions travel with tokens)
        q, k, v, w, pos = (x[:, order] for x in (q, k, v, w, pos))
        seg = None if seg is None else seg[:, order]

    def loss(q, k, v):
        out = attention(q, k, v, seg, pos, mask_kw, mesh, impl, mode)
        return jnp.sum(out * w), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x) for x in (out, *grads)]


@pytest.fixture(scope="module")
def references():
    return {name: value_and_grads(None, kw) for name, kw in MASKS.items()}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ring_equals_one_device(references, mesh_name, mask):
    sizes = dict(data=1, stage=1, fsdp=1, sequence=1, expert=1, tensor=1) | MESHES[mesh_name]
    got = value_and_grads(make_mesh(sizes), MASKS[mask])
    for name, a, b in zip(("out", "dq", "dk", "dv"), references[mask], got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


def test_zigzag_layout_gives_the_same_attention(references):
    """Rows permuted into zig-zag order over sequence=8: un-permuted, the outputs and
    gradients are the natural-order reference's (the masks follow positions, not indices)."""
    order = np.asarray(zigzag_order(S, 8))
    sizes = dict(data=1, stage=1, fsdp=1, sequence=8, expert=1, tensor=1)
    got = value_and_grads(make_mesh(sizes), MASKS["causal"], order)
    back = np.argsort(order)
    for name, a, b in zip(("out", "dq", "dk", "dv"), references["causal"], got):
        np.testing.assert_allclose(b[:, back], a, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ring_of_flash_kernel_blocks_equals_one_device(references, mesh_name, mask):
    """impl=pallas: every block through the flash kernel (interpret mode here), the causal
    ones as the zig-zag layout's chunk pairs; packed documents, padding and GQA as above."""
    sizes = dict(data=1, stage=1, fsdp=1, sequence=1, expert=1, tensor=1) | MESHES[mesh_name]
    order = np.asarray(zigzag_order(S, sizes["sequence"]))
    got = value_and_grads(make_mesh(sizes), MASKS[mask], order, impl="pallas")
    back = np.argsort(order)
    for name, a, b in zip(("out", "dq", "dk", "dv"), references[mask], got):
        np.testing.assert_allclose(b[:, back], a, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_all_gather_of_flash_kernel_blocks_equals_one_device(references, mask):
    """mesh.context_parallel=all_gather with impl=pallas: K/V gathered whole, rows in natural
    order, each key block through the kernel (full, causal or skipped by device)."""
    sizes = dict(data=1, stage=1, fsdp=1, sequence=4, expert=1, tensor=2)
    got = value_and_grads(make_mesh(sizes), MASKS[mask], impl="pallas", mode="all_gather")
    for name, a, b in zip(("out", "dq", "dk", "dv"), references[mask], got):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("mode", ["ring", "all_gather"])
def test_flash_kernel_blocks_in_bfloat16(references, mode):
    """bf16 inputs (as on a GPU): the blocks' results merge in float32 and come out in bf16."""
    q, k, v, _, seg, pos = rows()
    sizes = dict(data=1, stage=1, fsdp=2, sequence=2, expert=1, tensor=2)
    order = np.asarray(zigzag_order(S, 2)) if mode == "ring" else np.arange(S)
    q, k, v, seg, pos = (x[:, order] for x in (q, k, v, seg, pos))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = jax.jit(lambda q, k, v: attention(q, k, v, seg, pos, MASKS["causal"], make_mesh(sizes),
                                            "pallas", mode))(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32)[:, np.argsort(order)],
                               references["causal"][0], atol=3e-2, rtol=3e-2)


def test_ring_of_flash_kernel_blocks_without_segment_ids():
    """Rows without segment ids take the kernel's unmasked path for the blocks they see whole."""
    sizes = dict(data=1, stage=1, fsdp=1, sequence=4, expert=1, tensor=2)
    order = np.asarray(zigzag_order(S, 4))
    want = value_and_grads(None, MASKS["causal"], segments=False)
    got = value_and_grads(make_mesh(sizes), MASKS["causal"], order, "pallas", segments=False)
    for name, a, b in zip(("out", "dq", "dk", "dv"), want, got):
        np.testing.assert_allclose(b[:, np.argsort(order)], a, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("seq_len,devices", [(32, 8), (4096, 4), (96, 2)])
def test_zigzag_order_round_trips_and_evens_causal_work(seq_len, devices):
    order = np.asarray(zigzag_order(seq_len, devices))
    assert sorted(order.tolist()) == list(range(seq_len))  # a permutation: it round-trips
    per_device = order.reshape(devices, -1)
    block = seq_len // (2 * devices)
    # causal work of a device: (query, key) pairs it computes = sum over its queries of pos + 1
    work = (per_device + 1).sum(axis=1)
    assert work.max() - work.min() <= block, work
    contiguous = (np.arange(seq_len).reshape(devices, -1) + 1).sum(axis=1)
    assert contiguous.max() - contiguous.min() > block  # what the zig-zag order fixes
    with pytest.raises(ValueError, match="2 x 8 chunks: 40 tokens do not divide"):
        zigzag_order(40, 8)


@pytest.mark.parametrize("extra,message", [
    (["mesh.stage=2", "mesh.sequence=2", "mesh.data=2"],
     "mesh.sequence=2 with mesh.context_parallel=ring: pipeline stages"),
    (["model.family=t5", "model.head_dim=8", "mesh.sequence=2", "mesh.data=4"],
     "model.family=t5 adds a relative position bias"),
    (["mesh.sequence=8", "mesh.data=1", "data.seq_len=24"],
     r"data.seq_len=24 must divide into 2 x 8 chunks"),
])
def test_what_ring_cannot_serve_is_refused(extra, message):
    cfg = load_config(None, ["data.seq_len=32", "train.global_batch_size=8"] + extra)
    with pytest.raises(ConfigError, match=message):
        check_against_devices(cfg, 8)
    all_gather = load_config(None, ["data.seq_len=32", "train.global_batch_size=8",
                                    "mesh.context_parallel=all_gather"] + extra)
    check_against_devices(all_gather, 8)  # the other mode serves it


def test_ring_refuses_what_it_cannot_compute():
    """Inside a ring step, attention without positions (or with a bias, or cross-attention)
    gets one line, not a wrong mask."""
    q, k, v, _, seg, _ = rows()
    mesh = make_mesh(dict(data=1, stage=1, fsdp=1, sequence=8, expert=1, tensor=1))
    with use_rules(mesh, DEFAULT_RULES, "ring"), pytest.raises(
            ValueError, match="ring attention .* runs self-attention without a logit bias"):
        attend(q, k, v, MaskSpec(q_segment_ids=seg))


def test_steps_read_rows_in_zigzag_order_under_ring_only():
    from helpers import mesh_for, tiny_config
    from jaxlm.step import build_step_fns
    ring = tiny_config("mesh.data=1", "mesh.sequence=8")
    fns = build_step_fns(ring, mesh_for(ring))
    np.testing.assert_array_equal(fns.token_order, zigzag_order(32, 8))
    batch = {"inputs": np.arange(64).reshape(2, 32), "other": np.zeros((2, 5))}
    laid = fns.lay_out(batch)
    np.testing.assert_array_equal(laid["inputs"][:, np.argsort(fns.token_order)],
                                  batch["inputs"])
    assert laid["other"] is batch["other"]  # not a per-token field of this length
    gather = tiny_config("mesh.data=1", "mesh.sequence=8", "mesh.context_parallel=all_gather")
    assert build_step_fns(gather, mesh_for(gather)).token_order is None
