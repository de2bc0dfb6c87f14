"""DeepseekV3ForCausalLM (jaxlm family `deepseek`): config.json fields and tensor names both ways.

RoPE layout: with `rope_interleave` (transformers' default, DeepSeek's released weights) HF
rotates the pairs (x0, x1), (x2, x3), ... of a head's rope dims and emits them rotate-half
ordered; jaxlm's rope is rotate-half, so the rope columns of the query projection and the rope
rows of kv_a_proj_with_mqa are reordered evens-then-odds at import (inverse at export), which
makes the two attentions the same function. Export always writes the interleaved layout.

The MoE's e_score_correction_bias is jaxlm's SelectionBias (in the state's 'model_state'), which
exists only with model.bias_update_rate > 0 (jaxlm's default for the family)."""
from __future__ import annotations

import numpy as np

from jaxlm.hf.files import HFError
from jaxlm.hf.hf_config import HFConfig, rope_from_hf, rope_to_hf
from jaxlm.hf.layout import (Layout, heads_in, heads_out, layer_slot, linear, permute_last,
                             same)

ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek"}
LATENT_NORM_EPS = 1e-6  # transformers' q_a/kv_a layernorms use this, whatever rms_norm_eps
# what transformers' DeepseekV3Config assumes for a field config.json leaves out
DEFAULTS = dict(q_lora_rank=1536, first_k_dense_replace=3, n_group=8, topk_group=4,
                n_shared_experts=1, routed_scaling_factor=2.5)


def fields_from_hf(hf: HFConfig, arch: str) -> dict:
    """jaxlm model fields of a DeepseekV3ForCausalLM config."""
    hf.expect("hidden_act", ("silu",), "silu", "jaxlm's DeepSeek MLPs are SwiGLU")
    hf.expect("attention_bias", (False,), False)
    hf.expect("norm_topk_prob", (True,), True, "jaxlm normalises the sigmoid top-k weights")
    hf.expect("scoring_func", ("sigmoid",), "sigmoid")
    hf.expect("topk_method", ("noaux_tc",), "noaux_tc")
    hf.expect("rope_interleave", (True,), True, "jaxlm de-interleaves the RoPE dims at import, "
                                              "as DeepSeek's released weights need")
    hf.expect("rms_norm_eps", (LATENT_NORM_EPS,), LATENT_NORM_EPS,
              "jaxlm's one norm_eps must equal the latent norms' fixed 1e-6")
    heads = hf.get("num_attention_heads")
    hf.expect("num_key_value_heads", (heads,), heads, "MLA expands the latent to every head")
    get = {k: hf.values.get(k, v) for k, v in DEFAULTS.items()}  # null q_lora_rank: none
    layers, dense = hf.get("num_hidden_layers"), get["first_k_dense_replace"]
    if dense >= layers:
        hf.fail("first_k_dense_replace", f"leaves no MoE layer of num_hidden_layers={layers} "
                                         f"(jaxlm's DeepSeek needs one)")
    rope = rope_from_hf(hf)
    n_group = get["n_group"] or 1
    return dict(family="deepseek", vocab_size=hf.get("vocab_size"), d_model=hf.get("hidden_size"),
                num_layers=layers, num_heads=heads, q_lora_rank=get["q_lora_rank"] or 0,
                kv_lora_rank=hf.get("kv_lora_rank"), qk_nope_head_dim=hf.get("qk_nope_head_dim"),
                qk_rope_head_dim=hf.get("qk_rope_head_dim"), v_head_dim=hf.get("v_head_dim"),
                norm_eps=LATENT_NORM_EPS, ffn_dim=hf.get("intermediate_size"),
                num_dense_layers=dense, router="sigmoid", num_experts=hf.get("n_routed_experts"),
                experts_per_token=hf.get("num_experts_per_tok"),
                expert_ffn_dim=hf.get("moe_intermediate_size"),
                num_shared_experts=get["n_shared_experts"], num_groups=n_group,
                groups_per_token=get["topk_group"] or n_group,
                routed_scale=float(get["routed_scaling_factor"]),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **rope)


def _check_exportable(cfg) -> None:
    for name, ok, why in (
            ("router", cfg.router == "sigmoid", "DeepSeek-V3 scores experts by sigmoid"),
            ("bias_update_rate", cfg.bias_update_rate > 0,
             "no selection bias to write as e_score_correction_bias"),
            ("norm_eps", cfg.norm_eps == LATENT_NORM_EPS,
             "transformers' latent norms use 1e-6 whatever rms_norm_eps")):
        if not ok:
            raise HFError(f"model.{name}={getattr(cfg, name)!r} has no DeepseekV3ForCausalLM "
                          f"equivalent ({why})")


