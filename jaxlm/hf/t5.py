"""T5ForConditionalGeneration (jaxlm family `t5`): config.json fields and tensor names both ways.

v1.1 (gated GELU, a head of its own, unscaled) and the original T5 (ReLU, the head tied to the
token table with the output scaled by d_model^-0.5). transformers 5 always writes
`tie_word_embeddings: true` for T5 and keeps the real switch in `scale_decoder_outputs`; older
configs say `tie_word_embeddings: false` for v1.1. The relative position bias lives in block 0
of each stack only."""
from __future__ import annotations

from jaxlm.hf.files import HFError
from jaxlm.hf.hf_config import HFConfig
from jaxlm.hf.layout import Layout, heads_in, heads_out, layer_slot, linear, same

ARCHITECTURES = {"T5ForConditionalGeneration": "t5"}
# transformers' activation names <-> jaxlm's (jaxlm/nn/mlp.py ACTIVATIONS)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu", "silu": "silu"}


def _ffn_from_hf(hf: HFConfig) -> tuple[str, bool]:
    """(jaxlm activation, gated) of `feed_forward_proj` ('gated-gelu' means gelu_new)."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and not gated) or act not in ACTIVATIONS:
        raise HFError(f"{hf.path}: feed_forward_proj={proj!r} is not supported by jaxlm; expected "
                      f"[gated-]{{{', '.join(ACTIVATIONS)}}}")
    return ACTIVATIONS[act], gated


def _ffn_to_hf(cfg) -> str:
    if cfg.gated_ffn and cfg.ffn_activation == "gelu":  # 'gated-gelu' means the tanh form
        raise HFError("model.ffn_activation=gelu with model.gated_ffn=true: transformers' T5 "
                      "reads 'gated-gelu' as GELU (tanh); use gelu_tanh")
    name = {"gelu_tanh": "gelu_new" if not cfg.gated_ffn else "gelu"}.get(
        cfg.ffn_activation, cfg.ffn_activation)
    return f"gated-{name}" if cfg.gated_ffn else name


def fields_from_hf(hf: HFConfig, arch: str) -> dict:
    """jaxlm model fields of a T5ForConditionalGeneration config."""
    hf.expect("is_encoder_decoder", (True,), True)
    activation, gated = _ffn_from_hf(hf)
    scaled = hf.values.get("scale_decoder_outputs")
    if scaled is None:  # configs before transformers 5: tied and scaled unless said otherwise
        scaled = hf.values.get("tie_word_embeddings", True) is not False
    layers = hf.get("num_layers")
    return dict(family="t5", vocab_size=hf.get("vocab_size"), d_model=hf.get("d_model"),
                num_layers=layers, num_decoder_layers=hf.get("num_decoder_layers", layers),
                num_heads=hf.get("num_heads"), head_dim=hf.get("d_kv"), ffn_dim=hf.get("d_ff"),
                relative_buckets=hf.get("relative_attention_num_buckets"),
                relative_max_distance=hf.get("relative_attention_max_distance", 128),
                norm_eps=float(hf.get("layer_norm_epsilon")), ffn_activation=activation,
                gated_ffn=gated, tie_embeddings=bool(scaled))


def config_to_hf(cfg, max_positions: int) -> dict:
    """`max_positions` is unused: T5's positions are relative."""
    return dict(architectures=["T5ForConditionalGeneration"], model_type="t5",
                is_encoder_decoder=True, vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers,
                num_heads=cfg.num_heads, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim,
                relative_attention_num_buckets=cfg.relative_buckets,
                relative_attention_max_distance=cfg.relative_max_distance,
                layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=_ffn_to_hf(cfg),
                tie_word_embeddings=cfg.tie_embeddings,
                scale_decoder_outputs=cfg.tie_embeddings)


def _stack(out: Layout, cfg, stack: str, hf_stack: str, num: int, decoder: bool) -> None:
    H, K = cfg.num_heads, cfg.head_dim
    mlp_ix = 2 if decoder else 1
    for layer in range(num):
        prefix, lead = layer_slot(stack, layer, cfg.scan_layers)
        hf = f"{hf_stack}.block.{layer}.layer."

        def add(path, piece):
            out.add(prefix + path, piece, lead)
        attentions = [("attn", "attn_norm", "0.SelfAttention")]
        if decoder:
            attentions.append(("cross_attn", "cross_norm", "1.EncDecAttention"))
        for attn, norm, name in attentions:
            for w in "qkv":
                add((attn, f"w{w}"), heads_in(f"{hf}{name}.{w}.weight", H, K))
            add((attn, "wo"), heads_out(f"{hf}{name}.o.weight", H, K))
            add((norm, "scale"), same(f"{hf}{name.split('.')[0]}.layer_norm.weight"))
        ffn = f"{hf}{mlp_ix}.DenseReluDense."
        if cfg.gated_ffn:
            add(("mlp", "w_gate"), linear(ffn + "wi_0.weight"))
            add(("mlp", "w_up"), linear(ffn + "wi_1.weight"))
        else:
            add(("mlp", "w_up"), linear(ffn + "wi.weight"))
        add(("mlp", "w_down"), linear(ffn + "wo.weight"))
        add(("mlp_norm", "scale"), same(f"{hf}{mlp_ix}.layer_norm.weight"))


def layout(cfg) -> Layout:
    # the stacks' embed_tokens are the shared table under other names; transformers itself
    # skips a cross-attention bias some checkpoints carry
    out = Layout(ignored=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                          "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias"))
    out.add(("params", "embed"), same("shared.weight"))
    out.add(("params", "encoder_bias", "table"),
            same("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
    out.add(("params", "decoder_bias", "table"),
            same("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
    out.add(("params", "encoder_norm", "scale"), same("encoder.final_layer_norm.weight"))
    out.add(("params", "final_norm", "scale"), same("decoder.final_layer_norm.weight"))
    if not cfg.tie_embeddings:
        # a v1.1 model whose head transformers kept tied to the table has no lm_head on disk
        out.add(("params", "head"), linear("lm_head.weight"))
        out.fallbacks["lm_head.weight"] = "shared.weight"
    _stack(out, cfg, "encoder_layers", "encoder", cfg.num_layers, decoder=False)
    _stack(out, cfg, "layers", "decoder", cfg.decoder_layers, decoder=True)
    return out
