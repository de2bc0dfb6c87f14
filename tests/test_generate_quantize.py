"""int8 weight-only quantisation (jaxlm/generate/quantize.py): the matmul weights really are int8
in the LM's state (norms, the token table and routers are not), each dequantised weight is
within half a step of the original, and quantised logits stay close to the full ones, through
a no-cache forward and the cached decode. The dense layers' matmuls (param.project) multiply by
the int8 values and scale the product: the same numbers as the dequantised weight's matmul.
The held-out perplexity change of a trained model is measured by benchmarks/quantize_ppl.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.generate.engine import Engine, Request
from jaxlm.generate.lm import LM
from jaxlm.generate.quantize import Int8Weight, input_axes, quantize_int8, weight_bytes
from jaxlm.nn.param import InputsLast, project
from tests.test_generate import GREEDY, PROMPTS, decode_logits, full_forward, tiny_lm


def flat(state):
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, (Int8Weight, InputsLast)))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in leaves}


@pytest.mark.parametrize("subscripts,x_shape,w_shape,axes", [
    ("bsd,dhk->bshk", (2, 3, 8), (8, 4, 5), (0,)),       # query / key / value
    ("bshk,hkd->bsd", (2, 3, 4, 5), (4, 5, 8), (0, 1)),  # output projection
    ("bsf,fd->bsd", (2, 3, 16), (16, 8), (0,)),          # MLP, head
])
def test_project_scales_the_int8_product_like_the_dequantised_weight(subscripts, x_shape,
                                                                     w_shape, axes):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    qw = quantize_int8(jnp.asarray(rng.normal(size=w_shape), jnp.float32), axes)
    want = np.einsum(subscripts, np.asarray(x, np.float64), np.asarray(qw[...], np.float64))
    got = project(subscripts, x, nnx.Param(qw), jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_input_axes_follow_logical_names():
    assert input_axes(("layers", "embed", "heads", "head_dim")) == (1,)
    assert input_axes(("layers", "heads", "head_dim", "embed")) == (1, 2)
    assert input_axes(("layers", "expert", "mlp", "embed")) == (2,)
    assert input_axes(("layers", "lora", "heads", "head_dim")) == (1,)
    assert input_axes(("embed", "vocab")) == (0,)
    assert input_axes(("layers", "norm")) is None and input_axes(("layers", "embed", None)) is None


def test_int8_weights_and_logits():
    """Mixtral: dense and MoE blocks (experts quantised, the router not) in one model."""
    model, lm = tiny_lm("mixtral")
    q = LM.of(lm.cfg, lm.state, quantize="int8")
    full, quant = flat(lm.state), flat(q.state)
    int8 = {k for k, v in quant.items() if isinstance(v, Int8Weight)}
    want = {"head", "attn/wq", "attn/wk", "attn/wv", "attn/wo", "w_up", "w_down", "w_gate"}
    assert {w for w in want if any(k.endswith(w) for k in int8)} == want
    assert any(k.endswith("moe/w_up") for k in int8)
    assert not any(k.endswith("router") for k in int8)
    assert not any(k.endswith("scale") or k == "embed" for k in int8)
    E, D, H, K, F = 4, 32, 4, 8, 16  # experts, d, heads, head dim, expert ffn
    # one scale per output channel of each layer (and expert); the units (a dense and an MoE
    # block each) are a list as decoding runs them
    assert quant["layers/1/blocks/0/attn/wq"].scale.shape == (1, H, K)
    assert quant["layers/1/blocks/0/attn/wo"].scale.shape == (1, 1, D)
    assert quant["layers/1/blocks/1/moe/w_up"].scale.shape == (E, 1, F)
    assert quant["layers/1/blocks/1/moe/w_down"].scale.shape == (E, 1, D)
    for k in int8:
        w, qw = np.asarray(full[k], np.float32), quant[k]
        assert qw.q.dtype == np.int8 and qw.q.shape == w.shape and qw.scale.dtype == np.float32
        # symmetric rounding: every element within half a step of its channel's scale
        assert (np.abs(np.asarray(qw[...]) - w) <= np.asarray(qw.scale) / 2 + 1e-7).all()
    assert weight_bytes(q.state) < 0.4 * weight_bytes(lm.state)
    # logits: random weights (std 0.3) give logits of std ~ 3-10; int8 moves them by < 2% of
    # their spread and keeps the argmax of almost every position
    seqs = [p + [1, 2, 3] for p in PROMPTS]
    ref, got = full_forward(lm, seqs), full_forward(q, seqs)
    assert np.abs(got - ref).max() < 0.02 * (ref.max() - ref.min())
    assert (np.argmax(got, -1) == np.argmax(ref, -1)).mean() >= 0.9
    # the cached decode reads the same int8 weights: its logits equal the int8 full forward
    dec = decode_logits(Engine(q), [Request(p, GREEDY) for p in PROMPTS], 3)
    seqs = [p + t.tolist() for p, (_, t) in zip(PROMPTS, dec)]
    ref_q = full_forward(q, seqs)
    for b, (p, (logits_NxV, _)) in enumerate(zip(PROMPTS, dec)):
        np.testing.assert_allclose(logits_NxV, ref_q[b, len(p) - 1:len(p) + 2], rtol=2e-4,
                                   atol=2e-4)


@pytest.mark.parametrize("inputs_last", [False, True])
def test_int8_on_a_mesh_keeps_the_weights_layout(inputs_last):
    """data=2 x tensor=2: int8 values and scales keep the full weights' sharding (heads on
    tensor; laid out inputs last, the heads axis moves first) and decoding gives one device's
    int8 tokens and logits."""
    from jaxlm.config_schema import MESH_AXES
    from jaxlm.generate.load import mesh_of
    _, lm = tiny_lm("llama-gqa")
    one = LM.of(lm.cfg, lm.state, quantize="int8", inputs_last=inputs_last)
    sizes = dict.fromkeys(MESH_AXES, 1) | {"data": 2, "tensor": 2}
    four = LM.of(lm.cfg, lm.state, mesh=mesh_of(sizes), quantize="int8",
                 inputs_last=inputs_last)
    wq = four.state["layers"][1]["attn"]["wq"]  # [embed, heads, head_dim]
    if inputs_last:  # [heads, head_dim, embed]
        assert wq.v.sharding.spec[0] == "tensor" and wq.scale.sharding.spec[0] == "tensor"
    else:
        assert wq.q.sharding.spec[1] == "tensor" and wq.scale.sharding.spec[1] == "tensor"
    reqs = [Request(p, GREEDY) for p in PROMPTS] + [Request([7], GREEDY)]
    for (l1, t1), (l4, t4) in zip(decode_logits(Engine(one), reqs, 3),
                                  decode_logits(Engine(four), reqs, 3)):
        np.testing.assert_allclose(l1, l4, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(t1, t4)


def test_bf16_model_decodes_from_bf16_matmul_weights_with_the_same_logits():
    """A run trains float32 master weights for a bf16 model; the LM holds its matmul weights
    (experts too) in bf16, as every use casts them anyway, so a decode step reads half the
    bytes. Norms, the router and the token table stay float32 (some are read in float32), and
    the logits are the trained model's own, bit for bit."""
    model, lm = tiny_lm("mixtral", extra=["model.dtype=bfloat16"])
    state = flat(lm.state)
    assert state["layers/0/blocks/0/attn/wq"].dtype == jnp.bfloat16
    assert state["layers/1/blocks/1/moe/w_up"].dtype == jnp.bfloat16
    assert state["head"].dtype == jnp.bfloat16
    kept = [k for k in state if k.endswith(("scale", "router")) or k == "embed"]
    assert kept and all(state[k].dtype == jnp.float32 for k in kept)
    from jaxlm.generate.lm import unstack_layers  # the LM's layout, float32 weights
    _, stored = unstack_layers(model.cfg, nnx.to_pure_dict(nnx.state(model)))
    assert flat(stored)["layers/0/blocks/0/attn/wq"].dtype == jnp.float32
    seqs = [p + [1, 2, 3] for p in PROMPTS]
    np.testing.assert_array_equal(full_forward(lm, seqs),
                                  full_forward(dataclasses.replace(lm, state=stored), seqs))


