"""How a jaxlm train state's leaves and a Hugging Face checkpoint's tensors correspond.

A family's mapping (jaxlm/hf/<family>.py) fills a `Layout`: for every state leaf (a path into
{'params': ..., 'model_state': ...}) the HF tensor behind each of its stacked slices (one per
layer of a scanned stack, one per expert), with the numpy transform each way. Transforms are
views where they can be (transposes, reshapes), so a loader that slices the result reads only
the bytes it keeps. A tensor HF stores fused (GPT-2's c_attn) is several pieces, each a block
along one axis.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Path = tuple  # ('params', 'layers', 'attn', 'wq'): keys into the state's pure dicts


@dataclasses.dataclass(frozen=True)
class Piece:
    """One HF tensor (or the block [start, stop) of it along `axis`) as one jaxlm slice."""
    hf: str
    to_jaxlm: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    block: tuple[int, int, int] | None = None  # (axis, start, stop)

    def read(self, tensor: np.ndarray) -> np.ndarray:
        if self.block is not None:
            axis, start, stop = self.block
            tensor = tensor[(slice(None),) * axis + (slice(start, stop),)]
        return self.to_jaxlm(tensor)


@dataclasses.dataclass
class Layout:
    """State leaf path -> {lead index (layer, expert, ...) -> Piece}; HF names no leaf reads
    that are known and safe to skip (buffers, tied duplicates)."""
    leaves: dict[Path, dict[tuple[int, ...], Piece]] = dataclasses.field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # substrings of HF names
    # HF name -> the name a loader reads instead where the files lack it: transformers omits a
    # tensor tied to another on save (T5's lm_head when it is the token table); export writes
    # the first name always
    fallbacks: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, path: Path, piece: Piece, lead: tuple[int, ...] = ()) -> None:
        slot = self.leaves.setdefault(tuple(path), {})
        if lead in slot:
            raise ValueError(f"{'.'.join(map(str, path))}{list(lead)} mapped twice")
        slot[lead] = piece

    def hf_names(self) -> list[str]:
        """Every HF tensor the layout reads or writes, in the order first mapped."""
        return list(dict.fromkeys(p.hf for slot in self.leaves.values() for p in slot.values()))

    def is_ignored(self, name: str) -> bool:
        return any(s in name for s in self.ignored)

    def resolved(self, present) -> "Layout":
        """This layout with each fallback applied where `present` (a container of the HF
        names in the files) lacks the tensor but has its fallback."""
        swap = {a: b for a, b in self.fallbacks.items() if a not in present and b in present}
        if not swap:
            return self
        leaves = {path: {lead: dataclasses.replace(p, hf=swap.get(p.hf, p.hf))
                         for lead, p in slot.items()} for path, slot in self.leaves.items()}
        return Layout(leaves, self.ignored)


def layer_slot(stack: str, layer: int, scan: bool, per_unit: int = 1) -> tuple[Path, tuple]:
    """(path prefix, lead index) of a stack's `layer`-th block: scanned stacks stack their units
    on a leading axis, unscanned ones are lists; a unit of several blocks is a Group."""
    unit, j = divmod(layer, per_unit)
    inner = ("blocks", j) if per_unit > 1 else ()
    return (("params", stack) + inner, (unit,)) if scan else (("params", stack, unit) + inner, ())


# ---------------------------------------------------------------- transforms (HF -> jaxlm, back)

def block(piece: Piece, axis: int, start: int, stop: int) -> Piece:
    """`piece` reading only [start, stop) of its HF tensor along `axis` (a fused tensor)."""
    return dataclasses.replace(piece, block=(axis, start, stop))


def permute_last(piece: Piece, order) -> Piece:
    """`piece` with its jaxlm result's last axis reordered: jaxlm[..., j] = hf[..., order[j]]
    (DeepSeek's interleaved RoPE dims laid out rotate-half)."""
    order = np.asarray(order)
    inverse = np.argsort(order)
    return dataclasses.replace(piece, to_jaxlm=lambda t: piece.to_jaxlm(t)[..., order],
                               to_hf=lambda a: piece.to_hf(a[..., inverse]))


def same(hf: str) -> Piece:
    return Piece(hf, lambda t: t, lambda a: a)


def linear(hf: str) -> Piece:
    """torch Linear weight [out, in] <-> jaxlm [in, out]."""
    return Piece(hf, lambda t: t.T, lambda a: a.T)


def heads_in(hf: str, heads: int, head_dim: int) -> Piece:
    """q/k/v projection: [heads * head_dim, D] <-> jaxlm [D, heads, head_dim]."""
    return Piece(hf, lambda t: t.T.reshape(t.shape[1], heads, head_dim),
                 lambda a: a.reshape(a.shape[0], heads * head_dim).T)


def heads_out(hf: str, heads: int, head_dim: int) -> Piece:
    """Output projection: [D, heads * head_dim] <-> jaxlm [heads, head_dim, D]."""
    return Piece(hf, lambda t: t.T.reshape(heads, head_dim, t.shape[0]),
                 lambda a: a.reshape(heads * head_dim, a.shape[-1]).T)


def head_bias(hf: str, heads: int, head_dim: int) -> Piece:
    """[heads * head_dim] <-> jaxlm [heads, head_dim]."""
    return Piece(hf, lambda t: t.reshape(heads, head_dim), lambda a: a.reshape(-1))
