"""Publishing a finished temp file under its final name, with the permissions a plain ``open`` would give."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def atomic_target(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp file name beside ``path``; publish it as ``path`` if the block succeeds, delete it if not.
    A crash never leaves a half-written ``path`` that a resumed run would trust."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
