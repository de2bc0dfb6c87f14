"""Typed run configuration: one small dataclass per subsystem, loaded from YAML plus `a.b=c` overrides.

Every check that can be made before touching a device lives here, so bad input fails in one clear
line (`ConfigError`) instead of a traceback from deep inside JAX. Checks that need the device count
(mesh size, batch divisibility) live in `check_against_devices`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxlm.config_fields import ConfigError, check_field, check_fields, coerce
from jaxlm.config_schema import (  # noqa: F401  (re-exported: the public config API)
    DEFAULT_FAMILY, MESH_AXES, DEFAULT_RULES, DcnConfig, MeshConfig, PipelineConfig, DataConfig,
    MIXTURE_KEYS, OptimConfig, TrainConfig, CheckpointConfig, LogConfig, RuntimeConfig,
    DistributedConfig, Config)
from jaxlm.models.config import ModelConfig, fields_of  # noqa: F401  (ModelConfig: re-exported)
from jaxlm.models.registry import families, family

# Keys that were renamed: the old name gets one error naming the new one.
RENAMED = {"model.attention": "model.attention_impl"}


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class _Loader(yaml.SafeLoader):
    """Safe YAML, but `1e-3` is a float as in YAML 1.2 (PyYAML's 1.1 rules need `1.0e-3`), and a
    key given twice in one mapping is an error (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first:
                    raise _DuplicateKey(key, key_node.start_mark.line, first[key])
                first[key] = key_node.start_mark.line
            except TypeError:  # unhashable: SafeLoader says so below
                pass
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


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
            check_field(f"{where}.{key}", getattr(src, key), meta)
        if src.source == "mixture":
            raise ConfigError(f"{where}.source: a mixture entry cannot itself be a mixture")
        need = {"files": "path", "tokens": "path", "tfds": "tfds_name"}.get(src.source)
        if need and not getattr(src, need):
            raise ConfigError(f"{where}.source={src.source} needs {where}.{need}")


# ---------------------------------------------------------------- loading

def load_config(paths: list[str] | str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then each YAML file in order, then `a.b=c` overrides; validated. The model
    section is the dataclass of the family the last `model.family` among them names."""
    if isinstance(paths, str):
        paths = [paths]
    trees = [(path, _read_yaml(path)) for path in paths or []]
    for item in overrides:
        key, value = _parse_override(item)
        trees.append(("command line", _nest(key, value)))
    init_from = _init_from(trees)
    if init_from:
        cfg = _config_from_hf(init_from, trees)
    else:
        cfg = Config(model=family(_family_of(trees)).config())
    for source, tree in trees:
        _apply_tree(cfg, tree, source=source)
    if init_from:
        _check_hf_fields(cfg, init_from)
    validate(cfg)
    return cfg


def _init_from(trees) -> str:
    found = ""
    for _, tree in trees:
        model = tree.get("model") if isinstance(tree, dict) else None
        if isinstance(model, dict) and model.get("init_from"):
            found = str(model["init_from"])
    return found


def _config_from_hf(hf_dir: str, trees) -> Config:
    """model.init_from: the model section starts from the HF config's fields (its family too),
    and the data section reads the directory's tokenizer unless the config names one."""
    from jaxlm.hf.registry import model_fields
    fields = model_fields(hf_dir)
    name = fields.pop("family")
    named = _family_of(trees, default=name)
    if named != name:
        raise ConfigError(f"model.family={named!r}, but model.init_from={hf_dir} holds a "
                          f"{name!r} model")
    cfg = Config(model=family(name).config(**fields))
    tokenizer = Path(hf_dir) / "tokenizer.json"
    sets_tokenizer = any(isinstance(t.get("data"), dict) and "tokenizer" in t["data"]
                         for _, t in trees if isinstance(t, dict))
    if tokenizer.is_file() and not sets_tokenizer:
        cfg.data.tokenizer, cfg.data.tokenizer_path = "huggingface", str(tokenizer)
    return cfg


def _check_hf_fields(cfg: Config, hf_dir: str) -> None:
    from jaxlm.hf.registry import model_fields
    for key, value in model_fields(hf_dir).items():
        if getattr(cfg.model, key) != value:
            raise ConfigError(f"model.{key}={getattr(cfg.model, key)!r} differs from "
                              f"{Path(hf_dir) / 'config.json'} ({value!r}); with model.init_from "
                              f"the architecture comes from there")


def _family_of(trees, default: str = DEFAULT_FAMILY) -> str:
    name = default
    for source, tree in trees:
        model = tree.get("model") if isinstance(tree, dict) else None
        if isinstance(model, dict) and "family" in model:
            name = coerce(model["family"], str, "model.family", source)
    return name


def _read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = _yaml_load(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line + 1}: duplicate key {e.key!r} (already set on line "
                          f"{e.first_line + 1}); give each key once") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and ctx_mark and mark and ctx_mark.line != mark.line:
            problem += f" ({ctx} that starts on line {ctx_mark.line + 1})"
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if tree is None:
        raise ConfigError(f"{path}: empty config file; expected a mapping of sections (model:, "
                          f"train:, ...)")
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


def _unknown_key(cfg: Config, dotted: str, source: str, value=None) -> ConfigError:
    while isinstance(value, dict) and value:  # a misspelled section: name a full key inside it
        name, value = next(iter(value.items()))
        dotted = f"{dotted}.{name}"
    if dotted in RENAMED:
        return ConfigError(f"{source}: '{dotted}' was renamed to '{RENAMED[dotted]}'")
    section, _, leaf = dotted.partition(".")
    if section == "model":
        owners = [f.name for f in families().values() if leaf in fields_of(f.config())]
        if owners:
            return ConfigError(f"{source}: unknown key '{dotted}' for model.family="
                               f"{cfg.model.family}; it belongs to model.family="
                               f"{' or '.join(owners)}")
    keys = all_keys(cfg) + [f.name for f in dataclasses.fields(Config)]
    close = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.5)
    if not close:  # fall back to matching the last component anywhere
        leaf = dotted.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.6)][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{dotted}'{hint}")


def _apply_tree(cfg: Config, tree: dict, source: str, obj=None, prefix: str = ""):
    obj = cfg if obj is None else obj
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' is a section; expected a mapping, "
                          f"got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(cfg, dotted, source, value)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply_tree(cfg, value, source, current, dotted + ".")
        else:
            setattr(obj, name, coerce(value, hints[name], dotted, source))


# ---------------------------------------------------------------- validation

def validate(cfg: Config) -> None:
    """Per-field ranges and choices, then relations between fields (no devices needed)."""
    check_fields(cfg)
    cfg.model.validate()
    cfg.model.check_seq_len(cfg.data.seq_len)
    if cfg.data.seq_len % cfg.model.loss_chunks:
        raise ConfigError(f"model.loss_chunks={cfg.model.loss_chunks} does not divide "
                          f"data.seq_len={cfg.data.seq_len} (the loss is chunked by position)")
    t = cfg.train
    if t.global_batch_size % t.microbatches:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.microbatches={t.microbatches}")
    _check_pipeline(cfg)
    fills = [a for a, n in cfg.mesh.axis_sizes().items() if n == -1]
    if len(fills) > 1:
        raise ConfigError(f"mesh: only one axis may be -1 (fill), got {', '.join(fills)}")
    zeros = [a for a, n in cfg.mesh.axis_sizes().items() if n == 0]
    if zeros:
        raise ConfigError(f"mesh.{zeros[0]}: 0 is not a valid size; axis sizes must be >= 1 "
                          f"or -1 (fill)")
    _check_rules(cfg.mesh.rules)
    _check_data(cfg.data)


def _check_pipeline(cfg: Config):
    p, m = cfg.pipeline, cfg.model
    if p.virtual_stages > 1 and p.schedule != "circular":
        raise ConfigError(f"pipeline.virtual_stages={p.virtual_stages} needs "
                          f"pipeline.schedule=circular (got {p.schedule})")
    per_step = cfg.train.global_batch_size // cfg.train.microbatches
    if per_step % p.microbatches:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} / "
                          f"train.microbatches={cfg.train.microbatches} = {per_step} rows, not "
                          f"divisible by pipeline.microbatches={p.microbatches}")
    if cfg.mesh.stage not in (1, -1) and not m.scan_layers:
        raise ConfigError(f"mesh.stage={cfg.mesh.stage} needs model.scan_layers=true: the "
                          f"pipeline splits the scanned (stacked) layer parameters over stages")


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
    cfg.model.check_mesh(sizes)
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = cfg.train.global_batch_size // cfg.train.microbatches
    if micro % batch_shards:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} / train.microbatches="
            f"{cfg.train.microbatches} = {micro} rows per microbatch, not divisible by the "
            f"data-parallel size data*fsdp*expert={batch_shards}")
    _check_pipeline_devices(cfg, sizes)
    if cfg.data.seq_len % sizes["sequence"]:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by "
                          f"mesh.sequence={sizes['sequence']}")
    _check_context_parallel(cfg, sizes)
    return sizes


