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
    # with scan_layers: layers per scan iteration (num_layers = fully unrolled; parameters stay
    # stacked either way, so checkpoints and the 'layers' axis do not change)
    scan_unroll: int = field(default=1, metadata=_range(1))
    remat: str = field(default="none", metadata=_choices("none", "full", "save_dots"))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


MESH_AXES = ("data", "stage", "fsdp", "sequence", "expert", "tensor")

# Logical name -> mesh axes. First match wins; an axis already used by an earlier dimension of the
# same array, or of size 1, is skipped. Params use bare names, activations the `act_` names:
# `act_res_seq` is the sequence dim of the residual stream and norms (between tensor-parallel
# regions: Megatron sequence parallelism maps it to `tensor` too), `act_seq` the sequence dim
# inside attention/MLP (context parallelism over `sequence`).
DEFAULT_RULES = [
    ["batch", ["data", "fsdp", "expert"]],
    ["act_batch", ["data", "fsdp", "expert"]],
    ["act_res_seq", "sequence"],
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
class DcnConfig:
    """How much of each mesh axis spans slices/hosts over the slower data-centre network (DCN).
    The rest of the axis stays inside a slice (ICI/NVLink), so bandwidth-hungry axes (tensor,
    fsdp) should stay 1 here and data parallelism go across."""
    data: int = field(default=1, metadata=_range(1))
    stage: int = field(default=1, metadata=_range(1))
    fsdp: int = field(default=1, metadata=_range(1))
    sequence: int = field(default=1, metadata=_range(1))
    expert: int = field(default=1, metadata=_range(1))
    tensor: int = field(default=1, metadata=_range(1))

    def num_slices(self) -> int:
        return math.prod(getattr(self, a) for a in MESH_AXES)


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
    dcn: DcnConfig = field(default_factory=DcnConfig)
    zero1: bool = False  # shard optimizer state over `data` too (params stay replicated there)
    # refuse meshes whose per-device parameter bytes exceed the ideal (total / sharding axes) by
    # more than this fraction: a rules table that silently replicates a big tensor is a bug
    max_unsharded_fraction: float = field(default=0.05, metadata=_range(0.0))

    def axis_sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in MESH_AXES}


