"""The one registry of model families: every package under jaxlm/models that defines `FAMILY`.

Adding a family is adding its folder; nothing here or in the trainer names one.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from jaxlm.config_fields import ConfigError
from jaxlm.models.config import Family, ModelConfig


@functools.cache
def families() -> dict[str, Family]:
    import jaxlm.models as models
    found = {}
    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda i: i.name):
        if info.ispkg:
            family = getattr(importlib.import_module(f"jaxlm.models.{info.name}"), "FAMILY", None)
            if family is not None:
                found[family.name] = family
    return found


def family(name: str) -> Family:
    found = families()
    if name not in found:
        raise ConfigError(f"model.family: {name!r} is not one of: {', '.join(found)}")
    return found[name]


def build_model(cfg: ModelConfig, rngs):
    """The family's model for `cfg` (an nnx.Module); its class is imported on first use.
    With delayed fp8 scaling its projecting layers carry amax histories (jaxlm.nn.fp8)."""
    from jaxlm.nn.fp8 import delayed_scaling
    module, cls = family(cfg.family).model.split(":")
    with delayed_scaling(cfg.fp8_history):
        return getattr(importlib.import_module(module), cls)(cfg, rngs)
