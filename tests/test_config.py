"""Config loading and validation: every kind of bad input fails with one clear line and exit code 2.

Fast by design: nothing here builds a model or trains. Device-dependent checks call
`check_against_devices(cfg, 8)` directly (and `main()`, which raises them before any model exists).
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxlm.config import (DEFAULT_RULES, Config, ConfigError, all_keys, check_against_devices,
                          diff_from_defaults, dump_yaml, flatten, from_yaml_file, load_config,
                          to_dict)
from jaxlm.train import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
MESH = REPO / "configs" / "mesh"


@dataclasses.dataclass
class Case:
    id: str
    overrides: list
    expect: list                                # substrings of the message ({tmp}: tmp_path)
    files: dict = dataclasses.field(default_factory=dict)     # name -> text, written under tmp
    configs: list = dataclasses.field(default_factory=list)   # --config paths ({tmp} allowed)


def _param(case):
    return pytest.param(case, id=case.id)


# Cases that fail while loading (files, overrides, per-field and cross-field checks).
LOAD_CASES = [
    # ---- unknown keys, with the closest valid key suggested
    Case("unknown-nested", ["model.num_layer=3"],
         ["command line: unknown key 'model.num_layer'", "did you mean 'model.num_layers'?"]),
    Case("unknown-section", ["trian.steps=3"],
         ["unknown key 'trian.steps'", "did you mean 'train.steps'?"]),
    Case("unknown-section-and-key", ["optm.lr=0.1"],
         ["unknown key 'optm.lr'", "did you mean 'optim.lr'?"]),
    Case("unknown-top-level-leaf", ["steps=3"],
         ["unknown key 'steps'", "did you mean 'train.steps'?"]),
    Case("unknown-section-scalar", ["trian=3"],
         ["unknown key 'trian'", "did you mean 'train'?"]),
    Case("unknown-key-in-file", [], ["{tmp}/bad.yaml: unknown key 'model.num_layer'",
                                     "did you mean 'model.num_layers'?"],
         files={"bad.yaml": "model:\n  d_model: 128\n  num_layer: 3\n"},
         configs=["{tmp}/bad.yaml"]),
    Case("unknown-section-in-file", [], ["{tmp}/bad.yaml: unknown key 'trian.steps'",
                                         "did you mean 'train.steps'?"],
         files={"bad.yaml": "trian:\n  steps: 3\n  seed: 1\n"}, configs=["{tmp}/bad.yaml"]),
    # ---- wrong types
    Case("str-for-int", ["train.steps=abc"], ["train.steps: expected an integer, got 'abc'"]),
    Case("bool-for-int", ["train.steps=true"], ["train.steps: expected an integer, got True"]),
    Case("float-for-int", ["train.steps=3.5"], ["train.steps: expected an integer, got 3.5"]),
    Case("list-for-float", ["optim.lr=[1, 2]"], ["optim.lr: expected a number, got [1, 2]"]),
    Case("bool-for-float", ["optim.lr=false"], ["optim.lr: expected a number, got False"]),
    Case("mapping-for-scalar", ["model.d_model={a: 1}"],
         ["model.d_model: expected an integer, got {'a': 1}"]),
    Case("key-below-a-scalar", ["model.num_layers.x=3"],
         ["model.num_layers: expected an integer, got {'x': 3}"]),
    Case("int-for-bool", ["checkpoint.enabled=1"],
         ["checkpoint.enabled: expected true/false, got 1"]),
    Case("int-for-str", ["train.run_dir=5"], ["train.run_dir: expected a string, got 5"]),
    Case("str-for-optional-float", ["log.peak_tflops=fast"],
         ["log.peak_tflops: expected a number, got 'fast'"]),
    Case("scalar-for-list", ["mesh.rules=5"], ["mesh.rules: expected a list, got 5"]),
    Case("scalar-for-section", ["model=3"], ["'model' is a section; expected a mapping, got 3"]),
    Case("scalar-for-section-in-file", [],
         ["{tmp}/bad.yaml: 'train' is a section; expected a mapping, got 5"],
         files={"bad.yaml": "train: 5\n"}, configs=["{tmp}/bad.yaml"]),
    Case("wrong-type-in-file", [], ["{tmp}/bad.yaml: train.steps: expected an integer, got 'ten'"],
         files={"bad.yaml": "train:\n  steps: ten\n"}, configs=["{tmp}/bad.yaml"]),
    # ---- out of range / not among the allowed values
    Case("negative-steps", ["train.steps=-5"], ["train.steps: -5 is below the minimum 1"]),
    Case("eval-fraction-too-big", ["data.eval_fraction=0.9"],
         ["data.eval_fraction: 0.9 is above the maximum 0.5"]),
    Case("beta-above-one", ["optim.b2=1.5"], ["optim.b2: 1.5 is above the maximum 1.0"]),
    Case("nan-lr", ["optim.lr=.nan"], ["optim.lr: nan is not a finite number"]),
    Case("inf-lr", ["optim.lr=.inf"], ["optim.lr: inf is not a finite number"]),
    Case("mesh-axis-below-fill", ["mesh.data=-2"], ["mesh.data: -2 is below the minimum -1"]),
    Case("mesh-axis-zero", ["mesh.tensor=0"], ["mesh.tensor: 0 is not a valid size", ">= 1"]),
    Case("attention-choice", ["model.attention_impl=flash"],
         ["model.attention_impl: 'flash' is not one of: xla, cudnn, pallas, auto"]),
    Case("renamed-key", ["model.attention=xla"],
         ["command line: 'model.attention' was renamed to 'model.attention_impl'"]),
    Case("renamed-key-in-file", [],
         ["{tmp}/old.yaml: 'model.attention' was renamed to 'model.attention_impl'"],
         files={"old.yaml": "model:\n  attention: auto\n"}, configs=["{tmp}/old.yaml"]),
    # ---- model families: each has its own keys
    Case("unknown-family", ["model.family=gpt3"],
         ["model.family: 'gpt3' is not one of: bert, deepseek, gpt2, llama, mixtral, t5"]),
    Case("key-of-another-family", ["model.num_experts=8"],
         ["unknown key 'model.num_experts' for model.family=llama; it belongs to "
          "model.family=deepseek or mixtral"]),
    Case("family-not-a-string", ["model.family=3"],
         ["model.family: expected a string, got 3"]),
    Case("data-source-choice", ["data.source=c4"],
         ["data.source: 'c4' is not one of: stdlib, synthetic"]),
    # ---- files
    Case("missing-file", [], ["{tmp}/nope.yaml: config file not found"],
         configs=["{tmp}/nope.yaml"]),
    Case("malformed-yaml-line-4", [],
         ["{tmp}/bad.yaml:4: malformed YAML", "mapping values are not allowed here"],
         files={"bad.yaml": "# comment\nmodel:\n  d_model: 128\n  num_layers: a: b\n"
                            "train:\n  steps: 3\n"},
         configs=["{tmp}/bad.yaml"]),
    Case("malformed-yaml-line-7", [],
         ["{tmp}/bad.yaml:7: malformed YAML", "'\\t'"],
         files={"bad.yaml": "model:\n  d_model: 128\n\ntrain:\n  steps: 3\n  eval_every: 5\n"
                            "\tseed: 1\n"},
         configs=["{tmp}/bad.yaml"]),
    Case("malformed-unclosed-bracket", [],  # found at the end; names where the [ opened
         ["{tmp}/bad.yaml:4: malformed YAML", "flow sequence that starts on line 3"],
         files={"bad.yaml": "model:\n  d_model: 128\ntrain: [1, 2\n"},
         configs=[TINY, "{tmp}/bad.yaml"]),
    Case("top-level-list", [],
         ["{tmp}/list.yaml: expected a mapping of sections", "got list"],
         files={"list.yaml": "- model\n- train\n"}, configs=["{tmp}/list.yaml"]),
    Case("top-level-scalar", [], ["{tmp}/s.yaml: expected a mapping of sections", "got str"],
         files={"s.yaml": "just some text\n"}, configs=["{tmp}/s.yaml"]),
    Case("duplicate-key", [], ["{tmp}/dup.yaml:4: duplicate key 'steps' (already set on line 2)"],
         files={"dup.yaml": "train:\n  steps: 3\n  seed: 1\n  steps: 5\n"},
         configs=["{tmp}/dup.yaml"]),
    Case("duplicate-section", [], ["{tmp}/dup.yaml:3: duplicate key 'model' (already set on "
                                   "line 1)"],
         files={"dup.yaml": "model:\n  d_model: 64\nmodel:\n  num_layers: 2\n"},
         configs=["{tmp}/dup.yaml"]),
    Case("empty-file", [], ["{tmp}/empty.yaml: empty config file"],
         files={"empty.yaml": ""}, configs=["{tmp}/empty.yaml"]),
    Case("comments-only-file", [], ["{tmp}/c.yaml: empty config file"],
         files={"c.yaml": "# nothing here yet\n"}, configs=[TINY, "{tmp}/c.yaml"]),
    Case("not-utf8", [], ["{tmp}/bin.yaml: cannot read config file", "utf-8"],
         files={"bin.yaml": b"\xff\xfe\x00model: 1\n"}, configs=["{tmp}/bin.yaml"]),
    # ---- override syntax
    Case("override-without-equals", ["train.steps100"],
         ["override 'train.steps100': expected key=value"]),
    Case("override-empty-key", ["=3"], ["override '=3': empty key part"]),
    Case("override-trailing-dot", ["model.=3"], ["override 'model.=3': empty key part"]),
    # ---- relations between fields
    Case("heads-vs-kv-heads", ["model.num_heads=4", "model.num_kv_heads=3"],
         ["model.num_heads=4 is not divisible by model.num_kv_heads=3"]),
    Case("d-model-vs-heads", ["model.d_model=130"],
         ["model.d_model=130 is not divisible by model.num_heads=4", "model.head_dim"]),
    Case("odd-head-dim", ["model.head_dim=3"],
         ["head dim 3 (model.head_dim=3) must be even for RoPE"]),
    Case("odd-resolved-head-dim", ["model.d_model=12"],
         ["head dim 3 (model.d_model=12 / model.num_heads=4) must be even"]),
    Case("batch-vs-microbatches", ["train.global_batch_size=10", "train.microbatches=3"],
         ["train.global_batch_size=10 is not divisible by train.microbatches=3"]),
    Case("two-fill-axes", ["mesh.fsdp=-1"],  # data is -1 by default
         ["mesh: only one axis may be -1 (fill), got data, fsdp"]),
    Case("rule-unknown-axis", ["mesh.rules=[[batch, data], [embed, fsdp], [mlp, tensr]]"],
         ["mesh.rules[2]: unknown mesh axis 'tensr' for 'mlp'", "mesh axes are data, stage"]),
    Case("rule-unknown-axis-in-list", ["mesh.rules=[[batch, [data, fsdp, gpu]]]"],
         ["mesh.rules[0]: unknown mesh axis 'gpu' for 'batch'"]),
    Case("rule-too-short", ["mesh.rules=[[batch]]"],
         ["mesh.rules[0]: expected [logical_name, mesh_axis", "got ['batch']"]),
    Case("rule-not-a-list", ["mesh.rules=[[embed, fsdp], batch]"],
         ["mesh.rules[1]: expected [logical_name", "got 'batch'"]),
    Case("rule-name-not-str", ["mesh.rules=[[1, data]]"],
         ["mesh.rules[0]: expected [logical_name", "got [1, 'data']"]),
]

# Cases that load fine but do not fit 8 devices (tiny.yaml: data=-1 x fsdp=2, batch 16, seq 128).
# ok_devices: a device count the same config does fit, showing the check is about devices.
DEVICE_CASES = [
    (Case("mesh-product-too-small", ["mesh.data=2", "mesh.fsdp=2"],
          ["mesh: data=2 x fsdp=2 = 4 devices, but 8 are available"]), 4),
    (Case("mesh-product-too-big", ["mesh.data=4", "mesh.fsdp=4"],
          ["mesh: data=4 x fsdp=4 = 16 devices, but 8 are available"]), 16),
    (Case("fill-does-not-divide", ["mesh.fsdp=3"],
          ["mesh: fixed axes multiply to 3", "8 devices", "mesh.data=-1"]), None),
    (Case("batch-vs-data-parallel", ["train.global_batch_size=12"],
          ["train.global_batch_size=12", "not divisible by the data-parallel size",
           "data*fsdp*expert=8"]), 4),
    (Case("microbatch-vs-data-parallel", ["train.microbatches=4"],
          ["train.microbatches=4 = 4 rows per microbatch", "data*fsdp*expert=8"]), 4),
    (Case("seq-vs-sequence-axis", ["mesh.data=1", "mesh.fsdp=2", "mesh.sequence=4",
                                   "data.seq_len=130"],
          ["data.seq_len=130 is not divisible by mesh.sequence=4"]), None),
    (Case("seq-vs-filled-sequence-axis", ["mesh.data=1", "mesh.fsdp=2", "mesh.sequence=-1",
                                          "data.seq_len=102"],
          ["data.seq_len=102 is not divisible by mesh.sequence=4"]), 2),
]


def _materialize(case, tmp_path):
    """Write the case's files; return (config paths, overrides, expected substrings)."""
    for name, text in case.files.items():
        p = tmp_path / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    fmt = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    return [fmt(c) for c in case.configs], list(case.overrides), [fmt(e) for e in case.expect]


