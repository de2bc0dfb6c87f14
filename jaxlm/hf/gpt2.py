"""GPT2LMHeadModel (jaxlm family `gpt2`): config.json fields and tensor names both ways.

GPT-2 stores its projections as Conv1D weights, [in, out] (no transpose to jaxlm's [in, ...]),
and q|k|v fused in one `c_attn` tensor: three blocks of it feed wq, wk and wv, and export
joins them back."""
from __future__ import annotations

from jaxlm.hf.files import HFError
from jaxlm.hf.hf_config import HFConfig
from jaxlm.hf.layout import Layout, Piece, block, head_bias, layer_slot, linear, same

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2"}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both GELU's tanh form, jaxlm's gelu_tanh


def fields_from_hf(hf: HFConfig, arch: str) -> dict:
    """jaxlm model fields of a GPT2LMHeadModel config."""
    hf.expect("activation_function", TANH_GELUS, "gelu_new", "jaxlm's GPT-2 MLP is GELU (tanh)")
    hf.expect("scale_attn_weights", (True,), True, "jaxlm scales logits by 1/sqrt(head_dim)")
    hf.expect("scale_attn_by_inverse_layer_idx", (False,), False,
              "a per-layer 1/(layer+1) logit scale")
    hf.expect("reorder_and_upcast_attn", (False,), False, "jaxlm's attention has no such mode")
    hf.expect("add_cross_attention", (False,), False, "a cross-attention in every block")
    d_model, heads = hf.get("n_embd"), hf.get("n_head")
    if d_model % heads:
        hf.fail("n_head", f"does not divide n_embd={d_model}")
    return dict(family="gpt2", vocab_size=hf.get("vocab_size"), d_model=d_model,
                num_layers=hf.get("n_layer"), num_heads=heads,
                ffn_dim=hf.get("n_inner", 0),  # both mean 4 * d_model by None / 0
                max_positions=hf.get("n_positions"),
                norm_eps=float(hf.get("layer_norm_epsilon")),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def config_to_hf(cfg, max_positions: int) -> dict:
    """`max_positions` (the run's sequence length) is unused: the table's length is the
    model's own."""
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                n_inner=cfg.ffn_dim or None, n_positions=cfg.max_positions,
                layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, add_cross_attention=False,
                tie_word_embeddings=cfg.tie_embeddings)


def conv1d_heads_in(hf: str, heads: int, head_dim: int) -> Piece:
    """Conv1D [D, heads * head_dim] <-> jaxlm [D, heads, head_dim]."""
    return Piece(hf, lambda t: t.reshape(t.shape[0], heads, head_dim),
                 lambda a: a.reshape(a.shape[0], heads * head_dim))


def conv1d_heads_out(hf: str, heads: int, head_dim: int) -> Piece:
    """Conv1D [heads * head_dim, D] <-> jaxlm [heads, head_dim, D]."""
    return Piece(hf, lambda t: t.reshape(heads, head_dim, t.shape[-1]),
                 lambda a: a.reshape(heads * head_dim, a.shape[-1]))


def layout(cfg) -> Layout:
    if cfg.family != "gpt2":
        raise HFError(f"model.family={cfg.family!r} is not GPT-2")
    D, H = cfg.d_model, cfg.num_heads
    K = D // H
    # older checkpoints carry the causal mask as buffers
    out = Layout(ignored=(".attn.bias", ".attn.masked_bias"))
    out.add(("params", "embed"), same("transformer.wte.weight"))
    out.add(("params", "positions"), same("transformer.wpe.weight"))
    out.add(("params", "final_norm", "scale"), same("transformer.ln_f.weight"))
    out.add(("params", "final_norm", "bias"), same("transformer.ln_f.bias"))
    if not cfg.tie_embeddings:
        out.add(("params", "head"), linear("lm_head.weight"))
    for layer in range(cfg.num_layers):
        prefix, lead = layer_slot("layers", layer, cfg.scan_layers)
        hf = f"transformer.h.{layer}."

        def add(path, piece):
            out.add(prefix + path, piece, lead)
        for norm, name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            add((norm, "scale"), same(f"{hf}{name}.weight"))
            add((norm, "bias"), same(f"{hf}{name}.bias"))
        for i, name in enumerate("qkv"):  # c_attn's output columns are q | k | v
            add(("attn", f"w{name}"),
                block(conv1d_heads_in(hf + "attn.c_attn.weight", H, K), 1, i * D, (i + 1) * D))
            add(("attn", f"b_{name}"),
                block(head_bias(hf + "attn.c_attn.bias", H, K), 0, i * D, (i + 1) * D))
        add(("attn", "wo"), conv1d_heads_out(hf + "attn.c_proj.weight", H, K))
        add(("attn", "b_o"), same(hf + "attn.c_proj.bias"))
        add(("mlp", "w_up"), same(hf + "mlp.c_fc.weight"))
        add(("mlp", "b_up"), same(hf + "mlp.c_fc.bias"))
        add(("mlp", "w_down"), same(hf + "mlp.c_proj.weight"))
        add(("mlp", "b_down"), same(hf + "mlp.c_proj.bias"))
    return out
