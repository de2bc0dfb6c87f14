"""Mesh from config, and the rules table that turns logical axis names into PartitionSpecs.

Models only ever name their axes ('embed', 'mlp', 'act_batch', ...). Which mesh axes those land on
is data (`mesh.rules`), so DP, FSDP and TP are configurations of the same model code.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxlm.config import MESH_AXES

Rules = Sequence[Sequence]


def make_mesh(axis_sizes: dict[str, int], devices=None) -> Mesh:
    """All six axes always exist (size 1 when unused), with Auto axis types, in MESH_AXES order:
    'tensor' last so it varies fastest over devices (neighbouring devices share the most traffic)."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    shape = tuple(axis_sizes[a] for a in MESH_AXES)
    return Mesh(devices.reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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


_ctx = _Context()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules):
    """Makes `constrain` active while tracing a step; outside it `constrain` is the identity."""
    prev = (_ctx.mesh, _ctx.rules)
    _ctx.mesh, _ctx.rules = mesh, [tuple(r) for r in rules]
    try:
        yield
    finally:
        _ctx.mesh, _ctx.rules = prev


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
    from jaxlm.config import ConfigError
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
