"""Hugging Face interop for GPT-2, BERT, T5 (v1.1 and the original) and DeepSeek-V3, against
transformers itself: logits parity on a 520-token row (scanned and unscanned stacks), HF ->
jaxlm -> HF bit-identical, a trained jaxlm GPT-2 exported and loaded by transformers, and one
clear error for each config field jaxlm cannot honour."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hf_parity import LONG, assert_parity, hf_logits, jaxlm_model, random_tokens, save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm.config import ConfigError  # noqa: E402
from jaxlm.convert import export_run, import_hf  # noqa: E402
from jaxlm.hf.registry import model_fields  # noqa: E402

VOCAB = 300
T5_SIZES = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
DEEPSEEK_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                      moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                      n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      routed_scaling_factor=2.5)


def _jitter(model, scale=0.05):
    """transformers initialises biases and norms to constants (and DeepSeek's correction bias
    to zero): move every tensor off its initial value so each mapping is exercised."""
    with torch.no_grad():
        weights = [*model.parameters(), *(b for name, b in model.named_buffers()
                                          if name.endswith("e_score_correction_bias"))]
        for p in weights:
            p.add_(torch.randn_like(p) * scale)
    return model


def _build(name):
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=LONG))
    if name == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=LONG))
    if name == "t5_v11":  # gated GELU and a head of its own, as google/t5-v1_1-* on disk
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            **T5_SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
        return model
    if name == "t5_v11_tied":  # transformers 5 ties a fresh v1.1 head to the table, unscaled
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            **T5_SIZES, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    if name == "t5":  # the original: ReLU, tied head, output scaled by d_model^-0.5
        return transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_SIZES))
    if name == "deepseek":  # low-rank queries, group-limited routing, a shared expert, and
        # DeepSeek-V3's YaRN (factor 40, logits rescaled by mscale_all_dim) from a short context
        return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            **DEEPSEEK_SIZES, q_lora_rank=16, max_position_embeddings=2560,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                 original_max_position_embeddings=64, beta_fast=32,
                                 beta_slow=1, mscale=1.0, mscale_all_dim=1.0)))
    assert name == "deepseek_no_q_lora"
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        **DEEPSEEK_SIZES, q_lora_rank=None, n_shared_experts=2,
        rope_parameters=dict(rope_type="default", rope_theta=5000.0)))


NAMES = ("gpt2", "bert", "t5_v11", "t5_v11_tied", "t5", "deepseek", "deepseek_no_q_lora")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (transformers model, saved directory)."""
    out = {}
    for name in NAMES:
        model = _jitter(_build(name))
        out[name] = (model, save_hf(model, tmp_path_factory.mktemp(name)))
    return out


def _logits_both(hf_models, name, *overrides):
    model, hf_dir = hf_models[name]
    tokens = random_tokens(VOCAB)
    if name.startswith("t5"):
        decoder = random_tokens(VOCAB, length=40, seed=1)
        _, ours = jaxlm_model(hf_dir, *overrides)
        return ours(tokens, decoder), hf_logits(model, tokens, decoder_input_ids=torch.tensor(
            decoder))
    _, ours = jaxlm_model(hf_dir, f"data.seq_len={LONG}", *overrides)
    return ours(tokens), hf_logits(model, tokens)


@pytest.mark.parametrize("name,scan", [
    ("gpt2", True), ("gpt2", False), ("bert", True), ("t5_v11", True), ("t5_v11_tied", False),
    ("t5", True), ("deepseek", True), ("deepseek", False), ("deepseek_no_q_lora", True)])
def test_logits_match_transformers(hf_models, name, scan):
    ours, theirs = _logits_both(hf_models, name, f"model.scan_layers={str(scan).lower()}")
    assert_parity(ours, theirs)


def test_import_reads_each_architecture_as_its_family(hf_models):
    fields = {name: model_fields(hf_models[name][1]) for name in NAMES}
    assert fields["gpt2"]["family"] == "gpt2" and fields["gpt2"]["max_positions"] == LONG
    assert fields["bert"]["type_vocab_size"] == 2 and not fields["bert"]["pre_norm"]
    assert (fields["t5_v11"]["ffn_activation"], fields["t5_v11"]["gated_ffn"],
            fields["t5_v11"]["tie_embeddings"]) == ("gelu_tanh", True, False)
    assert (fields["t5"]["ffn_activation"], fields["t5"]["gated_ffn"],
            fields["t5"]["tie_embeddings"]) == ("relu", False, True)
    ds = fields["deepseek"]
    assert (ds["num_dense_layers"], ds["num_groups"], ds["groups_per_token"], ds["routed_scale"],
            ds["q_lora_rank"]) == (1, 2, 1, 2.5, 16)
    assert fields["deepseek_no_q_lora"]["q_lora_rank"] == 0
    assert fields["deepseek_no_q_lora"]["rope_theta"] == 5000.0


def _tensors(directory):
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# the config fields whose meaning export must carry back (transformers reads them)
EXPORTED_FIELDS = {
    "gpt2": ("n_positions", "n_inner", "activation_function", "tie_word_embeddings"),
    "bert": ("max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act"),
    "t5_v11": ("feed_forward_proj", "scale_decoder_outputs", "d_kv", "num_decoder_layers"),
    "t5": ("feed_forward_proj", "scale_decoder_outputs", "dense_act_fn", "is_gated_act"),
    "deepseek": ("q_lora_rank", "first_k_dense_replace", "n_group", "topk_group",
                 "routed_scaling_factor", "n_shared_experts", "moe_intermediate_size",
                 "rope_interleave", "rope_parameters"),
    "deepseek_no_q_lora": ("q_lora_rank", "n_shared_experts", "rope_parameters"),
}


