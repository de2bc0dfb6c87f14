"""Writing a jaxlm state as a Hugging Face directory: config.json, sharded safetensors with an
index, and the tokenizer files where the run used an HF tokenizer. Tensors are fetched one at a
time (a slice of a stacked leaf), so the host holds at most one shard file's worth; with several
processes every process takes part in fetching each tensor and writes its own share of the
shard files. Everything is written under `<out>/.partial` and moved in when all of it is there.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from jaxlm.hf import registry
from jaxlm.hf.files import finish, partial_dir, plan_shards, write_shard

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _fetch(array: jax.Array, lead: tuple) -> np.ndarray:
    """The [lead] slice of a (possibly sharded, possibly multi-process) array, on this host."""
    part = array[lead] if lead else array
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(part, tiled=True))
    return np.asarray(jax.device_get(part))


def _hf_tensor(pieces, leaves, dtype) -> np.ndarray:
    """One HF tensor from its pieces ((path, lead, Piece) each), blocks joined on their axis."""
    parts = [(p.block, p.to_hf(_fetch(leaves[path], lead))) for path, lead, p in pieces]
    if parts[0][0] is None:
        return parts[0][1].astype(dtype)
    axis = parts[0][0][0]
    return np.concatenate([a for _, a in sorted(parts, key=lambda x: x[0][1])],
                          axis=axis).astype(dtype)


def _hf_shape(pieces, leaves) -> tuple[int, ...]:
    """The HF tensor's shape without fetching anything (transforms of a zero-strided array)."""
    shapes = []
    for path, lead, p in pieces:
        leaf = leaves[path]
        shapes.append((p.block, p.to_hf(np.broadcast_to(np.zeros((), np.float32),
                                                        leaf.shape[len(lead):])).shape))
    if shapes[0][0] is None:
        return shapes[0][1]
    axis = shapes[0][0][0]
    total = list(shapes[0][1])
    total[axis] = sum(s[axis] for _, s in shapes)
    return tuple(total)


def export(cfg, weights: dict, out_dir: str | Path, dtype: str = "float32",
           max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `weights` ({'params', 'model_state'} of a run with config `cfg`) to out_dir as an
    HF model directory; returns the files written."""
    from jaxlm.hf.load import _flat
    mapping = registry.for_family(cfg.model.family)
    hf_config = mapping.config_to_hf(cfg.model, max_positions=cfg.data.seq_len)
    hf_config["dtype"] = dtype
    hf_config.update(_special_ids(cfg))
    layout = mapping.layout(cfg.model)
    leaves = _flat(weights)
    by_name: dict[str, list] = {}
    for path, slots in layout.leaves.items():
        for lead, piece in slots.items():
            by_name.setdefault(piece.hf, []).append((path, lead, piece))
    np_dtype = np.dtype(DTYPES[dtype])
    shapes = {name: _hf_shape(pieces, leaves) for name, pieces in by_name.items()}
    plan = plan_shards([(n, int(np.prod(s)) * np_dtype.itemsize) for n, s in shapes.items()],
                       max_shard_bytes)
    partial = partial_dir(out_dir)
    me, count = jax.process_index(), jax.process_count()
    for i, (file, names) in enumerate(plan.items()):
        tensors = {n: _hf_tensor(by_name[n], leaves, np_dtype) for n in names}
        if i % count == me:
            write_shard(partial, file, tensors)
        del tensors
    if count > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jaxlm: export shards written")
    extra = {"config.json": json.dumps(hf_config, indent=2, sort_keys=True)}
    if me == 0:
        finish(partial, out_dir, plan, sum(int(np.prod(s)) * np_dtype.itemsize
                                           for s in shapes.values()), extra)
        _copy_tokenizer(cfg, Path(out_dir))
    return [*plan, *extra]


def _special_ids(cfg) -> dict:
    """The run's tokenizer's pad/bos/eos ids (what generation in transformers needs); an
    encoder-decoder starts decoding from pad, as jaxlm's span corruption does."""
    from jaxlm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    ids = dict(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if cfg.model.objective == "seq2seq":
        ids["decoder_start_token_id"] = tok.pad_id
    return ids


def _copy_tokenizer(cfg, out: Path) -> None:
    if cfg.data.tokenizer != "huggingface" or not cfg.data.tokenizer_path:
        return
    src = Path(cfg.data.tokenizer_path).parent
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
