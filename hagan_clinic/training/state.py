"""Training-state files: everything needed to continue a run exactly where it stopped.

``state_<iteration>.pt`` holds all four networks (and the EMA generator), the optimisers and grad scalers, the
RNG states of every rank (torch, CUDA, numpy, python, and the loop's own generators), the data sampler's
position, the iteration, the metric window and the MLflow run id. Sampling snapshots (``snapshot_<iteration>.pt``,
the ordinary checkpoint format) are separate, small files. Both are written atomically and loaded with
``torch.load(weights_only=True)``, so every value in here is a tensor or plain data.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..errors import HaganError
from ..io.files import write_text
from ..io.torch_files import CheckpointError, atomic_torch_save, load_untrusted

STATE_FORMAT = "hagan-clinic-train-state"
_NUMBERED = re.compile(r"^(state|snapshot)_(\d+)\.pt$")
log = logging.getLogger(__name__)


class TrainingError(HaganError):
    """The run cannot go on (diverged, nothing to resume, a run folder in the way); one line."""


def global_rng_state() -> dict[str, Any]:
    # numpy's legacy state (its default): ('MT19937', keys, pos, has_gauss, cached_gaussian)
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(path: Path, payload: dict[str, Any]) -> Path:
    return atomic_torch_save({"format": STATE_FORMAT, **payload}, path)


def load_state(path: str | Path) -> dict[str, Any]:
    payload = load_untrusted(path, what="training state")
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a hagan-clinic training state (state_<iteration>.pt)")
    return payload


def numbered(folder: Path, kind: str) -> list[tuple[int, Path]]:
    """(iteration, path) of ``kind`` files ('state' or 'snapshot') in ``folder``, oldest first."""
    found = []
    for p in folder.glob(f"{kind}_*.pt") if folder.is_dir() else []:
        m = _NUMBERED.match(p.name)
        if m and m.group(1) == kind:
            found.append((int(m.group(2)), p))
    return sorted(found)


def latest_state(folder: Path) -> Path | None:
    states = numbered(folder, "state")
    return states[-1][1] if states else None


def rotate(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent numbered states and snapshots."""
    for kind in ("state", "snapshot"):
        for _, path in numbered(folder, kind)[:-keep]:
            path.unlink(missing_ok=True)


class MetricsLog:
    """metrics.jsonl: one JSON record per log step, appended and flushed to disk as it is logged (a long run logs
    many thousands of lines; rewriting the file at each step would cost the square of that). A crash can leave at
    most a last line cut short, and resuming deals with it: the file is rewritten once, atomically, to the lines
    up to the resumed iteration (the run repeats the rest exactly), a cut last line dropped with a warning; a
    damaged line before the last is refused (TrainingError): its log would have a hole."""

    def __init__(self, path: Path, iteration: int) -> None:
        self.path = path
        text = path.read_bytes().decode("utf-8", "replace") if path.exists() else ""
        numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        kept: list[str] = []
        for k, (number, line) in enumerate(numbered, 1):
            step = _logged_iteration(line)
            if step is None and k < len(numbered):
                raise TrainingError(f"{path}: line {number} is not a metrics record; repair or remove the file")
            if step is None:
                log.warning("%s: its last line is incomplete (a run killed while writing it?); dropped", path)
            elif step <= iteration:
                kept.append(line)
        write_text(path, "".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _logged_iteration(line: str) -> int | None:
    """The iteration of a metrics.jsonl line; None when it is no record of ours."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("iteration") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
