"""Where messages go: results to stdout (the commands print them), progress bars and logs to stderr.

``configure(verbosity)`` is called once by the command line: -1 (``--quiet``) shows warnings only and no progress
bars, 0 the usual progress and info lines, 1 (``--verbose``) debug lines too. Library code logs through
``logging.getLogger(__name__)`` and shows progress through :func:`progress`, never through ``print``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: The project's root logger: every module logs below it (``hagan_clinic.pipelines.encode`` and so on).
LOGGER = "hagan_clinic"
_state = {"verbosity": 0}


def configure(verbosity: int = 0) -> None:
    """Send the project's log lines to stderr at the level ``verbosity`` asks for (-1 quiet, 0 normal, 1 verbose)."""
    _state["verbosity"] = verbosity
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger(LOGGER)
    root.setLevel(level)
    if not any(getattr(h, "_hagan_clinic", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._hagan_clinic = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


def quiet() -> bool:
    """True under ``--quiet``: no progress bars."""
    return _state["verbosity"] < 0


def progress(
    iterable: Iterable[T], desc: str, unit: str = "it", total: int | None = None, **kwargs: Any
) -> Iterator[T]:
    """A tqdm progress bar on stderr around ``iterable``: shown on a terminal, hidden when stderr is not one
    (CI logs, nohup) and under ``--quiet``."""
    from tqdm import tqdm

    kwargs.setdefault("disable", True if quiet() else None)
    return iter(tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, **kwargs))


def progress_bar(total: int, desc: str, unit: str = "it", **kwargs: Any):
    """A manual tqdm bar (``update(n)``, ``close()``) on stderr, with the same rules as :func:`progress`."""
    from tqdm import tqdm

    kwargs.setdefault("disable", True if quiet() else None)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, **kwargs)


def quiet_readers() -> None:
    """pydicom warns (and logs) about each odd value it meets; in a cohort of damaged files that buries the progress
    bar, and the report already gives each series' reason in plain words. Called by the command line and by each
    worker process it starts."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
