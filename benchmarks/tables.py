"""The README's speed tables, made from the committed results in benchmarks/results/ (never typed by hand).

    python benchmarks/tables.py            # prints the markdown that README.md's "Speed and memory" section holds

Each table names the machine its figures come from (CPU, threads, fp32/bf16 matmul rate, load); a test checks that
the README holds exactly what this prints, so a re-run benchmark and the README cannot drift apart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN = "<!-- speed tables: python benchmarks/tables.py -->"
END = "<!-- end of speed tables -->"


def _read(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def machine_line(result: dict[str, Any]) -> str:
    """'Intel Xeon ..., 2 threads, matmul fp32 310 / bf16 1900 GFLOP/s, load 1.2' from a result's header."""
    m = result["machine"]
    rates = m["matmul_gflops"]
    rate = " / ".join(f"{k} {v:.0f}" for k, v in rates.items())
    load = m["load"]["loadavg"][0]
    return f"{m['cpu']}, {m['threads']} threads, matmul {rate} GFLOP/s, load {load:.1f} at the start"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header, its separator (as many columns as the header) and the rows."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def encode_table(result: dict[str, Any]) -> str:
    header = ["size", "read + preprocess", "encoder fp32 / bf16",
              "`encode` end to end: fp32, no reader (the default on 2 cores)", "fp32, 1 reader", "bf16, no reader",
              "bf16, 1 reader", "reference pipeline", "best speed-up over it"]  # fmt: skip
    rows = []
    for r in result["results"]:
        floor = r["read_s"] + r["preprocess_s"]
        cells = []
        for precision, workers in (("fp32", 0), ("fp32", 1), ("bf16", 0), ("bf16", 1)):
            key = f"end_to_end_{precision}_workers{workers}"
            cells.append(f"{r[key + '_s_per_series']:.2f} s ({r[key + '_ratio_to_read_preprocess']:.2f}x)")
        best = max(v for k, v in r.items() if k.endswith("_speedup_over_reference"))
        rows.append(
            [f"{r['size']}^3", f"{floor:.2f} s", f"{r['encode_fp32_s']:.2f} / {r['encode_bf16_s']:.2f} s", *cells,
             f"{r['reference']['s_per_series']:.2f} s", f"{best:.1f}x"]
        )  # fmt: skip
    agree = []
    for r in result["results"]:
        a, f = r.get("bf16_agreement_with_fp32"), r.get("bf16_per_feature_agreement")
        if a and f:
            agree.append(
                f"{r['size']}^3: pooled correlation {a['corr']:.5f}, max difference {a['max_abs_diff']:.3g} on a "
                f"scale of {a['scale']:.3g}; per feature across the {f['series']} series, correlation "
                f"{f['corr_min']:.3f} at worst (median {f['corr_median']:.4f}), largest difference "
                f"{f['max_diff_over_sd_max']:.2f} of that feature's spread (median {f['max_diff_over_sd_median']:.2f})"
            )
    return (
        markdown_table(header, rows)
        + "\n\nIn brackets: the ratio to read + preprocess. bf16 features against fp32 (untrained weights): "
        + "; ".join(agree)
        + "."
    )


def train_table(result: dict[str, Any]) -> str:
    header = ["config", "batch", "precision", "s / iteration", "GFLOP / iteration", "GFLOP/s",
              "matmul GFLOP/s (same run)", "efficiency"]  # fmt: skip
    rows = []
    for r in result["runs"]:
        first = [r["config"], str(r["batch_size"]), r["precision"]]
        if "error" in r:
            rows.append([*first, f"error: {r['error']}", "", "", "", ""])
            continue
        rows.append(
            [*first, f"{r['s_per_iter']:.2f}", f"{r['gflop_per_iter']:.0f}", f"{r['achieved_gflops']:.0f}",
             f"{r['matmul_gflops']:.0f}", f"{r['efficiency']:.2f}"]
        )  # fmt: skip
    return markdown_table(header, rows)


def generate_table(result: dict[str, Any]) -> str:
    rows = []
    for size, r in result["results"].items():
        cells = []
        for mode in ("one_pass", "slab_8", "reference"):
            m = r["modes"].get(mode)
            cells.append("-" if not m or "time_s" not in m else f"{m['time_s']:.2f} s, {m['peak_mb']:.0f} MB")
        rows.append([f"{size}^3", *cells])
    return markdown_table(["size", "one pass", "`--slab 8`", "reference maths"], rows)


def preprocess_table(result: dict[str, Any]) -> str:
    rows = [
        [f"{r['series']}, {r['slices']} slices", f"{r['decode_floor_s']:.3f} s", f"{r['read_s']:.3f} s",
         f"{r['preprocess_s']:.3f} s", f"{r['ratio_total_to_floor']:.2f}"]
        for r in result["results"]
    ]  # fmt: skip
    return markdown_table(["series", "decode only", "read", "preprocess", "ratio to decode"], rows)


def render() -> str:
    """The markdown block between BEGIN and END."""
    parts = [BEGIN]
    sections = (
        ("preprocess_bench.json", "Reading and preprocessing one series onto the 256^3 grid at 1.5 mm, against "
         "decoding its pixels alone (`benchmarks/preprocess_bench.py`", preprocess_table),
        ("encode_bench.json", "Encoding a DICOM cohort, seconds per series (`benchmarks/encode_bench.py`",
         encode_table),
        ("train_speed.json", "One training iteration (`benchmarks/train_speed.py`; efficiency: the median over "
         "iterations of achieved GFLOP/s over the matmul rate measured right after each", train_table),
        ("model_bench.json", "Generating one volume, fp32, time and peak memory above the loaded model "
         "(`benchmarks/model_bench.py`", generate_table),
    )  # fmt: skip
    for name, title, table in sections:
        result = _read(name)
        if result:
            parts += ["", f"{title}; {machine_line(result)}):", "", table(result)]
    parts += ["", END]
    return "\n".join(parts)


def main() -> int:
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