@dataclass
class DataConfig:
    # files: `path` is a folder, file or glob of .txt/.jsonl/.parquet; tokens: `path` is a flat
    # .bin (token_dtype) or .npy of token ids; mixture: rows drawn by weight from `mixture` entries
    source: str = field(default="stdlib", metadata=_choices(
        "stdlib", "synthetic", "files", "tfds", "tokens", "mixture"))
    seq_len: int = field(default=256, metadata=_range(2))
    max_bytes: int = field(default=8_000_000, metadata=_range(1024))  # stdlib only
    eval_fraction: float = field(default=0.02, metadata=_range(0.0, 0.5))
    seed: int = 0
    path: str | None = None
    text_field: str = "text"  # jsonl/parquet field or tfds feature ("a/b" for nested features)
    tfds_name: str | None = None  # a registered or prepared dataset, e.g. "my_ds/config:1.0.0"
    tfds_split: str = "train"
    tfds_eval_split: str | None = None  # None: hold out eval_fraction of tfds_split's documents
    tfds_data_dir: str | None = None  # None: tfds's default ($TFDS_DATA_DIR, ~/tensorflow_datasets)
    token_dtype: str = field(default="uint16", metadata=_choices("uint16", "uint32"))  # .bin files
    tokenizer: str = field(default="byte", metadata=_choices("byte", "sentencepiece", "huggingface"))
    tokenizer_path: str | None = None  # sentencepiece .model or huggingface tokenizer.json
    cache_dir: str = "~/.cache/jaxlm/data"  # local corpora as tfds datasets, tokenized arrays
    mixture: list = field(default_factory=list)  # [{source: files, path: ..., weight: 0.7}, ...]
    prefetch: int = field(default=2, metadata=_range(0))  # batches read ahead on a thread

    def sources(self) -> list[tuple[DataConfig, float]]:
        """(config, weight) of each source: this config alone, or each mixture entry merged onto
        it (an entry sets source keys; seq_len, seed and the tokenizer are shared)."""
        if self.source != "mixture":
            return [(self, 1.0)]
        hints = typing.get_type_hints(DataConfig)
        out = []
        for i, entry in enumerate(self.mixture):
            where = f"data.mixture[{i}]"
            if not isinstance(entry, dict) or "source" not in entry:
                raise ConfigError(f"{where}: expected a mapping with at least 'source' and "
                                  f"'weight', got {entry!r}")
            values = {}
            for key, value in entry.items():
                if key not in MIXTURE_KEYS:
                    close = difflib.get_close_matches(str(key), MIXTURE_KEYS, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ConfigError(f"{where}: key '{key}' cannot be set per source{hint}; "
                                      f"allowed: {', '.join(MIXTURE_KEYS)}")
                values[key] = _coerce(value, float if key == "weight" else hints[key],
                                      f"{where}.{key}", "config")
            weight = values.pop("weight", None)
            if weight is None or not math.isfinite(weight) or weight <= 0:
                raise ConfigError(f"{where}.weight: expected a number > 0, got {weight!r}")
            out.append((dataclasses.replace(self, mixture=[], **values), weight))
        return out


# Keys a mixture entry may set; the rest (seq_len, seed, tokenizer, cache...) are shared.
MIXTURE_KEYS = ("source", "weight", "path", "text_field", "tfds_name", "tfds_split",
                "tfds_eval_split", "tfds_data_dir", "token_dtype", "max_bytes", "eval_fraction")


def _check_data(d: DataConfig):
    if d.source == "mixture" and not d.mixture:
        raise ConfigError("data.source=mixture needs data.mixture: a list of "
                          "{source: ..., weight: ...} entries")
    if d.mixture and d.source != "mixture":
        raise ConfigError(f"data.mixture is set but data.source={d.source}; set "
                          f"data.source=mixture to use it")
    if d.tokenizer != "byte" and not d.tokenizer_path:
        raise ConfigError(f"data.tokenizer={d.tokenizer} needs data.tokenizer_path")
    for i, (src, _) in enumerate(d.sources()):
        where = f"data.mixture[{i}]" if d.source == "mixture" else "data"
        for key, meta in ((f.name, f.metadata) for f in dataclasses.fields(DataConfig)):
            _check_field(f"{where}.{key}", getattr(src, key), meta)
        if src.source == "mixture":
            raise ConfigError(f"{where}.source: a mixture entry cannot itself be a mixture")
        need = {"files": "path", "tokens": "path", "tfds": "tfds_name"}.get(src.source)
        if need and not getattr(src, need):
            raise ConfigError(f"{where}.source={src.source} needs {where}.{need}")


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
class DistributedConfig:
    """Multi-process runs through jax.distributed (see jaxlm/distributed.py). Unset values come
    from JAXLM_COORDINATOR/JAXLM_NUM_PROCESSES/JAXLM_PROCESS_ID, then from SLURM or a Kubernetes
    Indexed Job; with none of those the run is one process."""
    # auto: as above; jax: JAX's own detection too (Cloud TPU VMs, Open MPI); off: one process
    detect: str = field(default="auto", metadata=_choices("auto", "jax", "off"))
    coordinator: str | None = None  # host:port of process 0
    coordinator_port: int = field(default=0, metadata=_range(0, 65535))  # 0: SLURM job id / 1234
    num_processes: int = field(default=0, metadata=_range(0))  # 0: from the environment
    process_id: int = field(default=-1, metadata=_range(-1))  # -1: from the environment
    init_timeout_s: int = field(default=300, metadata=_range(1))  # all processes must join by then
    heartbeat_timeout_s: int = field(default=100, metadata=_range(1))  # a silent peer is dead after
    shutdown_timeout_s: int = field(default=300, metadata=_range(1))  # wait for peers at exit


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


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
    _check_fields(cfg, "")
    m = cfg.model
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by "
                          f"model.num_kv_heads={m.num_kv_heads}")
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads="
                          f"{m.num_heads}; set model.head_dim explicitly")
    if m.num_layers % m.scan_unroll:
        raise ConfigError(f"model.scan_unroll={m.scan_unroll} does not divide "
                          f"model.num_layers={m.num_layers}")
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
    _check_data(cfg.data)


def _check_fields(obj, prefix):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{prefix}{f.name}.")
        else:
            _check_field(f"{prefix}{f.name}", value, f.metadata)


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
    for axis, n in dataclasses.asdict(cfg.mesh.dcn).items():
        if sizes[axis] % n:
            raise ConfigError(f"mesh.dcn.{axis}={n} does not divide mesh.{axis}={sizes[axis]}; "
                              f"mesh.{axis} is the total size, mesh.dcn.{axis} its share across "
                              f"slices")
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
