"""LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (jaxlm family `llama`) and
MixtralForCausalLM (`mixtral`): config.json fields and tensor names both ways."""
from __future__ import annotations

from jaxlm.hf.hf_config import HFConfig, rope_from_hf, rope_to_hf
from jaxlm.hf.layout import Layout, head_bias, heads_in, heads_out, layer_slot, linear, same

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "llama", "MixtralForCausalLM": "mixtral"}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral"}


def fields_from_hf(hf: HFConfig, arch: str) -> dict:
    """jaxlm model fields of an HF config of one of ARCHITECTURES."""
    hf.expect("hidden_act", ("silu",), "silu", "jaxlm's Llama MLP is SwiGLU")
    hf.expect("mlp_bias", (False,), False)
    if arch == "LlamaForCausalLM":  # Llama's attention_bias puts a bias on o_proj too
        hf.expect("attention_bias", (False,), False, "a bias on the output projection")
    if arch == "Qwen2ForCausalLM":
        hf.expect("use_sliding_window", (False,), False)
    heads = hf.get("num_attention_heads")
    d_model = hf.get("hidden_size")
    fields = dict(
        family=ARCHITECTURES[arch], vocab_size=hf.get("vocab_size"), d_model=d_model,
        num_layers=hf.get("num_hidden_layers"), num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim", d_model // heads), ffn_dim=hf.get("intermediate_size"),
        norm_eps=float(hf.get("rms_norm_eps")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM",
        sliding_window=(hf.get("sliding_window", 0) if arch in ("MistralForCausalLM",
                                                               "MixtralForCausalLM") else 0),
        **rope_from_hf(hf))
    if arch == "MixtralForCausalLM":
        fields.update(num_experts=hf.get("num_local_experts"),
                      experts_per_token=hf.get("num_experts_per_tok"), router="softmax",
                      aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.0)),
                      z_loss_weight=0.0, moe_every=1)
    return fields


def architecture(cfg) -> str:
    """The HF architecture a jaxlm config exports as (one clear error where none fits)."""
    from jaxlm.hf.files import HFError
    if cfg.family == "mixtral":
        for name, ok in (("model.moe_every", cfg.moe_every == 1),
                         ("model.num_shared_experts", cfg.num_shared_experts == 0),
                         ("model.router", cfg.router == "softmax"),
                         ("model.num_groups", cfg.num_groups == 1),
                         ("model.routed_scale", cfg.routed_scale == 1.0),
                         ("model.bias_update_rate", cfg.bias_update_rate == 0.0),
                         ("model.expert_ffn_dim", cfg.expert_ffn_dim in (0, cfg.ffn_dim))):
            if not ok:
                raise HFError(f"{name}={getattr(cfg, name.split('.')[1])!r} has no "
                              f"MixtralForCausalLM equivalent")
        return "MixtralForCausalLM"
    if cfg.qkv_bias and cfg.sliding_window:
        raise HFError("model.qkv_bias=true with model.sliding_window: neither Qwen2ForCausalLM "
                      "nor MistralForCausalLM has both")
    return ("Qwen2ForCausalLM" if cfg.qkv_bias else
            "MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM")


def config_to_hf(cfg, max_positions: int) -> dict:
    arch = architecture(cfg)
    out = dict(architectures=[arch], model_type=MODEL_TYPES[arch], vocab_size=cfg.vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
               hidden_act="silu", rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings,
               max_position_embeddings=max_positions, **rope_to_hf(cfg))
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        out["sliding_window"] = cfg.sliding_window or None
    if arch == "Qwen2ForCausalLM":
        out["use_sliding_window"] = False
    if arch == "MixtralForCausalLM":
        out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                   router_aux_loss_coef=cfg.aux_loss_weight)
    return out


def layout(cfg) -> Layout:
    H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    out = Layout(ignored=("rotary_emb.inv_freq",))
    out.add(("params", "embed"), same("model.embed_tokens.weight"))
    out.add(("params", "final_norm", "scale"), same("model.norm.weight"))
    if not cfg.tie_embeddings:
        out.add(("params", "head"), linear("lm_head.weight"))
    moe = cfg.family == "mixtral"
    for layer in range(cfg.num_layers):
        prefix, lead = layer_slot("layers", layer, cfg.scan_layers)
        hf = f"model.layers.{layer}."

        def add(path, piece, extra=()):
            out.add(prefix + path, piece, lead + extra)
        add(("attn_norm", "scale"), same(hf + "input_layernorm.weight"))
        add(("mlp_norm", "scale"), same(hf + "post_attention_layernorm.weight"))
        for name, proj, heads in (("q", "q_proj", H), ("k", "k_proj", G), ("v", "v_proj", G)):
            add(("attn", f"w{name}"), heads_in(f"{hf}self_attn.{proj}.weight", heads, K))
            if cfg.qkv_bias:
                add(("attn", f"b_{name}"), head_bias(f"{hf}self_attn.{proj}.bias", heads, K))
        add(("attn", "wo"), heads_out(hf + "self_attn.o_proj.weight", H, K))
        if not moe:
            for name, proj in (("w_gate", "gate_proj"), ("w_up", "up_proj"),
                               ("w_down", "down_proj")):
                add(("mlp", name), linear(f"{hf}mlp.{proj}.weight"))
            continue
        add(("moe", "router"), linear(hf + "block_sparse_moe.gate.weight"))
        for e in range(cfg.num_experts):
            for name, w in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
                add(("moe", name), linear(f"{hf}block_sparse_moe.experts.{e}.{w}.weight"), (e,))
    return out
