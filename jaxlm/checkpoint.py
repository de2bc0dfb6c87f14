"""Checkpoints through orbax: keep-N, async, atomic, and restorable onto any mesh.

A step directory holds the train state (params, optimizer state, step, rng) and a small JSON item
with the data iterator's position and the corpus fingerprint, so a resumed run continues with
exactly the batches it would have seen. orbax writes each step to a temporary directory and renames
it when complete; steps that never finished are invisible to `latest_step`.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.config import CheckpointConfig, ConfigError


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict):
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state):
        """Restore onto the shardings carried by `abstract_state` (any mesh); the checkpoint's
        tree and shapes are checked first so a mismatch names the parameter, not an orbax frame."""
        where = self.directory / str(step)
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception as e:  # unreadable or foreign directory
            raise ConfigError(f"checkpoint {where}: cannot read its metadata ({e})") from None
        _check_matches(meta, abstract_state, where)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _check_matches(meta, abstract_state, where):
    expected = dict(_flat_shapes(abstract_state))
    found = dict(_flat_shapes(meta))
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"checkpoint {where} does not match this model/optimizer: "
            + (f"missing {missing[:3]}" if missing else "")
            + (" " if missing and extra else "")
            + (f"unexpected {extra[:3]}" if extra else "")
            + "; use a fresh train.run_dir or the config the checkpoint was written with")
    for key, shape in expected.items():
        if found[key] != shape:
            raise ConfigError(f"checkpoint {where}: {key} has shape {found[key]}, but this config "
                              f"expects {shape}; use the config the checkpoint was written with")


def _flat_shapes(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in flat:
        # orbax metadata turns namedtuples into dicts: compare by plain key names
        name = ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                        for k in path)
        yield name, tuple(np.shape(leaf) if not hasattr(leaf, "shape")
                                                else leaf.shape)
