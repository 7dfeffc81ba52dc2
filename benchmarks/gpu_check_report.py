"""The summary table of a GPU check (benchmarks/gpu_check.py): one line per section, one more per row.

It reads sections as the check writes them and tolerates what an interrupted section leaves: a row without a
status, a row without its figures. A table that could not be printed would lose the run's summary.
"""

from __future__ import annotations

from typing import Any


def row_name(row: dict[str, Any]) -> str:
    """A row by what sets it apart: size, precision, slab width."""
    parts = [f"{row['size']}^3"] if "size" in row else []
    slab = [f"slab={row['slab']}"] if "slab" in row else []
    return " ".join([*parts, str(row.get("precision", "?")), *slab])


def corr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"


def row_figures(name: str, r: dict[str, Any]) -> str:
    """One row's figures (status ok) as a line."""
    if name == "train":
        eff = "n/a" if r.get("efficiency") is None else f"{r['efficiency']:.2f}"
        return (f"{r['it_per_s']:.3f} it/s, peak {r['peak_mb']:.0f} MB, efficiency {eff}, "
                f"finite {r['losses_finite']}")  # fmt: skip
    if name == "slab":
        same = f", vs slab=1 {r['max_abs_diff_vs_slab_1']:.2g}" if "max_abs_diff_vs_slab_1" in r else ""
        return (f"{r['time_s']:.2f} s, peak {r['peak_mb']:.0f} MB, range [{r['min']:.2f}, {r['max']:.2f}], "
                f"finite {r['finite']}{same}")  # fmt: skip
    return (f"{r['series_per_min']:.1f} series/min end to end, encoder alone "
            f"{r['encoder_series_per_min'] or 0:.1f}")  # fmt: skip


def figures(name: str, res: dict[str, Any]) -> list[str]:
    """The section's key figures, one line per row."""
    status = res.get("status")
    if status in ("error", "skipped") and "rows" not in res and name != "torchrun":
        return [res.get("error") or res.get("reason", "")]
    if name == "parity":
        return [f"{w}: max|diff| {r['max_abs_diff']:.3g}, corr {corr(r['corr'])}, agree {r['agree']}"
                for w, r in res.items() if w in ("generate", "encode")]  # fmt: skip
    if name == "torchrun":
        return [f"exit {res.get('returncode')}, state written {res.get('state_written')}" + (
            f": {res['error']}" if "error" in res else "")]  # fmt: skip
    lines = []
    for r in res.get("rows", []):
        head = row_name(r)
        if r.get("status") != "ok":
            lines.append(f"{head}: {r.get('status', 'unfinished')}: {r.get('error') or r.get('reason') or ''}")
            continue
        try:
            lines.append(f"{head}: {row_figures(name, r)}")
        except (KeyError, TypeError, ValueError) as err:  # a row the section left half written
            lines.append(f"{head}: ok, figures incomplete ({type(err).__name__}: {err})")
    if name == "encode" and "bf16_vs_fp32" in res:
        lines.append(f"bf16 vs fp32 features: max|diff| {res['bf16_vs_fp32']['max_abs_diff']:.3g}, "
                     f"corr {corr(res['bf16_vs_fp32']['corr'])}")  # fmt: skip
    return lines


def table(sections: dict[str, dict[str, Any]]) -> str:
    """Every section's status, wall time and figures."""
    rows = [f"{'section':<9} {'status':<8} {'wall_s':>7}  figures"]
    for name, res in sections.items():
        try:
            lines = figures(name, res) or [""]
        except (KeyError, TypeError, ValueError) as err:  # the table still prints; the JSON has the section
            lines = [f"figures incomplete ({type(err).__name__}: {err})"]
        wall = res.get("wall_s")
        rows.append(f"{name:<9} {res.get('status', '?'):<8} {'-' if wall is None else f'{wall:.1f}':>7}  {lines[0]}")
        rows += [f"{'':<28}{line}" for line in lines[1:]]
    return "\n".join(rows)
