"""Loading Hugging Face weights into a jaxlm state, sharded and streamed: every leaf is built
with `jax.make_array_from_callback`, so each process reads (through the memory-mapped shards)
only the slices its own devices hold, straight into the target shardings; no process ever holds
the whole model, and a leaf stacked over layers is read one layer's slice at a time."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxlm.hf import registry
from jaxlm.hf.files import HFError, Weights
from jaxlm.hf.layout import Layout


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


def _leaf(weights: Weights, pieces, target: jax.ShapeDtypeStruct):
    lead = len(next(iter(pieces)))
    dtype = np.dtype(target.dtype)

    def read(index):
        lead_ix, rest = index[:lead], index[lead:]
        ranges = [range(*s.indices(n)) for s, n in zip(lead_ix, target.shape[:lead])]
        block = np.empty([len(r) for r in ranges] + [len(range(*s.indices(n))) for s, n in
                                                      zip(rest, target.shape[lead:])], dtype)
        for out_ix in np.ndindex(*block.shape[:lead]):
            key = tuple(r[i] for r, i in zip(ranges, out_ix))
            piece = pieces[key]
            block[out_ix] = piece.read(weights.view(piece.hf))[rest]
        return block
    return jax.make_array_from_callback(target.shape, target.sharding, read)


def load(hf_dir: str | Path, model_cfg, abstract_weights: dict) -> dict:
    """{'params': ..., 'model_state': ...} from an HF directory, with the shapes, dtypes and
    shardings of `abstract_weights` (the train state's abstract subtrees of those names)."""
    weights = Weights(hf_dir)
    layout = registry.for_family(model_cfg.family).layout(model_cfg).resolved(weights)
    targets = _flat(abstract_weights)
    check(weights, layout, targets)
    return _unflat({path: _leaf(weights, layout.leaves[path], target)
                    for path, target in targets.items()})
