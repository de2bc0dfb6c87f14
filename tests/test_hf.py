"""Hugging Face interop for the decoder families Llama, Mistral, Qwen2 and Mixtral, against
transformers itself: logits parity, HF -> jaxlm -> HF bit-identical, a jaxlm run exported and
loaded by transformers (logits and greedy generation), init_from, and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util
from hf_parity import assert_parity, hf_logits, jaxlm_model, random_tokens, save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxlm.config import ConfigError  # noqa: E402
from jaxlm.convert import export_run, import_hf  # noqa: E402

SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def _build(arch):
    torch.manual_seed(0)
    if arch == "llama":  # GQA, Llama 3.1 RoPE scaling (original context shorter than LONG)
        cfg = transformers.LlamaConfig(**SMALL, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=128))
        return transformers.LlamaForCausalLM(cfg)
    if arch == "mistral":  # a sliding window shorter than the input
        return transformers.MistralForCausalLM(transformers.MistralConfig(
            **SMALL, sliding_window=100))
    if arch == "qwen2":  # q/k/v biases, tied embeddings, MQA, YaRN (cos/sin x its factor)
        cfg = transformers.Qwen2Config(**{**SMALL, "num_key_value_heads": 1},
                                       tie_word_embeddings=True, rope_parameters=dict(
                                           rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                           original_max_position_embeddings=128))
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # HF initialises biases to zero: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return model
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **SMALL, num_local_experts=4, num_experts_per_tok=2))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """arch -> (transformers model, saved directory)."""
    out = {}
    for arch in ("llama", "mistral", "qwen2", "mixtral"):
        model = _build(arch)
        out[arch] = (model, save_hf(model, tmp_path_factory.mktemp(arch)))
    return out


@pytest.mark.parametrize("arch,scan", [("llama", True), ("llama", False), ("mistral", True),
                                       ("qwen2", False), ("mixtral", True), ("mixtral", False)])
def test_logits_match_transformers(hf_models, arch, scan):
    model, hf_dir = hf_models[arch]
    tokens = random_tokens(300)
    _, ours = jaxlm_model(hf_dir, f"model.scan_layers={str(scan).lower()}")
    assert_parity(ours(tokens), hf_logits(model, tokens))


def _tensors(directory):
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", ["qwen2", "mixtral"])
def test_hf_to_jaxlm_to_hf_is_bit_identical(hf_models, arch, tmp_path):
    _, hf_dir = hf_models[arch]
    import_hf(hf_dir, str(tmp_path / "run"), ["data.seq_len=64"])
    export_run(str(tmp_path / "run"), str(tmp_path / "out"), max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert not (tmp_path / "out" / ".partial").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f for f in files if f.endswith(".safetensors")}
    a, b = _tensors(hf_dir), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    again = transformers.AutoConfig.from_pretrained(str(tmp_path / "out"))
    assert type(again).__name__ == type(hf_models[arch][0].config).__name__


def test_a_trained_run_exports_to_transformers(tmp_path):
    """Train a jaxlm Llama a few steps, export it, load it with transformers: the logits match
    and transformers' greedy generation is jaxlm's forward argmax, token for token."""
    from helpers import tiny_config

    from jaxlm import train
    run = tmp_path / "run"
    cfg = tiny_config(f"train.run_dir={run}", "model.tie_embeddings=true")
    train.run(cfg)
    export_run(str(run), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    _, ours = jaxlm_model(str(tmp_path / "hf"))
    tokens = random_tokens(cfg.model.vocab_size, length=24)
    assert_parity(ours(tokens), hf_logits(model, tokens))
    prompt = tokens[:1, :8]
    seq = prompt
    for _ in range(12):  # greedy by full forward: no cache involved on our side
        seq = np.concatenate([seq, np.asarray(ours(seq))[:, -1:].argmax(-1)], axis=1)
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False,
                                pad_token_id=0).numpy()
    np.testing.assert_array_equal(theirs, seq)


def test_init_from_trains_from_the_hf_weights(hf_models, tmp_path):
    """model.init_from: the architecture comes from config.json and the run starts from the HF
    weights exactly (a step at lr 0 later they export bit for bit), here with fp8 matmuls:
    their amax histories start empty and stay out of the export."""
    from jaxlm import train
    from jaxlm.config import load_config
    from jaxlm.hf.export import export
    _, hf_dir = hf_models["mixtral"]
    cfg = load_config(None, [f"model.init_from={hf_dir}", f"train.run_dir={tmp_path / 'r'}",
                             "train.steps=1", "optim.lr=0", "data.seq_len=32",
                             "data.max_bytes=20000", "train.global_batch_size=8",
                             "train.eval_every=0", "train.eval_batches=1", "log.progress=false",
                             "log.tensorboard=false", "checkpoint.enabled=false",
                             "model.matmul_precision=fp8", "model.fp8_scaling=delayed"])
    assert (cfg.model.family, cfg.model.num_experts, cfg.model.num_kv_heads) == ("mixtral", 4, 2)
    out = train.run(cfg)
    assert np.isfinite(out["loss"])
    state = out["state"]
    assert any(k[-1] == "fp8_amax" for k in traverse_util.flatten_dict(state["model_state"]))
    export(cfg, {"params": state["params"], "model_state": state["model_state"]}, tmp_path / "out")
    a, b = _tensors(hf_dir), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"model.num_layers=3 differs from .*config.json \(2\)"):
        load_config(None, [f"model.init_from={hf_dir}", "model.num_layers=3"])
    with pytest.raises(ConfigError, match="model.family='gpt2', but model.init_from"):
        load_config(None, [f"model.init_from={hf_dir}", "model.family=gpt2"])


# ---------------------------------------------------------------- bad input

def _copy(hf_dir, to):
    import shutil
    shutil.copytree(hf_dir, to)
    return to


def _edit_config(directory, **changes):
    path = Path(directory) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_bad_hf_directories_get_one_clear_error(hf_models, tmp_path):
    _, hf_dir = hf_models["llama"]
    cases = []
    d = _copy(hf_dir, tmp_path / "arch")
    _edit_config(d, architectures=["FalconForCausalLM"])
    cases.append((d, r"architecture 'FalconForCausalLM' is not supported; jaxlm reads"))
    d = _copy(hf_dir, tmp_path / "rope")
    _edit_config(d, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    cases.append((d, r"rope_parameters.rope_type='dynamic' is not supported"))
    d = _copy(hf_dir, tmp_path / "act")
    _edit_config(d, hidden_act="gelu")
    cases.append((d, r"config.json: hidden_act='gelu' is not supported by jaxlm"))
    d = _copy(hf_dir, tmp_path / "shape")
    _edit_config(d, intermediate_size=64)
    cases.append((d, r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(48, 32\)"))
    d = _copy(hf_dir, tmp_path / "trunc")
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(d / "model.safetensors") - 10)
    cases.append((d, r"model.safetensors: truncated: tensor '.*' ends at byte"))
    d = _copy(hf_dir, tmp_path / "noweights")
    os.remove(d / "model.safetensors")
    cases.append((d, r"no model.safetensors or model.safetensors.index.json"))
    d = _copy(hf_dir, tmp_path / "index")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    cases.append((d, r"model-00002-of-00002.safetensors: no such file \(named by "
                     r"model.safetensors.index.json for model.norm.weight\)"))
    d = _copy(hf_dir, tmp_path / "extra")
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    cases.append((d, r"tensor 'model.layers.0.self_attn.q_proj.bias' \(and 0 more\) is not read"))
    cases.append((tmp_path / "absent", r"absent: not a directory"))
    for directory, message in cases:
        with pytest.raises(ConfigError, match=message):
            jaxlm_model(str(directory))


def test_cli_errors_are_one_line_and_write_nothing(hf_models, tmp_path):
    _, hf_dir = hf_models["llama"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jaxlm.convert", *args], capture_output=True,
                              text=True, env=env, cwd=Path(__file__).parent.parent)
    r = cli("import", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope: not a directory" in r.stderr
    assert not (tmp_path / "run").exists()
    r = cli("export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "not a jaxlm run directory" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    r = cli("import", "--hf", hf_dir)
    assert r.returncode == 2 and "--out" in r.stderr and r.stderr.count("\n") == 1


def test_sharded_load_equals_one_device(hf_models):
    """Each device gets its own slice of every tensor (fsdp x tensor x expert): the same values
    as a one-device load."""
    import jax

    from jaxlm.config import load_config
    from jaxlm.hf.load import load
    from jaxlm.parallel.sharding import make_mesh
    from jaxlm.state import build_state
    _, hf_dir = hf_models["mixtral"]
    _, one = jaxlm_model(hf_dir)
    cfg = load_config(None, [f"model.init_from={hf_dir}", "data.seq_len=64", "mesh.data=1",
                             "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"])
    mesh = make_mesh(dict(data=1, fsdp=2, tensor=2, sequence=1, expert=2, stage=1))
    spec = build_state(cfg, mesh)
    sharded = load(hf_dir, cfg.model, {"params": spec.abstract_state["params"]})["params"]
    from flax import nnx
    single = nnx.to_pure_dict(nnx.state(one, nnx.Param))
    want = dict(jax.tree_util.tree_leaves_with_path(single))
    shardings = dict(jax.tree_util.tree_leaves_with_path(spec.shardings["params"]))
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharded):
        assert leaf.sharding.is_equivalent_to(shardings[path], leaf.ndim), path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[path]))
    wq = sharded["layers"]["attn"]["wq"]
    assert len({str(s.index) for s in wq.addressable_shards}) > 1  # really split


def test_init_from_reads_the_directory_tokenizer(hf_models, tmp_path):
    """An HF directory's tokenizer.json becomes the data tokenizer unless the config names one."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxlm.config import load_config
    _, hf_dir = hf_models["llama"]
    d = tmp_path / "with_tokenizer"
    shutil.copytree(hf_dir, d)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "x": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    cfg = load_config(None, [f"model.init_from={d}"])
    assert (cfg.data.tokenizer, cfg.data.tokenizer_path) == ("huggingface",
                                                           str(d / "tokenizer.json"))
    cfg = load_config(None, [f"model.init_from={d}", "data.tokenizer=byte"])
    assert cfg.data.tokenizer == "byte"


def test_generate_from_an_hf_directory_matches_transformers_greedy(hf_models, tmp_path):
    """jaxlm.generate --hf: the HF weights and tokenizer.json loaded onto a data x tensor mesh,
    cached greedy decoding gives transformers' greedy tokens (ragged prompts, one batch)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxlm.generate.engine import Engine, Request
    from jaxlm.generate.load import load_hf
    from jaxlm.generate.sampling import SamplingConfig
    model, hf_dir = hf_models["llama"]
    d = tmp_path / "llama"
    shutil.copytree(hf_dir, d)
    vocab = {**{f"w{i}": i for i in range(299)}, "</s>": 299}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    loaded = load_hf(str(d), {"data": 2, "fsdp": 1, "tensor": 2, "sequence": 1, "expert": 1,
                              "stage": 1})
    prompts = [[5, 17, 33, 2, 9, 101], [44, 3]]
    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    got = Engine(loaded.lm).generate([Request(p, greedy) for p in prompts])
    for prompt, out in zip(prompts, got):
        with torch.no_grad():
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert list(out.ids) == theirs.tolist()