def config_to_hf(cfg, max_positions: int) -> dict:
    _check_exportable(cfg)
    return dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                intermediate_size=cfg.ffn_dim,
                moe_intermediate_size=cfg.expert_ffn_dim or cfg.ffn_dim,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_heads, q_lora_rank=cfg.q_lora_rank or None,
                kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                first_k_dense_replace=cfg.num_dense_layers, n_routed_experts=cfg.num_experts,
                num_experts_per_tok=cfg.experts_per_token,
                n_shared_experts=cfg.num_shared_experts, n_group=cfg.num_groups,
                topk_group=cfg.groups_per_token, routed_scaling_factor=cfg.routed_scale,
                norm_topk_prob=True, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
                attention_bias=False, rope_interleave=True, max_position_embeddings=max_positions,
                tie_word_embeddings=cfg.tie_embeddings, num_nextn_predict_layers=0,
                **rope_to_hf(cfg))


def rope_order(before: int, rope_dim: int) -> np.ndarray:
    """jaxlm's order of a last axis of `before` non-rope dims then interleaved rope dims."""
    return np.concatenate([np.arange(before), before + np.arange(0, rope_dim, 2),
                           before + np.arange(1, rope_dim, 2)])


def layout(cfg) -> Layout:
    _check_exportable(cfg)
    H, Kn, Kr, V, R = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                       cfg.v_head_dim, cfg.kv_lora_rank)
    q_order, kv_order = rope_order(Kn, Kr), rope_order(R, Kr)
    # transformers skips the multi-token-prediction layer that follows the last one
    ignored = (f"model.layers.{cfg.num_layers}.", "rotary_emb.inv_freq")
    if not cfg.num_shared_experts:  # transformers builds a zero-width shared MLP then
        ignored += (".mlp.shared_experts.",)
    out = Layout(ignored=ignored)
    out.add(("params", "embed"), same("model.embed_tokens.weight"))
    out.add(("params", "final_norm", "scale"), same("model.norm.weight"))
    if not cfg.tie_embeddings:
        out.add(("params", "head"), linear("lm_head.weight"))
    for layer in range(cfg.num_layers):
        dense = layer < cfg.num_dense_layers
        stack = "dense_layers" if dense else "layers"
        prefix, lead = layer_slot(stack, layer if dense else layer - cfg.num_dense_layers,
                                  cfg.scan_layers)
        hf = f"model.layers.{layer}."

        def add(path, piece, extra=(), state="params"):
            out.add((state,) + prefix[1:] + path, piece, lead + extra)
        add(("attn_norm", "scale"), same(hf + "input_layernorm.weight"))
        add(("mlp_norm", "scale"), same(hf + "post_attention_layernorm.weight"))
        attn = hf + "self_attn."
        if cfg.q_lora_rank:
            add(("attn", "wq_a"), linear(attn + "q_a_proj.weight"))
            add(("attn", "q_norm", "scale"), same(attn + "q_a_layernorm.weight"))
            add(("attn", "wq_b"), permute_last(heads_in(attn + "q_b_proj.weight", H, Kn + Kr),
                                               q_order))
        else:
            add(("attn", "wq"), permute_last(heads_in(attn + "q_proj.weight", H, Kn + Kr),
                                             q_order))
        add(("attn", "wkv_a"), permute_last(linear(attn + "kv_a_proj_with_mqa.weight"),
                                            kv_order))
        add(("attn", "kv_norm", "scale"), same(attn + "kv_a_layernorm.weight"))
        add(("attn", "wkv_b"), heads_in(attn + "kv_b_proj.weight", H, Kn + V))
        add(("attn", "wo"), heads_out(attn + "o_proj.weight", H, V))
        mlp = hf + "mlp."
        swiglu = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))
        if dense:
            for name, proj in swiglu:
                add(("mlp", name), linear(f"{mlp}{proj}.weight"))
            continue
        add(("moe", "router"), linear(mlp + "gate.weight"))
        add(("moe", "selection_bias"), same(mlp + "gate.e_score_correction_bias"),
            state="model_state")
        for e in range(cfg.num_experts):
            for name, proj in swiglu:
                add(("moe", name), linear(f"{mlp}experts.{e}.{proj}.weight"), (e,))
        if cfg.num_shared_experts:
            for name, proj in swiglu:
                add(("moe", "shared", name), linear(f"{mlp}shared_experts.{proj}.weight"))
    return out
