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


def _workflows_beside_a_source_checkout() -> None:
    """In a source checkout the cohort workflows sit beside the package, in the repository's top-level pipelines/
    folder (installed, they are hagan_clinic/pipelines/). A checkout imported through PYTHONPATH or from a worktree
    must run its own workflows, not those of whichever checkout is installed in editable mode: the package looks
    for them beside itself first."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if not (here / "pipelines").is_dir() and (here.parent / "pipelines" / "__init__.py").is_file():
        __path__.append(str(here.parent))


_workflows_beside_a_source_checkout()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hagan_clinic' has no attribute {name!r}")
