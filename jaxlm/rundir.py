"""The run directory: checked before anything is written, prepared once the run is accepted.

`check` needs no JAX and writes nothing: `train.run_dir` must be a directory this process can
write (or one it can create), and a run that will resume must not change a key that would make its
checkpoints mean something else; `SAFE_ON_RESUME` lists the keys that may change (they are
reported). `prepare` is the run's first write: the directory, `config.yaml` (atomically), and
`metrics.jsonl` cut back to the step the run continues from, so every step has one record.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from jaxlm.config import Config, ConfigError, dump_yaml, flatten, to_dict

# Keys a resumed run may change (a trailing '.' covers a whole section). Everything else
# (model shape, data, batch, optimizer moments, seeds) would make the checkpoint mean something
# else, and is refused.
SAFE_ON_RESUME = (
    "train.steps", "train.eval_every", "train.eval_batches", "train.run_dir",
    "train.on_nonfinite", "train.max_skipped_steps",
    "train.microbatches",          # gradient accumulation: the same batch and update
    "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio",  # the lr schedule
    "checkpoint.", "log.", "runtime.", "distributed.",
    "mesh.", "pipeline.",          # layout: a checkpoint restores onto any mesh
    "model.attention_impl", "model.remat", "model.scan_unroll",  # how the same math is computed
    "model.init_from",             # only a fresh run reads it
    "data.prefetch", "data.cache_dir",
)


def check(cfg: Config) -> list[str]:
    """Refuse (ConfigError) a run directory that cannot be written or a resume that changes an
    unsafe key; returns the safe changes as 'key: old -> new' lines, for the log."""
    run_dir = Path(cfg.train.run_dir)
    _check_writable(run_dir)
    saved = run_dir / "config.yaml"
    if not (cfg.checkpoint.enabled and cfg.checkpoint.resume and saved.is_file()
            and _has_checkpoints(run_dir / "checkpoints")):
        return []
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{saved}: cannot read the saved config of the run being resumed: "
                          f"{str(e).splitlines()[0]}") from None
    old = flatten(old) if isinstance(old, dict) else {}
    new = flatten(to_dict(cfg))
    defaults = flatten(to_dict(Config(model=type(cfg.model)())))  # this family's defaults
    changed = {k: (old.get(k, defaults[k]), v) for k, v in new.items()
               if old.get(k, defaults[k]) != v}
    refused = [k for k in changed if not _safe(k)]
    if refused:
        listed = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in refused)
        raise ConfigError(
            f"{saved}: resuming with a different config: {listed}; these cannot change on resume "
            f"(use another train.run_dir, or the saved values; to change them deliberately, edit "
            f"{saved.name} in the run directory)")
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()]


def prepare(cfg: Config, start: int) -> int:
    """Create the run directory, write config.yaml and drop metrics.jsonl records of steps after
    `start` (a resumed run writes its own). Process 0 only. Returns the records dropped."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    return _cut_metrics(run_dir / "metrics.jsonl", start)


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_ON_RESUME)


def _has_checkpoints(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() and p.is_dir() for p in directory.iterdir())


def _check_writable(run_dir: Path):
    key = f"train.run_dir={run_dir}"
    nearest = run_dir
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        where = "it is" if nearest == run_dir else f"{nearest} is"
        raise ConfigError(f"{key}: {where} a file, not a directory")
    for directory in (nearest, run_dir / "checkpoints", run_dir / "logs"):
        if directory.is_dir() and (reason := _cannot_write_in(directory)):
            raise ConfigError(f"{key}: cannot write in {directory}: {reason}")
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"{key}: {directory} is a file, not a directory")
    for name in ("config.yaml", "metrics.jsonl"):
        f = run_dir / name
        if f.exists() and not os.access(f, os.W_OK):
            raise ConfigError(f"{key}: cannot write {f}: permission denied")


def _cannot_write_in(directory: Path) -> str | None:
    """Why a file cannot be created here (read-only mount, permissions), or None. The probe file
    is removed at once: a refused run leaves nothing behind."""
    try:
        fd, name = tempfile.mkstemp(prefix=".jaxlm-write-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return e.strerror or str(e)
    return None


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cut_metrics(path: Path, start: int) -> int:
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line torn by a kill: drop it too
            step = None
        if step is None or step > start:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        _write_atomic(path, "".join(kept))
    return dropped
