"""Loading Hugging Face weights into a jaxlm state, sharded and streamed: each HF tensor is copied
from its memory-mapped shard onto the devices in the file's own layout, split over them (so each
process reads only its devices' share, and no process holds the whole model), and the
transposes, reshapes and stacking into jaxlm's layout run on the devices, straight into the
target shardings. On the host that is a plain copy of contiguous bytes per device, which keeps
the loader at the disk's speed rather than a host transpose's."""
from __future__ import annotations

import concurrent.futures
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.hf import registry
from jaxlm.hf.files import HFError, Weights
from jaxlm.hf.layout import Layout
from jaxlm.nn.fp8 import AMAX_KEY


def _flat(tree, prefix=()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def _unflat(flat: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _name(path) -> str:
    return ".".join(map(str, path))


def check(weights: Weights, layout: Layout, targets: dict[tuple, jax.ShapeDtypeStruct]) -> None:
    """Every target leaf is mapped, every mapped tensor exists with the shape the leaf needs,
    and every tensor in the files is read (or known to be skippable): one HFError otherwise."""
    for path in targets:
        if path not in layout.leaves:
            raise HFError(f"{weights.dir}: nothing in the weights maps to jaxlm's {_name(path)} "
                          f"(a model config the weights do not match?)")
    for path, pieces in layout.leaves.items():
        if path not in targets:
            raise HFError(f"{weights.dir}: the mapping names {_name(path)}, which this jaxlm "
                          f"model does not have")
        target = targets[path]
        lead = len(next(iter(pieces)))
        want = [tuple(ix) for ix in np.ndindex(*target.shape[:lead])]
        if sorted(pieces) != want:
            raise HFError(f"{weights.dir}: jaxlm's {_name(path)} {target.shape} needs "
                          f"{len(want)} tensors, the mapping has {len(pieces)}")
        for piece in pieces.values():
            if piece.hf not in weights:
                raise HFError(f"{weights.dir}: missing tensor {piece.hf!r} (for jaxlm's "
                              f"{_name(path)})")
            try:
                shape = piece.read(weights.view(piece.hf)).shape
            except ValueError:
                shape = None
            if shape != target.shape[lead:]:
                raise HFError(f"{weights.dir}: tensor {piece.hf!r} has shape "
                              f"{weights.shape(piece.hf)}, which does not give jaxlm's "
                              f"{_name(path)} its shape {target.shape[lead:]} (config.json and "
                              f"the weights disagree?)")
    _check_blocks(weights, layout)
    used = set(layout.hf_names())
    extra = [n for n in weights.names if n not in used and not layout.is_ignored(n)]
    if extra:
        raise HFError(f"{weights.dir}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not "
                      f"read by jaxlm's mapping; refusing to drop weights silently")


def _check_blocks(weights: Weights, layout: Layout) -> None:
    """A fused tensor's blocks (GPT-2's q|k|v) must tile it exactly: a wider tensor than the
    config implies would otherwise be read in part, its extra columns dropped silently."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for slot in layout.leaves.values():
        for piece in slot.values():
            if piece.block is not None:
                spans.setdefault(piece.hf, []).append(piece.block)
    for name, blocks in spans.items():
        axis = blocks[0][0]
        size = weights.shape(name)[axis]
        ends = sorted({(start, stop) for _, start, stop in blocks})
        tiled = (all(a == axis for a, _, _ in blocks) and ends[0][0] == 0 and ends[-1][1] == size
                 and all(prev[1] == nxt[0] for prev, nxt in zip(ends, ends[1:])))
        if not tiled:
            raise HFError(f"{weights.dir}: tensor {name!r} has shape {weights.shape(name)}; "
                          f"jaxlm's mapping reads {ends} of its axis {axis} "
                          f"(config.json and the weights disagree?)")


def _in_file_layout(weights: Weights, name: str, mesh) -> jax.Array:
    """HF tensor `name` on the mesh's devices as it is in the file, its first axis split over
    all of them where it divides (else replicated): each process copies only its devices' rows,
    contiguous bytes of the memory map, with no transpose on the host."""
    view = weights.view(name)
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    split = view.ndim and axes and view.shape[0] % math.prod(mesh.shape[a] for a in axes) == 0
    sharding = NamedSharding(mesh, P(axes) if split else P())
    return jax.make_array_from_callback(view.shape, sharding, lambda ix: np.array(view[ix]))


def _leaf(weights: Weights, pieces, target: jax.ShapeDtypeStruct):
    """One state leaf: its HF tensors onto the devices in file layout, then the transforms
    (transposes, reshapes, block slices) and the stacking over layers/experts run on the
    devices, and the result is moved into the target sharding."""
    keys = sorted(pieces)
    hf = {n: _in_file_layout(weights, n, target.sharding.mesh)
          for n in dict.fromkeys(pieces[k].hf for k in keys)}

    # op by op, not one jit per leaf: the same few shapes recur over layers and leaves, so
    # their compiled ops are reused (a jit per leaf compiled one program per leaf)
    parts = [pieces[k].read(hf[pieces[k].hf]).astype(target.dtype) for k in keys]
    leaf = jnp.stack(parts).reshape(target.shape) if keys[0] else parts[0]
    return jax.jit(lambda x: x, out_shardings=target.sharding)(leaf)


def load(hf_dir: str | Path, model_cfg, abstract_weights: dict) -> dict:
    """{'params': ..., 'model_state': ...} from an HF directory, with the shapes, dtypes and
    shardings of `abstract_weights` (the train state's abstract subtrees of those names)."""
    weights = Weights(hf_dir)
    layout = registry.for_family(model_cfg.family).layout(model_cfg).resolved(weights)
    targets = _flat(abstract_weights)
    # training state with no HF counterpart: delayed fp8 scaling's amax histories start empty
    fresh = {path: jax.jit(lambda t=t: jnp.zeros(t.shape, t.dtype), out_shardings=t.sharding)()
             for path, t in targets.items() if path[-1] == AMAX_KEY}
    targets = {path: t for path, t in targets.items() if path not in fresh}
    check(weights, layout, targets)
    # Leaves in parallel: reading one shard's pages overlaps transferring another's. With
    # several processes, in one order: every leaf's reshard is a collective that all processes
    # must enter in the same sequence (threads would interleave them differently: a deadlock).
    workers = min(16, os.cpu_count() or 1) if jax.process_count() == 1 else 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        arrays = {path: pool.submit(_leaf, weights, layout.leaves[path], target)
                  for path, target in targets.items()}
        return _unflat({**fresh, **{path: f.result() for path, f in arrays.items()}})
