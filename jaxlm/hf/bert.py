"""BertForMaskedLM (jaxlm family `bert`): config.json fields and tensor names both ways.

Post-norm blocks; the MLM head is a dense + GELU + LayerNorm transform, a decoder tied to the
word embeddings (its bias is `cls.predictions.bias`, jaxlm's b_vocab). jaxlm feeds every token
as type 0, but the whole token-type table is kept, so it round-trips."""
from __future__ import annotations

from jaxlm.hf.files import HFError
from jaxlm.hf.hf_config import HFConfig
from jaxlm.hf.layout import Layout, head_bias, heads_in, heads_out, layer_slot, linear, same

ARCHITECTURES = {"BertForMaskedLM": "bert"}


def fields_from_hf(hf: HFConfig, arch: str) -> dict:
    """jaxlm model fields of a BertForMaskedLM config."""
    hf.expect("hidden_act", ("gelu",), "gelu", "jaxlm's BERT uses the exact (erf) GELU")
    hf.expect("position_embedding_type", ("absolute",), "absolute",
              "jaxlm's BERT has a table of learned absolute positions")
    hf.expect("is_decoder", (False,), False, "jaxlm's BERT attends bidirectionally")
    hf.expect("add_cross_attention", (False,), False, "a cross-attention in every block")
    d_model, heads = hf.get("hidden_size"), hf.get("num_attention_heads")
    if d_model % heads:
        hf.fail("num_attention_heads", f"does not divide hidden_size={d_model}")
    return dict(family="bert", vocab_size=hf.get("vocab_size"), d_model=d_model,
                num_layers=hf.get("num_hidden_layers"), num_heads=heads,
                ffn_dim=hf.get("intermediate_size"),
                max_positions=hf.get("max_position_embeddings"),
                type_vocab_size=hf.get("type_vocab_size", 2),
                norm_eps=float(hf.get("layer_norm_eps")), pre_norm=False,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def config_to_hf(cfg, max_positions: int) -> dict:
    """`max_positions` (the run's sequence length) is unused: the table's length is the
    model's own."""
    if cfg.pre_norm:
        raise HFError("model.pre_norm=true has no BertForMaskedLM equivalent (BERT is "
                      "post-norm)")
    return dict(architectures=["BertForMaskedLM"], model_type="bert", vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim,
                max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
                layer_norm_eps=cfg.norm_eps, hidden_act="gelu",
                position_embedding_type="absolute", is_decoder=False, add_cross_attention=False,
                tie_word_embeddings=cfg.tie_embeddings)


def layout(cfg) -> Layout:
    if cfg.pre_norm:
        raise HFError("model.pre_norm=true has no BertForMaskedLM equivalent (BERT is "
                      "post-norm)")
    D, H = cfg.d_model, cfg.num_heads
    K = D // H
    # the decoder's bias is a second name of cls.predictions.bias; the pooler and the
    # next-sentence head of pre-training checkpoints are unused by BertForMaskedLM too
    out = Layout(ignored=("cls.predictions.decoder.bias", "embeddings.position_ids",
                          "bert.pooler.", "cls.seq_relationship."))
    emb = "bert.embeddings."
    out.add(("params", "embed"), same(emb + "word_embeddings.weight"))
    out.add(("params", "positions"), same(emb + "position_embeddings.weight"))
    out.add(("params", "token_types"), same(emb + "token_type_embeddings.weight"))

    def norm(path, hf):
        out.add(path + ("scale",), same(hf + ".weight"))
        out.add(path + ("bias",), same(hf + ".bias"))
    norm(("params", "embed_norm"), emb + "LayerNorm")
    head = "cls.predictions."
    out.add(("params", "mlm_w"), linear(head + "transform.dense.weight"))
    out.add(("params", "mlm_b"), same(head + "transform.dense.bias"))
    norm(("params", "mlm_norm"), head + "transform.LayerNorm")
    out.add(("params", "b_vocab"), same(head + "bias"))
    if not cfg.tie_embeddings:
        out.add(("params", "head"), linear(head + "decoder.weight"))
    for layer in range(cfg.num_layers):
        prefix, lead = layer_slot("layers", layer, cfg.scan_layers)
        hf = f"bert.encoder.layer.{layer}."

        def add(path, piece):
            out.add(prefix + path, piece, lead)
        for name, proj in (("q", "query"), ("k", "key"), ("v", "value")):
            add(("attn", f"w{name}"), heads_in(f"{hf}attention.self.{proj}.weight", H, K))
            add(("attn", f"b_{name}"), head_bias(f"{hf}attention.self.{proj}.bias", H, K))
        add(("attn", "wo"), heads_out(hf + "attention.output.dense.weight", H, K))
        add(("attn", "b_o"), same(hf + "attention.output.dense.bias"))
        add(("mlp", "w_up"), linear(hf + "intermediate.dense.weight"))
        add(("mlp", "b_up"), same(hf + "intermediate.dense.bias"))
        add(("mlp", "w_down"), linear(hf + "output.dense.weight"))
        add(("mlp", "b_down"), same(hf + "output.dense.bias"))
        for norm_name, hf_norm in (("attn_norm", "attention.output.LayerNorm"),
                                   ("mlp_norm", "output.LayerNorm")):
            add((norm_name, "scale"), same(f"{hf}{hf_norm}.weight"))
            add((norm_name, "bias"), same(f"{hf}{hf_norm}.bias"))
    return out