def _argv(configs, overrides):
    return [a for c in configs for a in ("--config", c)] + overrides


def _assert_one_error_line(capsys, expected_message):
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    assert err.endswith("\n") and err.count("\n") == 1, f"not exactly one line: {err!r}"
    assert err == f"error: {expected_message}\n"
    return out


def test_case_ids_unique():
    ids = [c.id for c in LOAD_CASES] + [c.id for c, _ in DEVICE_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", [_param(c) for c in LOAD_CASES])
def test_bad_input_fails_in_load_config(case, tmp_path, capsys):
    configs, overrides, expect = _materialize(case, tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(configs, overrides)
    msg = str(info.value)
    for e in expect:
        assert e in msg, f"{e!r} not in {msg!r}"
    assert "\n" not in msg
    # the same input through the command line: exit code 2, one line on stderr, nothing else
    assert main(_argv(configs, overrides)) == 2
    out = _assert_one_error_line(capsys, msg)
    assert out == ""


@pytest.mark.parametrize("case,ok_devices", [pytest.param(c, n, id=c.id) for c, n in DEVICE_CASES])
def test_bad_input_fails_against_devices(case, ok_devices, tmp_path, capsys):
    _, overrides, expect = _materialize(case, tmp_path)
    run_dir = tmp_path / "run"
    overrides = overrides + [f"train.run_dir={run_dir}"]
    cfg = load_config([TINY], overrides)  # fine on its own: the problem is the device count
    with pytest.raises(ConfigError) as info:
        check_against_devices(cfg, 8)
    msg = str(info.value)
    for e in expect:
        assert e in msg, f"{e!r} not in {msg!r}"
    if ok_devices is not None:
        sizes = check_against_devices(cfg, ok_devices)
        assert _prod(sizes.values()) == ok_devices
    # through main(): it fails before any model, data or run directory is made
    assert main(["--config", TINY] + overrides) == 2
    _assert_one_error_line(capsys, msg)
    assert not run_dir.exists()


def _prod(xs):
    p = 1
    for x in xs:
        p *= x
    return p


def test_device_check_resolves_fill():
    assert check_against_devices(load_config([TINY]), 8) == {
        "data": 4, "stage": 1, "fsdp": 2, "sequence": 1, "expert": 1, "tensor": 1}
    cfg = load_config([TINY, str(MESH / "fsdp_tp.yaml")])
    assert check_against_devices(cfg, 8) == {
        "data": 1, "stage": 1, "fsdp": 4, "sequence": 1, "expert": 1, "tensor": 2}
    # the mesh in the config is left as written (-1 stays -1)
    assert cfg.mesh.fsdp == -1


def test_cli_subprocess_unknown_key():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.train", "--config", "configs/tiny.yaml", "model.num_layer=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "'model.num_layer'" in lines[0] and "did you mean 'model.num_layers'?" in lines[0]
    assert proc.stdout == ""


# ---------------------------------------------------------------- good input

def test_overrides_parse_yaml_scalars():
    cfg = load_config([TINY], [
        "optim.lr=1e-3",                      # PyYAML alone reads this as a string
        "optim.eps=1E-12",
        "log.peak_tflops=5",
        "log.peak_tflops=null",               # later overrides win; null clears an optional
        "model.tie_embeddings=true",
        "model.rope_theta=500000",            # an int is accepted for a float field
        "optim.clip_norm=0",
        "train.run_dir=runs/a=b",             # only the first '=' separates key and value
        "runtime.compilation_cache=/tmp/cc",
        "mesh.rules=[[batch, [data, fsdp]], [embed, null], [mlp, tensor]]",
        " train.steps =7",
    ])
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.optim.eps == 1e-12 and type(cfg.optim.eps) is float
    assert cfg.log.peak_tflops is None
    assert cfg.model.tie_embeddings is True
    assert cfg.model.rope_theta == 500000.0 and type(cfg.model.rope_theta) is float
    assert cfg.optim.clip_norm == 0.0 and type(cfg.optim.clip_norm) is float
    assert cfg.train.run_dir == "runs/a=b"
    assert cfg.runtime.compilation_cache == "/tmp/cc"
    assert cfg.mesh.rules == [["batch", ["data", "fsdp"]], ["embed", None], ["mlp", "tensor"]]
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    # untouched values still come from tiny.yaml
    assert cfg.model.d_model == 128 and cfg.model.num_kv_heads == 2

    cfg = load_config([], ["log.peak_tflops=989.5", "train.steps=12"])
    assert cfg.log.peak_tflops == 989.5 and cfg.train.steps == 12


def test_exponent_floats_in_yaml_files(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("optim:\n  lr: 3e-4\n  eps: 1e-10\nmodel:\n  rope_theta: 5e5\n")
    cfg = load_config([str(p)])
    assert (cfg.optim.lr, cfg.optim.eps, cfg.model.rope_theta) == (3e-4, 1e-10, 5e5)


def test_later_config_files_override_earlier():
    fsdp = str(MESH / "fsdp.yaml")
    cfg = load_config([TINY, fsdp])
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, -1, 1)
    assert cfg.model.d_model == 128 and cfg.train.steps == 300  # the rest of tiny.yaml stays
    assert check_against_devices(cfg, 8)["fsdp"] == 8
    cfg = load_config([fsdp, TINY])  # the other order: tiny.yaml's mesh wins
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (-1, 2)
    cfg = load_config([TINY, fsdp], ["mesh.fsdp=4", "mesh.data=2"])  # overrides win over files
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (2, 4)


def test_diff_from_defaults_lists_exactly_the_changed_keys():
    assert diff_from_defaults(Config()) == {}
    rules = [["batch", "data"], ["embed", None]]
    cfg = load_config([], ["train.steps=7", "model.num_kv_heads=2", "optim.lr=1e-3",
                           "train.eval_every=200",          # == default: not a change
                           "mesh.rules=[[batch, data], [embed, null]]"])
    default_rules = [list(r) for r in DEFAULT_RULES]
    assert diff_from_defaults(cfg) == {
        "train.steps": (1000, 7),
        "model.num_kv_heads": (4, 2),
        "optim.lr": (3e-4, 1e-3),
        "mesh.rules": (default_rules, rules),
    }

    # tiny.yaml: exactly the keys it sets to a non-default value
    written = flatten(yaml.safe_load(Path(TINY).read_text()))
    defaults = flatten(to_dict(Config()))
    expected = {k: (defaults[k], v) for k, v in written.items() if defaults[k] != v}
    assert "model.d_model" in expected and "model.vocab_size" not in expected  # 512 is default
    assert len(expected) >= 10
    assert diff_from_defaults(load_config([TINY])) == expected


def test_dump_yaml_round_trip(tmp_path):
    cfg = load_config([TINY, str(MESH / "fsdp_tp.yaml")], [
        "optim.lr=1e-3", "optim.eps=1e-12", "log.peak_tflops=989.5",
        "runtime.compilation_cache=/tmp/cc", "model.tie_embeddings=true",
        "train.run_dir='runs/with: colon # and hash'", "model.attention_impl=cudnn",
        "mesh.rules=[[batch, [data, fsdp]], [act_seq, sequence], [norm, null]]"])
    assert len(diff_from_defaults(cfg)) > 15
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)  # plain YAML readers see the same values
    path = tmp_path / "config.yaml"
    path.write_text(text)
    back = from_yaml_file(str(path))
    assert back == cfg and back.train.run_dir == "runs/with: colon # and hash"
    assert type(back.optim.lr) is float and type(back.train.steps) is int
    assert dump_yaml(back) == text
    # the defaults too: every key is written out
    path.write_text(dump_yaml(Config()))
    assert from_yaml_file(str(path)) == Config()
    assert set(flatten(yaml.safe_load(path.read_text()))) == set(all_keys())


CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml")) + sorted(
    (REPO / "configs").rglob("*.yml"))


def test_config_files_found():
    names = {str(p.relative_to(REPO)) for p in CONFIG_FILES}
    assert {"configs/tiny.yaml", "configs/mesh/fsdp.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_file_loads(path):
    cfg = load_config([str(path)])
    assert isinstance(cfg, Config)
    written = flatten(yaml.safe_load(path.read_text()) or {})
    resolved = flatten(to_dict(cfg))
    assert {k: resolved[k] for k in written} == written  # every value in the file took effect
    if path.parent.name == "mesh":  # a mesh preset on top of tiny fits the 8 test devices
        sizes = check_against_devices(load_config([TINY, str(path)]), 8)
        assert _prod(sizes.values()) == 8
