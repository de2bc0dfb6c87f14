"""Checkpoints through orbax: keep-N, async, atomic, restorable onto any mesh, and checked.

A step directory holds the train state (params, optimizer state, step, rng) and a small JSON item
with the data iterator's position and the corpus fingerprint, so a resumed run continues with
exactly the batches it would have seen. orbax writes each step to a temporary directory and renames
it when complete; steps that never finished are invisible.

Resuming trusts nothing: the newest step is read in full (metadata, every array with its expected
shape, the data position) and, if any of it is missing or unreadable, the next older one is tried;
the damaged step is moved aside (`<step>.damaged`) with one line saying why. A save that fails,
in the background or not, stops the run with one line naming the step directory and the cause;
earlier checkpoints are untouched (orbax deletes old steps only after a new one is complete).
Creating a Checkpointer writes nothing: the directory appears with the first save.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxlm import faults
from jaxlm.config import CheckpointConfig, ConfigError

_TMP_MARK = ".orbax-checkpoint-tmp"


class Checkpointer:
    def __init__(self, directory: Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self._names = ocp.path.step.standard_name_format()  # what CheckpointManager uses
        self._manager = None
        self._in_flight = None  # step of a save that may still be running in the background
        faults.quiet_library_noise()

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.cfg.keep, enable_async_checkpointing=self.cfg.async_save,
                create=True, cleanup_tmp_directories=True)
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.StandardCheckpointHandler(),
                               "data": ocp.JsonCheckpointHandler()})
        return self._manager

    def steps(self) -> list[int]:
        """Complete (renamed) steps, oldest first; nothing is read inside them."""
        if not self.directory.is_dir():
            return []
        return sorted(m.step for m in self._names.find_all(epath.Path(self.directory)))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.directory / self._names.build_name(step)

    # ------------------------------------------------------------------ resuming

    def restore_latest(self, abstract_state, say):
        """(step, state, data_state) of the newest intact checkpoint, restored onto the shardings
        of `abstract_state` (any mesh); None when there is none. Every process reads its part of
        each candidate and all agree before one is used; damaged steps are moved aside after."""
        for tmp in sorted(self.directory.glob(f"*{_TMP_MARK}*")) if self.directory.is_dir() else []:
            say(f"checkpoint {tmp.name.split('.')[0]}: ignored, an interrupted save left "
                f"{tmp} (removed when the next checkpoint is written)")
        damaged = []
        for step in reversed(self.steps()):
            problem, restored = self._read(step, abstract_state)
            problem = _agree(problem)
            if problem is None:
                self._quarantine(damaged)
                return (step, *restored)
            say(f"checkpoint {step} is damaged ({problem}); skipping it")
            damaged.append((step, problem))
        if damaged:
            listed = "; ".join(f"step {s}: {p}" for s, p in damaged)
            raise ConfigError(f"{self.directory}: no intact checkpoint to resume from ({listed}); "
                              f"move the directory away to start over")
        return None

    def _read(self, step: int, abstract_state):
        """(None, (state, data_state)) or (what is wrong, None); a checkpoint of another model is
        a ConfigError, not damage."""
        where = self.step_dir(step)
        if not where.is_dir():
            return "not a directory", None
        missing = [item for item in ("state", "data") if not (where / item).is_dir()]
        if missing:
            what = "an empty directory" if not any(where.iterdir()) else \
                f"no '{missing[0]}' item in {where}"
            return what, None
        path = epath.Path(where)
        handler = ocp.StandardCheckpointHandler()
        try:
            meta = handler.metadata(path / "state")
        except Exception as e:  # noqa: BLE001 - any failure to read means damage
            return f"cannot read its metadata: {faults.first_line(e)}", None
        _check_matches(meta, abstract_state, where)
        try:
            state = jax.block_until_ready(handler.restore(
                path / "state", args=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:  # noqa: BLE001
            return f"cannot read its arrays: {faults.first_line(e, 120)}", None
        try:
            data = ocp.JsonCheckpointHandler().restore(path / "data",
                                                       args=ocp.args.JsonRestore())
        except Exception as e:  # noqa: BLE001
            return f"cannot read the data position: {faults.first_line(e)}", None
        if not isinstance(data, dict) or not isinstance(data.get("iterator"), dict):
            return "the data position is missing", None
        return None, (state, data)

    def _quarantine(self, damaged):
        """Move damaged steps to `<step>.damaged` (kept for inspection, invisible to orbax)."""
        if not damaged:
            return
        if jax.process_index() == 0:
            for step, _ in damaged:
                src = self.step_dir(step)
                dst, n = src.with_name(f"{src.name}.damaged"), 1
                while dst.exists():
                    n += 1
                    dst = src.with_name(f"{src.name}.damaged-{n}")
                src.rename(dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxlm: damaged checkpoints moved aside")
        if self._manager is not None:
            self._manager.reload()

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state, data_state: dict):
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                force=True)
        except Exception as e:  # noqa: BLE001 - includes an earlier background save's failure
            raise self._failed(self._in_flight or step, e) from None
        self._in_flight = step

    def poll(self):
        """Cheap, every step: a background save that failed stops the run now, not at the next
        save."""
        if self._in_flight is None or self.manager.is_saving_in_progress():
            return
        step, self._in_flight = self._in_flight, None
        try:  # the save thread has ended: this returns at once, or raises what it raised
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._failed(step, e) from None

    def wait(self):
        """Block until the last save is committed (or raise its failure)."""
        if self._manager is None:
            return
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._failed(step, e) from None

    def close(self):
        if self._manager is not None:
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001 - already reported as a failed save
                faults.log.info("closing the checkpoint manager: %s", faults.first_line(e))

    def _failed(self, step, e: Exception) -> faults.RunStopped:
        where = self.step_dir(step) if step is not None else self.directory
        reason = faults.cause(e) or faults.first_line(e)
        intact = [s for s in self.steps() if s != step]
        kept = (f"checkpoint {intact[-1]} is intact and the latest" if intact else
                "no earlier checkpoint exists")
        faults.log.info("checkpoint save failed", exc_info=e)  # the process log only
        return faults.RunStopped(
            f"checkpoint {step} could not be written to {where}: {reason}; the run stopped and "
            f"{kept}; fix the cause, then run the same command to resume",
            faults.EXIT_WRITE_FAILED)


def read_run_config(run_dir: str):
    """The config a training run saved (config.yaml), for the commands that read a run's
    weights (generation, export); errors name the --run flag."""
    from jaxlm.config import from_yaml_file
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        why = "no config.yaml in it" if run.is_dir() else "no such directory"
        raise ConfigError(f"--run {run_dir}: not a jaxlm run directory ({why}; expected a "
                          f"training run's train.run_dir)")
    return from_yaml_file(str(run / "config.yaml"))


def run_step_dir(run_dir: str, cfg, step: int | None) -> tuple[int, Path]:
    """(step, its directory) of the run's checkpoint `step` (None: the newest); errors name the
    --run and --step flags."""
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", cfg.checkpoint)
    steps = ckpt.steps()
    if not steps:
        raise ConfigError(f"--run {run_dir}: no checkpoint in {ckpt.directory}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"--step {step}: no such checkpoint in {ckpt.directory} (have "
                          f"{', '.join(map(str, steps))})")
    return step, ckpt.step_dir(step)


def restore_variables(step_dir: Path, abstract_subtree):
    """Only some items of a saved train state (e.g. params and model_state for generation: the
    optimizer moments are never read), restored onto the shardings of `abstract_subtree`. A
    checkpoint of another model is a ConfigError naming the directory."""
    path = epath.Path(step_dir) / "state"
    if not path.is_dir():
        raise ConfigError(f"{step_dir}: not a checkpoint (no 'state' item)")
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(path)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{step_dir}: cannot read its metadata: {faults.first_line(e)}") from None
    tree = getattr(meta, "tree", meta)
    subset = {k: tree[k] for k in abstract_subtree if k in tree}
    _check_matches(subset, abstract_subtree, step_dir)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    return handler.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract_subtree, restore_args=restore_args, partial_restore=True))


def _agree(problem: str | None) -> str | None:
    """Every process reads only its shards: a checkpoint is good only if it is good on all."""
    if jax.process_count() == 1:
        return problem
    from jax.experimental import multihost_utils
    bad = multihost_utils.process_allgather(np.array(problem is not None))
    if problem is None and np.any(bad):
        first = int(np.argmax(bad))
        return f"unreadable on process {first}; see logs/process_{first}.log"
    return problem


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
