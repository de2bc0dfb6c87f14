"""Typed run configuration: one small dataclass per subsystem, loaded from YAML plus `a.b=c` overrides.

Every check that can be made before touching a device lives here, so bad input fails in one clear
line (`ConfigError`) instead of a traceback from deep inside JAX. Checks that need the device count
(mesh size, batch divisibility) live in `check_against_devices`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad user input: the message names the key or file and what was expected."""


class _Loader(yaml.SafeLoader):
    """Safe YAML, but `1e-3` is a float as in YAML 1.2 (PyYAML's 1.1 rules need `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _choices(*values):
    return {"choices": values}


def _range(lo=None, hi=None):
    return {"min": lo, "max": hi}


@dataclass
class ModelConfig:
    family: str = field(default="llama", metadata=_choices("llama"))
    vocab_size: int = field(default=512, metadata=_range(1))
    d_model: int = field(default=256, metadata=_range(1))
    num_layers: int = field(default=4, metadata=_range(1))
    num_heads: int = field(default=4, metadata=_range(1))
    num_kv_heads: int = field(default=4, metadata=_range(1))
    head_dim: int = field(default=0, metadata=_range(0))  # 0: d_model // num_heads
    ffn_dim: int = field(default=768, metadata=_range(1))
    rope_theta: float = field(default=10000.0, metadata=_range(1.0))
    norm_eps: float = field(default=1e-6, metadata=_range(0.0))
    tie_embeddings: bool = False
    init_std: float = field(default=0.02, metadata=_range(0.0))
    param_dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16"))
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16"))
    attention: str = field(default="xla", metadata=_choices("xla", "cudnn", "auto"))
    scan_layers: bool = True
    remat: str = field(default="none", metadata=_choices("none", "full", "save_dots"))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


MESH_AXES = ("data", "stage", "fsdp", "sequence", "expert", "tensor")

# Logical name -> mesh axes. First match wins; an axis already used by an earlier dimension of the
# same array, or of size 1, is skipped. Params use bare names, activations the `act_` names.
DEFAULT_RULES = [
    ["batch", ["data", "fsdp", "expert"]],
    ["act_batch", ["data", "fsdp", "expert"]],
    ["act_seq", "sequence"],
    ["act_embed", None],
    ["act_heads", "tensor"],
    ["act_kv_heads", "tensor"],
    ["act_mlp", "tensor"],
    ["act_vocab", "tensor"],
    ["layers", "stage"],
    ["embed", "fsdp"],
    ["vocab", "tensor"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["mlp", "tensor"],
    ["head_dim", None],
    ["norm", None],
]


@dataclass
class MeshConfig:
    """Sizes of the device mesh axes (-1 on one axis: fill with the remaining devices)."""
    data: int = field(default=-1, metadata=_range(-1))
    stage: int = field(default=1, metadata=_range(-1))
    fsdp: int = field(default=1, metadata=_range(-1))
    sequence: int = field(default=1, metadata=_range(-1))
    expert: int = field(default=1, metadata=_range(-1))
    tensor: int = field(default=1, metadata=_range(-1))
    rules: list = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])

    def axis_sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


@dataclass
class DataConfig:
    source: str = field(default="stdlib", metadata=_choices("stdlib", "synthetic"))
    seq_len: int = field(default=256, metadata=_range(2))
    max_bytes: int = field(default=8_000_000, metadata=_range(1024))
    eval_fraction: float = field(default=0.02, metadata=_range(0.0, 0.5))
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = field(default=3e-4, metadata=_range(0.0))
    schedule: str = field(default="cosine", metadata=_choices("cosine", "linear", "constant"))
    warmup_steps: int = field(default=100, metadata=_range(0))
    min_lr_ratio: float = field(default=0.1, metadata=_range(0.0, 1.0))
    b1: float = field(default=0.9, metadata=_range(0.0, 1.0))
    b2: float = field(default=0.95, metadata=_range(0.0, 1.0))
    eps: float = field(default=1e-8, metadata=_range(0.0))
    weight_decay: float = field(default=0.1, metadata=_range(0.0))
    clip_norm: float = field(default=1.0, metadata=_range(0.0))  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata=_range(1))
    global_batch_size: int = field(default=16, metadata=_range(1))
    microbatches: int = field(default=1, metadata=_range(1))  # gradient accumulation
    seed: int = 0
    eval_every: int = field(default=200, metadata=_range(0))  # 0: only at the end
    eval_batches: int = field(default=4, metadata=_range(1))
    run_dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = field(default=500, metadata=_range(1))
    keep: int = field(default=3, metadata=_range(1))
    async_save: bool = True
    resume: bool = True


@dataclass
class LogConfig:
    every_steps: int = field(default=10, metadata=_range(1))
    jsonl: bool = True
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: float | None = field(default=None, metadata=_range(0.0))  # per device; None: table


@dataclass
class RuntimeConfig:
    cpu_devices: int = field(default=0, metadata=_range(0))  # simulated CPU devices; 0: leave as is
    compilation_cache: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# ---------------------------------------------------------------- loading

def load_config(paths: list[str] | str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then each YAML file in order, then `a.b=c` overrides; validated."""
    if isinstance(paths, str):
        paths = [paths]
    cfg = Config()
    for path in paths or []:
        _apply_tree(cfg, _read_yaml(path), source=path)
    for item in overrides:
        key, value = _parse_override(item)
        _apply_tree(cfg, _nest(key, value), source="command line")
    validate(cfg)
    return cfg


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = _yaml_load(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and ctx_mark and mark and ctx_mark.line != mark.line:
            problem += f" ({ctx} that starts on line {ctx_mark.line + 1})"
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, train:, ...), "
                          f"got {type(tree).__name__}")
    return tree


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    if "" in key.strip().split("."):
        raise ConfigError(f"override '{item}': empty key part; expected key=value, "
                          f"e.g. train.steps=100")
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(dotted: str, value):
    tree = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


