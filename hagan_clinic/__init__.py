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
    """In a source checkout of this project the cohort workflows sit beside the package, in the repository's
    top-level pipelines/ folder (installed, they are hagan_clinic/pipelines/). A checkout imported through
    PYTHONPATH or from a worktree must run its own workflows, not those of whichever checkout is installed in
    editable mode: that folder is registered as ``hagan_clinic.pipelines`` (its modules load on first use)."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    folder = here.parent / "pipelines"
    name = f"{__name__}.pipelines"
    if name in sys.modules or (here / "pipelines").is_dir() or not (folder / "__init__.py").is_file():
        return
    try:  # only our own checkout: a folder called pipelines beside a copied package is someone else's
        ours = 'name = "hagan-clinic"' in (here.parent / "pyproject.toml").read_text(errors="replace")
    except OSError:
        ours = False
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if not ours or spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["pipelines"] = module


_workflows_beside_a_source_checkout()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hagan_clinic' has no attribute {name!r}")
