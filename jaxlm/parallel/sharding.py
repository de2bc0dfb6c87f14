"""Mesh from config, and the rules table that turns logical axis names into PartitionSpecs.

Models only ever name their axes ('embed', 'mlp', 'act_batch', ...). Which mesh axes those land on
is data (`mesh.rules`), so DP, FSDP and TP are configurations of the same model code.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config_fields import ConfigError
from jaxlm.config_schema import MESH_AXES

Rules = Sequence[Sequence]
BATCH_NAMES = ("act_batch", "act_seq")  # logical names of a [batch, seq] input array


def make_mesh(axis_sizes: dict[str, int], devices=None, dcn_sizes: dict[str, int] | None = None
              ) -> Mesh:
    """All six axes always exist (size 1 when unused), with Auto axis types, in MESH_AXES order:
    'tensor' last so it varies fastest over devices (neighbouring devices share the most traffic).

    `dcn_sizes` makes a hybrid mesh: devices are grouped into slices (by `slice_index` on TPU
    multislice, else by process, else, on one process, in consecutive blocks: a simulation), and
    axis `a` is laid out as dcn_sizes[a] slices x (axis_sizes[a] / dcn_sizes[a]) devices inside
    each, so only the DCN share of an axis ever crosses the slow network."""
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(axis_sizes[a] for a in MESH_AXES)
    dcn = tuple((dcn_sizes or {}).get(a, 1) for a in MESH_AXES)
    num_slices = math.prod(dcn)
    if num_slices == 1:
        array = np.asarray(devices).reshape(shape)
    else:
        slices = _group_into_slices(devices, num_slices)
        ici = tuple(n // d for n, d in zip(shape, dcn))
        n = len(MESH_AXES)
        # [dcn_0..dcn_5, ici_0..ici_5] -> interleave (dcn_a, ici_a) -> merge each pair
        grid = np.asarray(slices).reshape(dcn + ici)
        grid = grid.transpose([i for a in range(n) for i in (a, n + a)])
        array = grid.reshape(shape)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _group_into_slices(devices, num_slices):
    for attr in ("slice_index", "process_index"):
        keys = [getattr(d, attr, None) for d in devices]
        if None not in keys and len(set(keys)) == num_slices:
            groups = [[d for d, k in zip(devices, keys) if k == key] for key in sorted(set(keys))]
            break
    else:
        if len(devices) % num_slices:
            raise ValueError(f"{len(devices)} devices cannot form {num_slices} equal slices")
        per = len(devices) // num_slices
        groups = [devices[i * per:(i + 1) * per] for i in range(num_slices)]
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"slices have unequal device counts: {[len(g) for g in groups]}")
    return groups


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh) -> P:
    """First matching rule wins; mesh axes of size 1 or already used by this array are skipped, so
    one rules table serves every mesh shape."""
    used: set[str] = set()
    out = []
    for name in names:
        axes: list[str] = []
        if name is not None:
            for logical, target in rules:
                if logical == name:
                    targets = target if isinstance(target, (list, tuple)) else [target]
                    axes = [a for a in targets if a is not None and mesh.shape[a] > 1
                            and a not in used]
                    break
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


class _Context(threading.local):
    mesh: Mesh | None = None
    rules: Rules | None = None
    context_parallel: str = "all_gather"


_ctx = _Context()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules, context_parallel: str = "all_gather"):
    """The one context a traced step enters: makes `constrain` (and every layer that asks
    `active()`) see this mesh and rules; outside it `constrain` is the identity.
    `context_parallel`: with the sequence split over devices, attention passes K/V around a
    ring (`ring`) or lets XLA gather them whole onto every device (`all_gather`)."""
    prev = (_ctx.mesh, _ctx.rules, _ctx.context_parallel)
    _ctx.mesh, _ctx.rules = mesh, [tuple(r) for r in rules]
    _ctx.context_parallel = context_parallel
    try:
        yield
    finally:
        _ctx.mesh, _ctx.rules, _ctx.context_parallel = prev


def context_split() -> tuple[str, int]:
    """(mesh.context_parallel, devices the sequence is split over: 1 when it is not)."""
    if _ctx.mesh is None:
        return _ctx.context_parallel, 1
    return _ctx.context_parallel, mesh_axis_of("act_seq")[1]


def active() -> tuple[Mesh | None, Rules | None]:
    """(mesh, rules) while a step is traced under `use_rules`, else (None, None)."""
    return _ctx.mesh, _ctx.rules


def spans_devices(mesh: Mesh | None) -> bool:
    """Whether `mesh` shares work out over more than one device: where a kernel called on
    whole arrays must instead run per shard (under shard_map)."""
    return mesh is not None and mesh.size > 1


def mesh_axis_of(name: str) -> tuple[str | tuple[str, ...] | None, int]:
    """The mesh axis (or axes, or None) the active rules put logical dim `name` on, and its
    size (1 without active rules)."""
    mesh, rules = active()
    if mesh is None:
        return None, 1
    axis = logical_to_spec((name,), rules, mesh)[0]
    if axis is None:
        return None, 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return axis, math.prod(mesh.shape[a] for a in names)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """How a global [batch, seq] input array is laid out: rows over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(BATCH_NAMES, rules, mesh))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names (no-op without active rules)."""
    if _ctx.mesh is None:
        return x
    spec = logical_to_spec(names, _ctx.rules, _ctx.mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(_ctx.mesh, spec))


def tree_shardings(logical_specs, mesh: Mesh, rules: Rules):
    """Map a pytree of logical PartitionSpecs (from the model's metadata) to NamedShardings."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh)),
                        logical_specs, is_leaf=lambda x: isinstance(x, P))