def _check_context_parallel(cfg: Config, sizes: dict[str, int]):
    """What ring attention cannot serve is refused here, in one line."""
    if sizes["sequence"] == 1 or cfg.mesh.context_parallel != "ring":
        return
    how = f"mesh.sequence={sizes['sequence']} with mesh.context_parallel=ring"
    if cfg.data.seq_len % (2 * sizes["sequence"]):
        raise ConfigError(f"{how}: data.seq_len={cfg.data.seq_len} must divide into 2 x "
                          f"{sizes['sequence']} chunks (each device holds an early and a late "
                          f"one, so causal work is even)")
    if sizes["stage"] > 1:
        raise ConfigError(f"{how}: pipeline stages (mesh.stage={sizes['stage']}) do not run "
                          f"ring attention; use mesh.context_parallel=all_gather")
    if cfg.model.objective == "seq2seq":
        raise ConfigError(f"{how}: model.family={cfg.model.family} adds a relative position "
                          f"bias to its attention logits and cross-attends to the encoder, which "
                          f"ring attention does not take; use mesh.context_parallel=all_gather")


def _check_pipeline_devices(cfg: Config, sizes: dict[str, int]):
    S, p = sizes["stage"], cfg.pipeline
    if S == 1:
        return
    if not cfg.model.scan_layers:
        raise ConfigError(f"mesh.stage={S} needs model.scan_layers=true: the pipeline splits the "
                          f"scanned (stacked) layer parameters over stages")
    V = p.virtual_stages if p.schedule == "circular" else 1
    if cfg.model.num_units % (S * V):
        how = f"mesh.stage={S}" + (f" x pipeline.virtual_stages={V}" if V > 1 else "")
        raise ConfigError(f"{cfg.model.units_description()} is not divisible by {how} "
                          f"= {S * V} layer groups")
    if cfg.model.fp8_history:
        raise ConfigError(f"mesh.stage={S} with model.matmul_precision=fp8 needs "
                          f"model.fp8_scaling=current: a stage runs each layer on several "
                          f"microbatches in one program, which delayed scaling's amax "
                          f"histories cannot follow")
    if p.schedule == "1f1b" and cfg.model.has_aux_losses:
        raise ConfigError(f"pipeline.schedule=1f1b with model.family={cfg.model.family}: 1F1B's "
                          f"hand-written backward does not carry the MoE layers' aux losses; use "
                          f"pipeline.schedule=gpipe or circular")
    if p.schedule == "circular" and p.microbatches % S:
        raise ConfigError(f"pipeline.schedule=circular needs pipeline.microbatches="
                          f"{p.microbatches} to be a multiple of mesh.stage={S}")
    rows = cfg.train.global_batch_size // cfg.train.microbatches // p.microbatches
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if rows % shards:
        raise ConfigError(f"{rows} rows per pipeline microbatch (train.global_batch_size / "
                          f"train.microbatches / pipeline.microbatches) is not divisible by the "
                          f"data-parallel size data*fsdp*expert={shards}")


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
    """Keys whose value differs from the default (the model's: its own family's defaults)."""
    defaults = Config(model=type(cfg.model)())
    new, old = flatten(to_dict(cfg)), flatten(to_dict(defaults))
    return {k: (old[k], v) for k, v in new.items() if old[k] != v}


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def from_yaml_file(path: str) -> Config:
    """Re-read a config saved by `dump_yaml` (a run directory's config.yaml)."""
    return load_config([path])