def all_keys(obj=None, prefix="") -> list[str]:
    obj = obj if obj is not None else Config()
    out = []
    for f in dataclasses.fields(obj):
        sub = getattr(obj, f.name)
        if dataclasses.is_dataclass(sub):
            out += all_keys(sub, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _unknown_key(dotted: str, source: str, value=None) -> ConfigError:
    while isinstance(value, dict) and value:  # a misspelled section: name a full key inside it
        name, value = next(iter(value.items()))
        dotted = f"{dotted}.{name}"
    keys = all_keys() + [f.name for f in dataclasses.fields(Config)]
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.5)
    if not close:  # fall back to matching the last component anywhere
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.6)][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{dotted}'{hint}")


def _apply_tree(obj, tree: dict, source: str, prefix: str = ""):
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' is a section; expected a mapping, "
                          f"got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(dotted, source, value)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply_tree(current, value, source, dotted + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], dotted, source))


def _type_name(tp) -> str:
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string",
             list: "a list", type(None): "null"}
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, key: str, source: str):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (tp is list and isinstance(value, list))
    )
    if not ok:
        raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


# ---------------------------------------------------------------- validation

def validate(cfg: Config) -> None:
    """Per-field ranges and choices, then relations between fields (no devices needed)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            _check_field(f"{section.name}.{f.name}", getattr(sub, f.name), f.metadata)
    m = cfg.model
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by "
                          f"model.num_kv_heads={m.num_kv_heads}")
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads="
                          f"{m.num_heads}; set model.head_dim explicitly")
    if m.resolved_head_dim % 2:
        how = (f"model.head_dim={m.head_dim}" if m.head_dim else
               f"model.d_model={m.d_model} / model.num_heads={m.num_heads}")
        raise ConfigError(f"head dim {m.resolved_head_dim} ({how}) must be even for RoPE")
    t = cfg.train
    if t.global_batch_size % t.microbatches:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.microbatches={t.microbatches}")
    fills = [a for a, n in cfg.mesh.axis_sizes().items() if n == -1]
    if len(fills) > 1:
        raise ConfigError(f"mesh: only one axis may be -1 (fill), got {', '.join(fills)}")
    zeros = [a for a, n in cfg.mesh.axis_sizes().items() if n == 0]
    if zeros:
        raise ConfigError(f"mesh.{zeros[0]}: 0 is not a valid size; axis sizes must be >= 1 "
                          f"or -1 (fill)")
    _check_rules(cfg.mesh.rules)


def _check_field(key, value, meta):
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{key}: {value!r} is not one of: {allowed}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} is above the maximum {hi}")


def _check_rules(rules):
    for i, rule in enumerate(rules):
        where = f"mesh.rules[{i}]"
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"{where}: expected [logical_name, mesh_axis | [mesh_axes] | null], "
                              f"got {rule!r}")
        axes = rule[1] if isinstance(rule[1], list) else [rule[1]] if rule[1] is not None else []
        for a in axes:
            if a not in MESH_AXES:
                raise ConfigError(f"{where}: unknown mesh axis {a!r} for '{rule[0]}'; "
                                  f"mesh axes are {', '.join(MESH_AXES)}")


def check_against_devices(cfg: Config, num_devices: int) -> dict[str, int]:
    """Resolve -1 in the mesh and check what depends on the device count; returns axis sizes."""
    sizes = cfg.mesh.axis_sizes()
    fixed = 1
    for n in sizes.values():
        fixed *= n if n != -1 else 1
    fill = [a for a, n in sizes.items() if n == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh: fixed axes multiply to {fixed}, which does not divide the "
                              f"{num_devices} devices available (to fill mesh.{fill[0]}=-1)")
        sizes[fill[0]] = num_devices // fixed
    product = 1
    for n in sizes.values():
        product *= n
    if product != num_devices:
        shape = " x ".join(f"{a}={n}" for a, n in sizes.items() if n != 1) or "1"
        raise ConfigError(f"mesh: {shape} = {product} devices, but {num_devices} are available")
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = cfg.train.global_batch_size // cfg.train.microbatches
    if micro % batch_shards:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} / train.microbatches="
            f"{cfg.train.microbatches} = {micro} rows per microbatch, not divisible by the "
            f"data-parallel size data*fsdp*expert={batch_shards}")
    if cfg.data.seq_len % sizes["sequence"]:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by "
                          f"mesh.sequence={sizes['sequence']}")
    return sizes


# ---------------------------------------------------------------- reporting

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_from_defaults(cfg: Config) -> dict[str, tuple[Any, Any]]:
    new, old = flatten(to_dict(cfg)), flatten(to_dict(Config()))
    return {k: (old[k], v) for k, v in new.items() if old[k] != v}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def from_yaml_file(path: str) -> Config:
    """Re-read a config saved by `dump_yaml` (a run directory's config.yaml)."""
    return load_config([path])
