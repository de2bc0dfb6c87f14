"""A trained run as something to generate from: its config (config.yaml), the parameters of one
checkpoint (only params and model state are read, never the optimizer), its tokenizer (the data
config's), on a mesh given as axis sizes. Every problem is a ConfigError naming the file/flag."""
from __future__ import annotations

import dataclasses

import jax

from jaxlm.config import ConfigError, MESH_AXES
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.generate.lm import LM
from jaxlm.parallel.sharding import make_mesh
from jaxlm.state import abstract_weights


@dataclasses.dataclass
class Loaded:
    lm: LM
    tokenizer: object
    step: int
    config: object   # the run's full Config


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """'data=2,tensor=4' -> axis sizes (the others 1); None: one device."""
    if not text:
        return None
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--mesh {text!r}: expected axis=size pairs like data=2,tensor=4 "
                              f"with axes from {', '.join(MESH_AXES)}")
        sizes[name.strip()] = int(value)
    return sizes


def mesh_of(sizes: dict[str, int] | None):
    devices = jax.devices()
    if sizes is None:
        return make_mesh(dict.fromkeys(MESH_AXES, 1), devices[:1])
    n = 1
    for v in sizes.values():
        n *= v
    if n > len(devices):
        raise ConfigError(f"--mesh needs {n} devices, but {len(devices)} are available")
    return make_mesh(sizes, devices[:n])


def load_run(run_dir: str, step: int | None = None, mesh_sizes=None, cache_dtype=None,
             quantize: str | None = None) -> Loaded:
    """The run's model at checkpoint `step` (None: the latest) on the mesh, with its tokenizer."""
    from jaxlm.checkpoint import read_run_config, restore_variables, run_step_dir
    cfg = read_run_config(run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    step, step_dir = run_step_dir(run_dir, cfg, step)
    mesh = mesh_of(mesh_sizes)
    rules = cfg.mesh.rules
    abstract_state = abstract_weights(cfg.model, mesh, rules)
    state = restore_variables(step_dir, abstract_state)
    context = cfg.data.seq_len if getattr(cfg.model, "max_positions", None) is None else None
    return from_parts(cfg.model, state, tokenizer, mesh=mesh, rules=rules, context_len=context,
                      cache_dtype=cache_dtype, step=step, config=cfg, quantize=quantize)


def load_hf(hf_dir: str, mesh_sizes=None, cache_dtype=None, quantize: str | None = None
            ) -> Loaded:
    """A Hugging Face model directory (jaxlm.hf): its weights loaded straight onto the mesh,
    its tokenizer.json, its max_position_embeddings as the context (RoPE models)."""
    from jaxlm.config import load_config
    from jaxlm.hf.load import load
    from jaxlm.hf.registry import read_config
    cfg = load_config(None, [f"model.init_from={hf_dir}"])
    if cfg.data.tokenizer != "huggingface":
        raise ConfigError(f"--hf {hf_dir}: no tokenizer.json in it (generation needs the "
                          f"model's tokenizer)")
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    mesh = mesh_of(mesh_sizes)
    state = load(hf_dir, cfg.model, abstract_weights(cfg.model, mesh, cfg.mesh.rules))
    context = None
    if getattr(cfg.model, "max_positions", None) is None:
        context = read_config(hf_dir)[1].values.get("max_position_embeddings") or None
    return from_parts(cfg.model, state, tokenizer, mesh=mesh, rules=cfg.mesh.rules,
                      context_len=context, cache_dtype=cache_dtype, config=cfg,
                      quantize=quantize)


def from_parts(model_cfg, state, tokenizer, *, mesh=None, rules=None, context_len=None,
               cache_dtype=None, step: int = 0, config=None, quantize=None) -> Loaded:
    """The seam every loader feeds (a run directory above; a Hugging Face import later): a
    model config, its variables ({'params', 'model_state'} or one nnx pure dict) and a
    tokenizer (jaxlm.data.tokenizer interface) -> what the CLI generates from."""
    mesh = mesh if mesh is not None and mesh.size > 1 else None
    lm = LM.of(model_cfg, state, mesh=mesh, rules=rules, context_len=context_len,
               cache_dtype=cache_dtype, decoder_start_id=getattr(tokenizer, "pad_id", 0),
               quantize=quantize)
    return Loaded(lm, tokenizer, step, config)
