"""Every benchmark result says which machine, under which load and from which command it was measured.

``benchmarks/machine.py`` records the machine (host, threads, load, fp32 and bf16 matmul rates) and writes results
under one header; the benchmarks are run here as the scripts they are, on tiny settings, into a temporary folder.
Only the structure of what they write is checked, never a timing value.
"""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
#: The committed results that report speeds, each of which must say on which machine it was measured.
SPEED_RESULTS = (
    "model_bench.json",
    "model_bench_quick.json",
    "preprocess_bench.json",
    "train_speed.json",
    "train_speed_quick.json",
    "train_speed_reference_maths_128.json",
    "encode_bench.json",
    "encode_variants_256.json",
    "scaling.json",
    "loss_curve.json",
    "gpu_check.json",
)
#: Results that are no speed measurement (model quality, a validation report), and memory_table.json: measured on
#: 2026-11-25, before results carried the machine header (its .md says so; the forward pass it times is unchanged
#: since). Every other JSON is one of the above.
OTHER_RESULTS = ("phantom_regress_metrics.json", "real_data_validation.json", "memory_table.json")


machine = benchmark_module("machine")


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """A benchmark script run as a user runs it, from the repository root."""
    cmd = [sys.executable, *(str(a) for a in args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def assert_stamped(doc: dict[str, Any], name: str | None = None) -> None:
    """The header every result carries: benchmark, created, argv and the machine with its matmul rate and load."""
    missing = [k for k in machine.REQUIRED if k not in doc]
    assert missing == [], f"missing top-level keys {missing}"
    if name is not None:
        assert doc["benchmark"] == name
    assert isinstance(doc["argv"], list) and doc["argv"]
    host = doc["machine"]
    assert isinstance(host, dict), "machine must be the recorded machine, not a name"
    rates = host.get("matmul_gflops")
    assert isinstance(rates, dict) and rates, "machine.matmul_gflops missing"
    assert all(v > 0 for v in rates.values()), rates
    for key in ("load", "load_end"):
        assert key in host, f"machine.{key} missing"
        assert len(host[key]["loadavg"]) == 3


# --- machine.py ---------------------------------------------------------------------------------------------------


def test_record_has_the_matmul_rates_load_and_threads():
    host = machine.record("cpu", n=128)
    assert set(host["matmul_gflops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in host["matmul_gflops"].values())
    assert host["matmul_size"] == 128
    assert len(host["load"]["loadavg"]) == 3
    assert isinstance(host["threads"], int) and host["threads"] >= 1
    assert host["device"] == "cpu" and isinstance(host["env"], dict)


def test_write_result_writes_the_header_then_the_body(tmp_path):
    host = {"cpu": "x", "load": machine.load(), "matmul_gflops": {"fp32": 1.0}}
    path = machine.write_result(tmp_path / "r.json", "demo_bench", host, {"results": [1, 2]})
    doc = json.loads(path.read_text())
    assert list(doc)[: len(machine.REQUIRED)] == list(machine.REQUIRED)
    assert doc["argv"] == sys.argv
    assert doc["results"] == [1, 2]
    assert_stamped(doc, "demo_bench")
    assert "load_end" not in host  # the caller's record is not changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_failed_write_result_keeps_the_previous_file(tmp_path, monkeypatch):
    path = machine.write_result(tmp_path / "r.json", "demo_bench", {"load": machine.load()}, {"results": [1]})
    before = path.read_bytes()
    write_text = Path.write_text

    def half_then_fail(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m, pytest.raises(OSError, match="No space"):
        m.setattr(Path, "write_text", half_then_fail)
        machine.write_result(path, "demo_bench", {"load": machine.load()}, {"results": [2]})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# --- the benchmarks, run on tiny settings ---------------------------------------------------------------------------


def test_preprocess_bench_result_is_stamped(tmp_path):
    out = tmp_path / "pre.json"
    args = ["--phantom", "24,48,48", "--config", "tiny", "--repeats", "1", "--out", out]
    _run(BENCHMARKS / "preprocess_bench.py", *args)
    doc = json.loads(out.read_text())
    assert_stamped(doc, "preprocess_bench")
    assert doc["argv"][1:] == [str(a) for a in args]
    assert set(doc["machine"]["matmul_gflops"]) == {"fp32", "bf16"}
    assert doc["config"] == "tiny" and doc["grid"].startswith("32^3")
    (res,) = doc["results"]
    assert res["series"] == "phantom 24,48,48" and res["slices"] == 24
    assert res["total_s"] == pytest.approx(res["read_s"] + res["preprocess_s"], abs=2e-3)


def test_model_bench_parent_does_not_import_torch():
    """Linux carries a parent's ru_maxrss into its children: the parent must stay light, machine.py included."""
    code = "import sys; sys.path.insert(0, 'benchmarks'); import model_bench; print('torch' in sys.modules)"
    assert _run("-c", code).stdout.strip() == "False"


def test_model_bench_quick_result_is_stamped(tmp_path):
    out = tmp_path / "mb.json"
    args = ["--quick", "--sizes", "64", "--modes", "one_pass", "--repeats", "1", "--threads", "1", "--out", out]
    _run(BENCHMARKS / "model_bench.py", *args)
    doc = json.loads(out.read_text())
    assert_stamped(doc, "model_bench")
    assert doc["argv"][1:] == [str(a) for a in args]
    host = doc["machine"]
    assert set(host["matmul_gflops"]) == {"fp32", "bf16"}
    assert host["threads"] == 1  # measured in a child with the benchmark's threads
    assert {"paper_128", "paper_256"} <= set(doc["parameters"])
    one_pass = doc["results"]["64"]["modes"]["one_pass"]
    assert one_pass["output_shape"] == [1, 1, 64, 64, 64]
    assert len(one_pass["loadavg_before"]) == len(one_pass["loadavg_after"]) == 3


def _model_bench_doc(created: str, mode: str, host: dict[str, Any]) -> dict[str, Any]:
    run = {"mode": mode, "slab": None, "time_s": 1.0, "times_s": [1.0], "peak_mb": 10.0, "parameters": {"G": 5}}
    results = {"64": {"config": "tiny", "overrides": ["model.size=64"], "modes": {mode: run}}}
    header = {"benchmark": "model_bench", "created": created, "argv": ["model_bench.py"], "machine": host}
    return {**header, "repeats": 1, "slabs": [], "modes": [mode], "results": results}


def test_model_bench_merge_keeps_every_source_machine(tmp_path):
    hosts = [
        {"cpu": name, "load": machine.load(), "load_end": machine.load(), "matmul_gflops": {"fp32": 2.0}}
        for name in "ab"
    ]
    paths = []
    for i, (mode, host) in enumerate(zip(("one_pass", "encode"), hosts)):
        paths.append(tmp_path / f"{mode}.json")
        paths[-1].write_text(json.dumps(_model_bench_doc(f"2020-01-0{i + 1}", mode, host)))
    out = tmp_path / "merged.json"
    _run(BENCHMARKS / "model_bench.py", "--merge", *paths, "--out", out)
    doc = json.loads(out.read_text())
    assert_stamped(doc, "model_bench")
    assert doc["argv"][-1] == str(out) and "--merge" in doc["argv"]
    assert doc["machine"]["cpu"] == "a"
    assert [s["machine"]["cpu"] for s in doc["sources"]] == ["a", "b"]
    assert set(doc["results"]["64"]["modes"]) == {"one_pass", "encode"}


# --- the committed results ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEED_RESULTS)
def test_committed_speed_result_says_which_machine(name):
    path = BENCHMARKS / "results" / name
    if name == "gpu_check.json" and not path.exists():  # written only where a GPU was lent
        pytest.skip(f"no {name} committed")
    assert_stamped(json.loads(path.read_text()))


def test_every_committed_result_is_known():
    """A new result file is either a speed result (and then checked for its header above) or named as another kind."""
    names = {p.name for p in (BENCHMARKS / "results").glob("*.json")}
    assert sorted(names - set(SPEED_RESULTS) - set(OTHER_RESULTS)) == []


def test_the_readme_speed_tables_are_the_committed_results():
    """README.md's speed tables are what benchmarks/tables.py makes from the committed results, with the machine
    each was measured on: re-running a benchmark without regenerating the README fails here."""
    proc = _run(BENCHMARKS / "tables.py")
    assert proc.returncode == 0, proc.stderr
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- speed tables: python benchmarks/tables.py -->")
    end = readme.index("<!-- end of speed tables -->") + len("<!-- end of speed tables -->")
    assert readme[start:end] == proc.stdout.strip()
    assert proc.stdout.count("matmul fp32") >= 4  # every table says which machine


def test_results_write_non_finite_numbers_as_null(tmp_path):
    """JSON has no NaN: a diverged loss or an undefined correlation is written as null, never as a bare NaN that
    strict readers refuse."""
    assert machine.json_safe({"a": [1.0, math.nan, math.inf], "b": (2, "x")}) == {"a": [1.0, None, None], "b": [2, "x"]}
    path = machine.write_result(tmp_path / "r.json", "x", {"cpu": "c"}, {"a": [1.0, math.nan]}, ["bench.py", "--q"])
    doc = json.loads(path.read_text())
    assert doc["a"] == [1.0, None] and doc["argv"] == ["bench.py", "--q"]


def test_agreement_of_two_outputs():
    """The correlation, max difference and scale of two outputs; equal constants agree, non-finite ones do not."""
    import numpy as np

    a = np.linspace(-1.0, 1.0, 50)
    same = machine.agreement(a, a)
    assert same == {"corr": pytest.approx(1.0), "max_abs_diff": 0.0, "scale": 1.0, "finite": True}
    shifted = machine.agreement(a, a + 0.25)
    assert shifted["corr"] == pytest.approx(1.0) and shifted["max_abs_diff"] == pytest.approx(0.25)
    assert machine.agreement(-a, a)["corr"] == pytest.approx(-1.0)
    assert machine.agreement(np.ones(4), np.ones(4))["corr"] == 1.0
    assert machine.agreement(np.ones(4), np.zeros(4))["corr"] == 0.0
    broken = a.copy()
    broken[3] = np.nan
    assert machine.agreement(a, broken)["finite"] is False
