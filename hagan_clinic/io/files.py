"""Publishing a finished temp file under its final name, with the permissions a plain ``open`` would give."""

from __future__ import annotations

import os


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename ``tmp`` to ``path`` atomically. ``tempfile.mkstemp`` creates files readable by their owner only;
    a cache or a model shared by a group must keep the usual umask-based mode."""
    os.chmod(tmp, 0o666 & ~UMASK)
    os.replace(tmp, path)
