"""hagan-clinic: HA-GAN for 3D CT and MRI cohorts.

Public API (imports are lazy so that ``hagan-clinic --help`` stays fast)::

    load_config(path, overrides=()) -> Config
    HAGAN.from_config(cfg) -> HAGAN
    load_checkpoint(path, device="cpu") -> HAGAN   (eval mode)
    model.generate(z, labels=None, slab=None) -> (N, 1, S, S, S) in [-1, 1]
    model.encode(x) -> (N, latent)
    model.save(path)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_config": ("hagan_clinic.config", "load_config"),
    "Config": ("hagan_clinic.config", "Config"),
    "ConfigError": ("hagan_clinic.config", "ConfigError"),
    "HAGAN": ("hagan_clinic.models.hagan", "HAGAN"),
    "load_checkpoint": ("hagan_clinic.models.hagan", "load_checkpoint"),
    "import_reference": ("hagan_clinic.reference", "import_reference"),
}

__all__ = [*_LAZY, "__version__"]

if TYPE_CHECKING:
    from .config import Config, ConfigError, load_config
    from .models.hagan import HAGAN, load_checkpoint
    from .reference import import_reference


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hagan_clinic' has no attribute {name!r}")
