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


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time of each record (tests and tools replace it;
    a handler bound to the stream of the moment it was made would write into a closed capture later)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class sets it in __init__; the current stderr is always used
        pass


def configure(verbosity: int = 0) -> None:
    """Send the project's log lines to stderr at the level ``verbosity`` asks for (-1 quiet, 0 normal, 1 verbose)."""
    _state["verbosity"] = verbosity
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger(LOGGER)
    root.setLevel(level)
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        root.addHandler(_CurrentStderr())
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
