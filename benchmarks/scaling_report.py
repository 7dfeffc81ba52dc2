"""The analysis and the report of a scaling sweep (benchmarks/scaling.py): log-log slopes, the markdown table, the
plot. Points are dicts ``{task, size, batch, status, s, gflop, peak_mb, ...}``; only status ``ok`` enters a fit.

``peak_mb`` is the rise of the peak above the high-water mark just after the model and inputs were built (the
process's ``ru_maxrss`` on the CPU, ``max_memory_allocated`` on CUDA): what the call itself adds, not the process's
total; the table and the plot say so.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from hagan_clinic.io.files import atomic_target

TASKS = ("train", "generate", "encode")
SUPERLINEAR = 1.15  # local slope of time vs GFLOP above which a size costs more than its work
PEAK_LABEL = "peak rise MB"  # above the post-build high-water mark, not the process's total
#: what the GFLOP count (and so the efficiency) includes beyond the model's nominal arithmetic
FLOP_NOTE = (
    "GFLOP is FlopCounterMode's count of the operations that run. The generator's upsampling convolutions run as "
    "one 2x2x2 convolution per output phase over the input grid padded by one: (d+1)^3 outputs per phase of which "
    "d^3 are kept, so the count, and the efficiency computed from it, include that padding (about +5 % at d = 64, "
    "about 2x at d = 4)."
)


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x over the pairs with both positive; None below two distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def analyse(points: list[dict[str, Any]], threshold: float = SUPERLINEAR) -> dict[str, Any]:
    """Slopes of the measured (status ok) points: per task and batch over sizes, per task and size over batches."""
    ok = [p for p in points if p["status"] == "ok"]
    groups = lambda by: sorted({(p["task"], p[by]) for p in ok}, key=lambda g: (TASKS.index(g[0]), g[1]))  # noqa: E731
    by_batch, by_size, flagged = [], [], []
    for task, batch in groups("batch"):
        ser = sorted((p for p in ok if p["task"] == task and p["batch"] == batch), key=lambda p: p["size"])
        local = []
        for a, b in zip(ser, ser[1:]):
            t = loglog_slope([a["gflop"], b["gflop"]], [a["s"], b["s"]])
            m = loglog_slope([a["size"] ** 3, b["size"] ** 3], [a["peak_mb"], b["peak_mb"]])
            local.append({"from_size": a["size"], "to_size": b["size"], "time_vs_gflop": t, "peak_vs_voxels": m})
            local[-1]["superlinear"] = t is not None and t > threshold
            if local[-1]["superlinear"]:
                flagged.append({"task": task, "size": b["size"], "batch": batch, "from_size": a["size"], "slope": t})
        row = {"task": task, "batch": batch, "sizes": [p["size"] for p in ser]}
        row["time_vs_gflop"] = loglog_slope([p["gflop"] for p in ser], [p["s"] for p in ser])
        row["peak_vs_voxels"] = loglog_slope([p["size"] ** 3 for p in ser], [p["peak_mb"] for p in ser])
        by_batch.append({**row, "local": local})
    for task, size in groups("size"):
        ser = sorted((p for p in ok if p["task"] == task and p["size"] == size), key=lambda p: p["batch"])
        if len(ser) > 1:
            bs = [p["batch"] for p in ser]
            row = {"task": task, "size": size, "batches": bs, "s_per_volume": [p["s"] / p["batch"] for p in ser]}
            row["time_vs_batch"] = loglog_slope(bs, [p["s"] for p in ser])
            row["gflop_vs_batch"] = loglog_slope(bs, [p["gflop"] for p in ser])
            by_size.append(row)
    return {"threshold": threshold, "by_batch": by_batch, "by_size": by_size, "superlinear": flagged}


def num(v: float | None) -> str:
    """A figure for the table: integers from 100 up, three significant digits below, ``-`` when missing."""
    return "-" if v is None else f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def status_text(p: dict[str, Any], analysis: dict[str, Any]) -> str:
    for f in analysis["superlinear"]:
        if (f["task"], f["size"], f["batch"]) == (p["task"], p["size"], p["batch"]):
            return f"superlinear (time slope {f['slope']:.2f} vs GFLOP from {f['from_size']}^3)"
    return "ok" if p["status"] == "ok" else f"{p['status']}: {p['reason']}"


def markdown(
    points: list[dict[str, Any]],
    analysis: dict[str, Any],
    machine: dict[str, Any],
    settings: dict[str, Any] | None = None,
) -> str:
    """The points table, the slope tables, the notes on what the figures count (``settings["precision_paths"]``:
    how each task runs its precision) and the machine line."""
    rows = [f"| task | size | batch | s | GFLOP | GFLOP/s | efficiency | {PEAK_LABEL} | status |", "|" + "---|" * 9]
    for p in points:
        gflop = p.get("gflop", p.get("gflop_planned"))
        cells = [p["task"], f"{p['size']}^3", p["batch"], num(p.get("s")), num(gflop), num(p.get("gflops"))]
        cells += [num(p.get("efficiency")), num(p.get("peak_mb")), status_text(p, analysis)]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    rows += [
        "",
        "Log-log slopes over sizes (time vs GFLOP; peak rise vs voxels; local: between consecutive sizes):",
        "",
        "| task | batch | sizes | time vs GFLOP | peak rise vs voxels | local time slopes |",
        "|" + "---|" * 6,
    ]
    for r in analysis["by_batch"]:
        loc = ", ".join(f"{a['from_size']}->{a['to_size']}: {num(a['time_vs_gflop'])}" for a in r["local"])
        sizes = " ".join(map(str, r["sizes"]))
        rows.append(
            f"| {r['task']} | {r['batch']} | {sizes} | {num(r['time_vs_gflop'])} | "
            f"{num(r['peak_vs_voxels'])} | {loc or '-'} |"
        )
    rows += [
        "",
        "Time vs batch at fixed size:",
        "",
        "| task | size | batches | time vs batch | GFLOP vs batch | s per volume |",
        "|" + "---|" * 6,
    ]
    for r in analysis["by_size"]:
        per = " ".join(num(v) for v in r["s_per_volume"])
        rows.append(
            f"| {r['task']} | {r['size']}^3 | {' '.join(map(str, r['batches']))} | "
            f"{num(r['time_vs_batch'])} | {num(r['gflop_vs_batch'])} | {per} |"
        )
    rows += ["", "Notes:", ""]
    rows.append(
        f"- {PEAK_LABEL}: the rise of the peak above the high-water mark just after the model and inputs were built "
        "(the process's ru_maxrss on the CPU, max_memory_allocated on CUDA), not the process's total."
    )
    rows.append(f"- {FLOP_NOTE} Efficiency: achieved GFLOP/s over the same child's matmul rate in its precision.")
    settings = settings or {}
    for task, path in settings.get("precision_paths", {}).items():
        rows.append(f"- {task} at {settings.get('precision', '?')}: {path}.")
    mm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in machine.get("matmul_gflops", {}).items()) or "not measured"
    loads = [num(machine[k]["loadavg"][0]) if "loadavg" in machine.get(k, {}) else "?" for k in ("load", "load_end")]
    rows += [
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('threads', '?')} threads, matmul {mm}, "
        f"load average {loads[0]} at start, {loads[1]} at end.",
    ]
    return "\n".join(rows) + "\n"


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """Two log-log panels: time vs GFLOP and the peak rise vs voxels, one line per task x batch, with a slope-1
    guide; written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in points if p["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = (
        ("gflop", "s", "GFLOP per call", "seconds per call"),
        ("voxels", "peak_mb", "voxels per volume", "peak rise above the post-build mark, MB"),
    )
    for ax, (xk, yk, xl, yl) in zip(axes, panels):
        allx, ally = [], []
        batches = sorted({p["batch"] for p in ok})
        for task, batch in sorted({(p["task"], p["batch"]) for p in ok}, key=lambda g: (TASKS.index(g[0]), g[1])):
            ser = sorted((p for p in ok if p["task"] == task and p["batch"] == batch), key=lambda p: p["size"])
            xy = [(p["size"] ** 3 if xk == "voxels" else p[xk], p[yk]) for p in ser]
            xy = [(x, y) for x, y in xy if x > 0 and y > 0]
            if xy:  # a colour per task, a line style per batch
                style = dict(color=f"C{TASKS.index(task)}", linestyle=("-", "-.", ":")[batches.index(batch) % 3])
                ax.plot(*zip(*xy), marker="o", label=f"{task} B={batch}", **style)
                allx += [x for x, _ in xy]
                ally += [y for _, y in xy]
        if allx:  # the slope-1 guide through the geometric centre of the data
            cx, cy = math.exp(statistics.fmean(map(math.log, allx))), math.exp(statistics.fmean(map(math.log, ally)))
            lo, hi = min(allx), max(allx)
            ax.plot([lo, hi], [cy * lo / cx, cy * hi / cx], "--", color="grey", linewidth=1, label="slope 1")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_target(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