def _round_trip(hf_models, name, tmp_path, *overrides):
    """Import `name`'s directory, export it again; the tensors are bit-identical and
    transformers reads the same config back. Returns the exported directory."""
    model, hf_dir = hf_models[name]
    import_hf(hf_dir, str(tmp_path / "run"), ["data.seq_len=64", *overrides])
    export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    a, b = _tensors(hf_dir), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    again = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert type(again) is type(model.config)
    for field in ("vocab_size", "num_hidden_layers", "hidden_size") + EXPORTED_FIELDS[name]:
        assert getattr(again, field) == getattr(model.config, field), field
    return tmp_path / "out"


@pytest.mark.parametrize("name", ["gpt2", "bert", "t5_v11", "t5", "deepseek_no_q_lora"])
def test_hf_to_jaxlm_to_hf_is_bit_identical(hf_models, name, tmp_path):
    _round_trip(hf_models, name, tmp_path)


def test_deepseek_export_loads_in_transformers_with_the_same_logits(hf_models, tmp_path):
    """The other DeepSeek (low-rank queries, unscanned) round trips too, and transformers
    reading jaxlm's export (RoPE dims re-interleaved) computes what jaxlm does."""
    _, hf_dir = hf_models["deepseek"]
    out = _round_trip(hf_models, "deepseek", tmp_path, "model.scan_layers=false")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = random_tokens(VOCAB, length=64)
    _, ours = jaxlm_model(hf_dir, "data.seq_len=64")
    assert_parity(ours(tokens), hf_logits(model, tokens))


def test_a_trained_gpt2_run_exports_to_transformers(tmp_path):
    """Train a jaxlm GPT-2 (untied head) a few steps, export it, load it with transformers: the
    logits match jaxlm's own on the same weights."""
    from helpers import family_config

    from jaxlm import train
    run = tmp_path / "run"
    cfg = family_config("gpt2", f"train.run_dir={run}", "model.tie_embeddings=false")
    out = train.run(cfg)
    assert np.isfinite(out["loss"])
    export_run(str(run), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    _, ours = jaxlm_model(str(tmp_path / "hf"), "data.seq_len=32")
    tokens = random_tokens(cfg.model.vocab_size, length=32)
    assert_parity(ours(tokens), hf_logits(model, tokens))


# ---------------------------------------------------------------- what jaxlm refuses

def _edited(hf_dir, to, **changes):
    shutil.copytree(hf_dir, to)
    path = Path(to) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return to


@pytest.mark.parametrize("name,changes,message", [
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    ("gpt2", dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=True"),
    ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights=False"),
    ("gpt2", dict(activation_function="relu"), "activation_function='relu'"),
    ("bert", dict(position_embedding_type="relative_key"),
     "position_embedding_type='relative_key'"),
    ("bert", dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
    ("t5", dict(feed_forward_proj="gated-swish"), "feed_forward_proj='gated-swish'"),
    ("deepseek", dict(norm_topk_prob=False), "norm_topk_prob=False"),
    ("deepseek", dict(rope_interleave=False), "rope_interleave=False"),
    ("deepseek", dict(num_key_value_heads=2), "num_key_value_heads=2"),
    ("deepseek", dict(first_k_dense_replace=3), "first_k_dense_replace=3: leaves no MoE layer"),
    ("deepseek", dict(rms_norm_eps=1e-5), "rms_norm_eps=1e-05"),
    ("deepseek", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=4.0)),
     "rope_parameters.rope_type='dynamic' is not supported"),
])
def test_fields_jaxlm_cannot_honour_are_one_clear_error(hf_models, tmp_path, name, changes,
                                                        message):
    directory = _edited(hf_models[name][1], tmp_path / "d", **changes)
    with pytest.raises(ConfigError, match=r"config.json: " + message.replace("(", r"\(")):
        model_fields(directory)


def test_a_fused_tensor_wider_than_its_blocks_is_refused(hf_models, tmp_path):
    """c_attn with a fourth block of columns: its three blocks still have the right shapes,
    so only the tiling check stops the extra columns being dropped."""
    from safetensors.numpy import load_file, save_file
    directory = Path(shutil.copytree(hf_models["gpt2"][1], tmp_path / "wide"))
    tensors = load_file(str(directory / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn.weight"
    tensors[name] = np.concatenate([tensors[name], tensors[name][:, :32]], axis=1)
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"c_attn.weight' has shape \(32, 128\); jaxlm's "
                                          r"mapping reads \[\(0, 32\), \(32, 64\), \(64, 96\)\]"):
        jaxlm_model(str(directory), f"data.seq_len={LONG}")


@pytest.mark.parametrize("family,overrides,message", [
    ("bert", ["model.pre_norm=true"], "model.pre_norm=true has no BertForMaskedLM"),
    ("t5", ["model.ffn_activation=gelu"], "model.ffn_activation=gelu with model.gated_ffn"),
    ("deepseek", ["model.bias_update_rate=0"], "model.bias_update_rate=0.0 has no Deepseek"),
])
def test_exports_without_an_hf_equivalent_are_refused(family, overrides, message):
    from helpers import family_config

    from jaxlm.hf.registry import for_family
    cfg = family_config(family, *overrides)
    with pytest.raises(ConfigError, match=message):
        for_family(family).config_to_hf(cfg.model, max_positions=cfg.data.seq_len)
