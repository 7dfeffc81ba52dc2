"""What every benchmark result says about the machine and the moment it ran: the command line, the host, its load,
and the matmul rates that the measured speeds are compared with.

Speeds from shared machines are only comparable as ratios taken in one run, and absolute times only next to the
machine's own matmul rate; :func:`record` gathers both, and :func:`write_result` writes a result with it::

    {"benchmark": NAME, "created": ISO time, "argv": [...], "machine": {...host, load, matmul_gflops...}, ...}

Importing this module does not import torch (the parents of per-process benchmarks stay light); the matmul rate
does, when asked for.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hagan_clinic.io.files import write_json

RESULTS = Path(__file__).resolve().parent / "results"
#: The keys every result file carries at its top level (tests check them).
REQUIRED = ("benchmark", "created", "argv", "machine")


def load() -> dict[str, Any]:
    """Host load now: the 1/5/15-minute load averages and, where the kernel has PSI, the share of the last 10 s in
    which some runnable task waited for a CPU (``cpu_pressure_avg10``, %)."""
    out: dict[str, Any] = {"loadavg": list(os.getloadavg())}
    with suppress(OSError, IndexError, ValueError):
        out["cpu_pressure_avg10"] = float(Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1])
    return out


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else the platform's processor string."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def matmul_gflops(dtype: str = "fp32", device: str = "cpu", n: int = 2048, reps: int = 3) -> float:
    """The median GFLOP/s of ``reps`` n x n matmuls in ``dtype`` (fp32, bf16, fp16) on ``device``, after a warm-up:
    the rate a dense kernel can reach on this machine at this moment."""
    import torch

    from hagan_clinic.devices import torch_dtype

    dev = torch.device(device)
    t = torch_dtype(dtype)
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(n, n, generator=gen).to(dev, t) for _ in range(2))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    rates = []
    for _ in range(reps + 1):  # the first is the warm-up
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates[1:])


def record(device: str = "cpu", dtypes: tuple[str, ...] = ("fp32", "bf16"), n: int = 2048) -> dict[str, Any]:
    """The machine now: host, threads, OMP/MKL settings, load, and the matmul rate per dtype."""
    import torch

    host: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_", "MKL_", "GOMP_"))},
        "load": load(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        host["gpu"] = torch.cuda.get_device_name(torch.device(device))
    host["matmul_gflops"] = {d: matmul_gflops(d, device, n) for d in dtypes}
    host["matmul_size"] = n
    return host


def stamp(name: str, machine: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """The header of a result: benchmark name, time, argv (default: this process's command line), and ``machine``
    (from :func:`record`, ``load_end`` added now)."""
    machine = {**machine, "load_end": load()}
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"benchmark": name, "created": created, "argv": list(sys.argv if argv is None else argv), "machine": machine}


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_result(
    path: Path, name: str, machine: dict[str, Any], body: dict[str, Any], argv: list[str] | None = None
) -> Path:
    """Write ``body`` under the :func:`stamp` header to ``path`` atomically, non-finite numbers as null; returns the
    path. ``argv``: the command line to record when it is not this process's (a ``main(argv)`` called in-process)."""
    write_json(path, json_safe({**stamp(name, machine, argv), **body}), sort_keys=False, allow_nan=False)
    return path


def agreement(ref: Any, other: Any) -> dict[str, float | bool]:
    """How closely ``other`` reproduces ``ref`` (arrays or tensors of one shape): the correlation, the largest
    absolute difference, the scale it is measured against (max |ref|), and whether both are finite. The correlation
    of two constant arrays is 1 when they are equal, else 0."""
    import numpy as np

    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(other, dtype=np.float64).ravel()
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    if not finite:
        return {"corr": float("nan"), "max_abs_diff": float("nan"), "scale": float("nan"), "finite": False}
    constant = a.std() == 0 or b.std() == 0
    corr = (1.0 if np.array_equal(a, b) else 0.0) if constant else float(np.corrcoef(a, b)[0, 1])
    return {"corr": corr, "max_abs_diff": float(np.abs(a - b).max()), "scale": float(np.abs(a).max()), "finite": True}
