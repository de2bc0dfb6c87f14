"""Hugging Face weight files: a directory of safetensors shards (one `model.safetensors`, or
several named by `model.safetensors.index.json`), read through memory maps so a loader touches
only the bytes of the slices it asks for, and written shard by shard into a temporary directory
that becomes the output only when complete.

Every fault in the files (a missing or truncated shard, an index naming a file that is not
there, a header that is not safetensors, an unknown dtype) is one HFError naming the file and,
where there is one, the tensor.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxlm.config_fields import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class HFError(ConfigError):
    """Bad input in a Hugging Face directory (a ConfigError: the CLIs exit 2 with one line)."""


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise HFError(f"{path}: no such file ({what})")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(value, dict):
        raise HFError(f"{path}: expected a JSON object ({what}), got {type(value).__name__}")
    return value


class Weights:
    """The tensors of an HF directory by name: shape, dtype and a memory-mapped (read-only,
    zero-copy) numpy view. Headers are all read and checked when it is opened."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._where: dict[str, tuple[Path, str, list[int], int, int]] = {}
        self._maps: dict[Path, np.memmap] = {}
        if (self.dir / INDEX).exists():
            weight_map = read_json(self.dir / INDEX, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFError(f"{self.dir / INDEX}: no 'weight_map' of tensor name -> file")
            files: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                files.setdefault(file, []).append(name)
            for file, names in files.items():
                found = self._read_header(self.dir / file, f"named by {INDEX} for {names[0]}")
                missing = sorted(set(names) - set(found))
                if missing:
                    raise HFError(f"{self.dir / file}: has no tensor {missing[0]!r}, which "
                                  f"{INDEX} places there")
        elif (self.dir / SINGLE).exists():
            self._read_header(self.dir / SINGLE, "the weights")
        else:
            raise HFError(f"{self.dir}: no {SINGLE} or {INDEX} (a Hugging Face model directory "
                          f"holds its weights as safetensors)")

    def _read_header(self, path: Path, why: str) -> set[str]:
        if not path.is_file():
            raise HFError(f"{path}: no such file ({why})")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or n + 8 > size:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise HFError(f"{path}: not a readable safetensors file: {e}") from None
        header.pop("__metadata__", None)
        names = set()
        for name, info in header.items():
            dtype = info.get("dtype") if isinstance(info, dict) else None
            if dtype not in DTYPES:
                raise HFError(f"{path}: tensor {name!r} has dtype {dtype!r}; expected one of "
                              f"{', '.join(DTYPES)}")
            shape, (start, end) = [int(d) for d in info["shape"]], info["data_offsets"]
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if end - start != nbytes:
                raise HFError(f"{path}: tensor {name!r} of shape {shape} {dtype} spans "
                              f"{end - start} bytes, expected {nbytes}")
            if 8 + n + end > size:
                raise HFError(f"{path}: truncated: tensor {name!r} ends at byte {8 + n + end} "
                              f"but the file has {size}")
            self._where[name] = (path, dtype, shape, 8 + n + start, 8 + n + end)
            names.add(name)
        return names

    @property
    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[2])

    def view(self, name: str) -> np.ndarray:
        """A read-only view of the tensor in its file: slicing it reads only those bytes."""
        path, dtype, shape, start, end = self._info(name)
        if path not in self._maps:
            self._maps[path] = np.memmap(path, np.uint8, "r")
        return self._maps[path][start:end].view(DTYPES[dtype]).reshape(shape)

    def _info(self, name: str):
        if name not in self._where:
            raise HFError(f"{self.dir}: no tensor {name!r} in the weights")
        return self._where[name]


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> dict[str, list[str]]:
    """Tensor names (in order, with their byte sizes) grouped into shard files of at most
    max_shard_bytes (a larger tensor gets a file of its own): file name -> tensor names."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return dict(zip(files, groups))


def partial_dir(out_dir: str | Path) -> Path:
    """Where an export writes before its files are moved into out_dir (on the same disk, so
    the move is a rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / ".partial"


def write_shard(partial: Path, file: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    partial.mkdir(exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(partial / file),
              metadata={"format": "pt"})


def finish(partial: Path, out_dir: str | Path, plan: dict[str, list[str]], total_bytes: int,
           extra: dict[str, str]) -> None:
    """Every shard is in `partial`: write the index (several shards) and the `extra` text
    files (config.json, ...), then move everything into out_dir and remove `partial`."""
    out = Path(out_dir)
    missing = [f for f in plan if not (partial / f).is_file()]
    if missing:
        raise HFError(f"{partial / missing[0]}: a shard of the export was not written")
    files = dict(extra)
    if len(plan) > 1:
        weight_map = {name: file for file, names in plan.items() for name in names}
        files[INDEX] = json.dumps({"metadata": {"total_size": total_bytes},
                                   "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    for name, text in files.items():
        (partial / name).write_text(text + "\n")
    for name in [*plan, *files]:
        os.replace(partial / name, out / name)
    shutil.rmtree(partial, ignore_errors=True)