@pytest.mark.parametrize("subscripts,x_shape,w_shape,axes", [
    ("bsd,dhk->bshk", (2, 3, 8), (8, 4, 5), (0,)),       # query / key / value
    ("bshk,hkd->bsd", (2, 3, 4, 5), (4, 5, 8), (0, 1)),  # output projection
    ("bsf,fd->bsd", (1, 1, 16), (16, 8), (0,)),          # MLP, head: one row
    ("bshk,hkd->bsd", (1, 1, 4, 5), (4, 5, 8), (0, 1)),  # one row, two input axes
])
def test_inputs_last_weights_multiply_like_their_own_layout(subscripts, x_shape, w_shape, axes):
    """A weight laid out inputs last (float or int8) gives its own layout's product: one row as
    a reduction over the inputs (no dot), more rows as a dot; read whole, it is the weight."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    for weight in (w, quantize_int8(w, axes)):
        lw = InputsLast.of(weight, axes)
        assert lw.shape == w.shape and lw.v.shape[-len(axes):] == w.shape[:len(axes)]
        np.testing.assert_array_equal(np.asarray(lw[...]), np.asarray(weight[...]))
        want = np.einsum(subscripts, np.asarray(x, np.float64), np.asarray(weight[...], np.float64))
        got = project(subscripts, x, nnx.Param(lw), jnp.float32)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        eqns = jax.make_jaxpr(lambda x, lw: project(subscripts, x, nnx.Param(lw), jnp.float32))(
            x, lw).jaxpr.eqns
        dots = [e for e in eqns if e.primitive.name == "dot_general"]
        assert len(dots) == (0 if np.prod(x_shape[:-len(axes)]) == 1 else 1)
    # stacked expert weights (inputs not leading) keep their layout
    experts = jnp.zeros((3, 8, 4))
    assert InputsLast.of(experts, (1,)) is experts


def test_inputs_last_lm_decodes_the_models_tokens_and_logits():
    """Mixtral (dense and MoE blocks), float32 and int8 weights, laid out inputs last: steps
    give the model's own layout's logits and tokens, for one request (one row: the
    reductions) in float32 and three (a dot) in int8, and so does the loop for one row in
    both. Experts keep their layout; everything else is moved. A new LM made from such a
    state reads its weights back. (One request count per dtype: each is a compile.)"""
    _, lm = tiny_lm("mixtral")
    for quantize, reqs in ((None, [Request(PROMPTS[0], GREEDY)]),
                           ("int8", [Request(p, GREEDY) for p in PROMPTS])):
        base = LM.of(lm.cfg, lm.state, quantize=quantize)
        last = LM.of(lm.cfg, lm.state, quantize=quantize, inputs_last=True)
        moved = flat(last.state)
        assert isinstance(moved["layers/1/blocks/0/attn/wo"], InputsLast)
        assert isinstance(moved["head"], InputsLast)
        assert not isinstance(moved["layers/1/blocks/1/moe/w_up"], InputsLast)
        assert Engine(last).min_rows == 1 and Engine(base).min_rows == 2
        # an LM made from this one's state (a draft from its target) reads it back
        again = flat(LM.of(lm.cfg, last.state, quantize=quantize).state)
        for k, w in flat(base.state).items():
            np.testing.assert_allclose(np.asarray(again[k][...]), np.asarray(w[...]),
                                       rtol=1e-6, atol=1e-7)
        want = decode_logits(Engine(base, min_rows=1), reqs, 3)
        for (l1, t1), (l2, t2) in zip(want, decode_logits(Engine(last), reqs, 3)):
            np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(t2, t1)
        reqs = [Request(PROMPTS[0], GREEDY)]  # the loop, for one row (the reductions)
        outs = Engine(last).generate(reqs)
        assert [o.ids for o in outs] == [o.ids for o in Engine(base, min_rows=1).generate(reqs)]


@pytest.mark.parametrize("name", ["gpt2", "deepseek", "t5"])
def test_an_inputs_last_decode_reads_no_weight_whole(name, monkeypatch):
    """Laid out inputs last (a GPU's default), a weight that a layer read whole (`w[...]`)
    would be transposed back every decode step. Prefill and steps of GPT-2 (its q/k/v biases,
    once taken for weights), DeepSeek (MLA, whose absorbed decoding slices wkv_b: kept in its
    own layout) and T5 (its own head) read none, and give the model's own layout's logits and
    tokens."""
    if name == "t5":
        from tests.test_generate_t5 import START, T5, tiny_t5
        _, lm = tiny_t5(T5 + ["model.tie_embeddings=false"])
        kw = {"decoder_start_id": START}
    else:
        _, lm = tiny_lm(name)
        kw = {}
    last = LM.of(lm.cfg, lm.state, inputs_last=True, **kw)
    if not lm.cfg.tie_embeddings:  # GPT-2's head is its token table
        assert isinstance(flat(last.state)["head"], InputsLast)
    reads, read = [], InputsLast.__getitem__
    monkeypatch.setattr(InputsLast, "__getitem__",
                        lambda w, index: reads.append(w.v.shape) or read(w, index))
    reqs = [Request(PROMPTS[0], GREEDY)]
    got = decode_logits(Engine(last), reqs, 3)
    assert reads == []
    monkeypatch.undo()
    for (l1, t1), (l2, t2) in zip(decode_logits(Engine(lm, min_rows=1), reqs, 3), got):
        np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(t2, t1)