def check_divisible(shapes, shardings, what: str = "parameter"):
    """Name the tensor, its spec and the mesh axis when a dimension does not divide."""
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, shape), sh in zip(flat_shapes, flat_sh):
        for dim, axes in zip(shape.shape, sh.spec):
            if axes is None:
                continue
            axes_t = axes if isinstance(axes, tuple) else (axes,)
            n = int(np.prod([sh.mesh.shape[a] for a in axes_t]))
            if dim % n:
                name = ".".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(f"{what} {name} with shape {tuple(shape.shape)} and spec "
                                  f"{sh.spec}: dimension {dim} is not divisible by mesh axes "
                                  f"{'*'.join(axes_t)}={n}; change mesh.rules or the mesh")


# Mesh axes that are meant to divide the parameters (data and sequence replicate them).
PARAM_SHARDING_AXES = ("fsdp", "tensor", "expert", "stage")


def add_axis(spec: P, shape, axis: str, mesh: Mesh) -> P:
    """`spec` with mesh `axis` added to the first dimension that still divides (ZeRO-1: optimizer
    state split over `data` while the parameters stay replicated there); unchanged if none does."""
    if mesh.shape[axis] == 1 or any(axis in (e if isinstance(e, tuple) else (e,)) for e in spec):
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for i, (dim, e) in enumerate(zip(shape, entries)):
        current = () if e is None else e if isinstance(e, tuple) else (e,)
        if dim % (math.prod(mesh.shape[a] for a in current) * mesh.shape[axis]) == 0:
            entries[i] = (*current, axis) if current else axis
            return P(*entries)
    return spec


def bytes_per_device(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs/arrays carrying NamedShardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def check_sufficiently_sharded(abstract_params, logical_specs, mesh: Mesh, max_fraction: float):
    """Per-device parameter bytes may exceed the ideal (total bytes / product of the parameter
    sharding axes) by at most `max_fraction`; otherwise name the biggest replicated tensors."""
    ways = math.prod(mesh.shape[a] for a in PARAM_SHARDING_AXES)
    if ways == 1:
        return
    leaves = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    total = sum(math.prod(l.shape) * np.dtype(l.dtype).itemsize for _, l in leaves)
    actual = bytes_per_device([l for _, l in leaves])
    ideal = total / ways
    if actual <= ideal * (1 + max_fraction):
        return
    specs = dict((jax.tree_util.keystr(p), s) for p, s in jax.tree_util.tree_flatten_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, P))[0])
    def excess(leaf):  # bytes this tensor holds per device beyond its ideal share
        return (bytes_per_device([leaf])
                - math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize / ways)

    worst = sorted(leaves, key=lambda pl: -excess(pl[1]))
    names = ", ".join(
        f"{'.'.join(str(getattr(k, 'key', k)) for k in p)} {tuple(l.shape)} logical "
        f"{tuple(specs[jax.tree_util.keystr(p)])} -> {l.sharding.spec}" for p, l in worst[:3])
    raise ConfigError(
        f"mesh leaves too much of the parameters unsharded: each device holds {actual:,} bytes, "
        f"{actual / ideal:.2f}x the ideal {ideal:,.0f} over {'*'.join(PARAM_SHARDING_AXES)}={ways} "
        f"(allowed: 1 + mesh.max_unsharded_fraction={max_fraction}); least sharded: {names}. "
        f"Map these logical axes to mesh axes in mesh.rules, or raise the allowance")


def local_batch_rows(sharding: NamedSharding, global_batch: int) -> slice:
    """The rows of a global batch that this process's devices hold under `sharding`: what the
    process must read. With tensor/stage axes spanning processes, several processes read the
    same rows; they must be one contiguous block either way."""
    index_map = sharding.addressable_devices_indices_map((global_batch, 1))
    spans = sorted({(ix[0].start or 0, global_batch if ix[0].stop is None else ix[0].stop)
                    for ix in index_map.values()})
    start, stop = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > stop:
            raise ValueError(f"this process holds non-contiguous batch rows {spans}; order the "
                             f"mesh so each process's devices cover one block of the batch")
        stop = max(stop, b)
    return slice(start, stop)
