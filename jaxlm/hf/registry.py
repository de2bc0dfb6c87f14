"""Which module maps which Hugging Face architecture (and which jaxlm family exports as what).
Nothing here imports JAX: a training config with `model.init_from` reads its model fields from
the HF directory before JAX starts."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from jaxlm.hf.files import HFError, read_json
from jaxlm.hf.hf_config import HFConfig

MODULES = ("jaxlm.hf.llama", "jaxlm.hf.gpt2", "jaxlm.hf.bert", "jaxlm.hf.t5",
           "jaxlm.hf.deepseek")


def _modules() -> list[ModuleType]:
    return [importlib.import_module(m) for m in MODULES]


def architectures() -> dict[str, ModuleType]:
    return {arch: m for m in _modules() for arch in m.ARCHITECTURES}


def for_family(family: str) -> ModuleType:
    for m in _modules():
        if family in m.ARCHITECTURES.values():
            return m
    raise HFError(f"model.family={family!r} has no Hugging Face mapping; families that have: "
                  + ", ".join(sorted({f for m in _modules() for f in m.ARCHITECTURES.values()})))


def read_config(hf_dir: str | Path) -> tuple[str, HFConfig]:
    """(architecture, config) of an HF model directory."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HFError(f"{hf_dir}: not a directory (expected a Hugging Face model directory with "
                      f"config.json and safetensors weights)")
    hf = HFConfig(read_json(path, "the model config"), path)
    archs = hf.values.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise HFError(f"{path}: 'architectures' must name one architecture, got {archs!r}")
    if archs[0] not in architectures():
        raise HFError(f"{path}: architecture {archs[0]!r} is not supported; jaxlm reads "
                      + ", ".join(sorted(architectures())))
    return archs[0], hf


def model_fields(hf_dir: str | Path) -> dict:
    """The jaxlm model fields (family included) that an HF directory's config.json means."""
    arch, hf = read_config(hf_dir)
    return architectures()[arch].fields_from_hf(hf, arch)
