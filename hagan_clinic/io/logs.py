"""Keeping the readers' own chatter out of the terminal."""

from __future__ import annotations

import logging
import warnings


def quiet_readers() -> None:
    """pydicom warns (and logs) about each odd value it meets; in a cohort of damaged files that buries the progress
    bar, and the report already gives each series' reason in plain words. Called by the command line and by each
    worker process it starts."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
