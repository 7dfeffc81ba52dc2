"""benchmarks/gpu_check.py on the CPU: the quick run end to end (every section, the structure and consistency of
its JSON, never a timing value), a missing GPU, MPS and a failing device refused in one line, the budget's skips,
one section's or one row's failure recorded while the rest still runs, and a timed-out child killed with its
whole process group."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return benchmark_module("gpu_check")


def run_script(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SCRIPT), *(str(a) for a in args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "x.json"
    # a budget no quick run reaches: a slow machine must not skip rows (the budget's rules have their own tests)
    proc = run_script("--device", "cpu", "--quick", "--budget", "100000", "--out", out, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    sections = doc["sections"]
    assert list(sections) == ["parity", "train", "slab", "encode", "torchrun"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ok")
    assert all(s["wall_s"] >= 0 for s in sections.values())

    # the header: the command line and the machine's matmul rates; the device only in the machine record, and no
    # path of this machine's Python (the torchrun command names "python")
    assert doc["benchmark"] == "gpu_check"
    assert doc["argv"][1:] == ["--device", "cpu", "--quick", "--budget", "100000", "--out", str(out)]
    assert set(doc["machine"]["matmul_gflops"]) == {"fp32", "bf16"} and doc["machine"]["matmul_size"] == 512
    assert doc["machine"]["device"] == "cpu" and "gpu" not in doc["machine"] and doc["quick"] is True
    assert not {"device", "gpu", "command"} & set(doc) and sys.executable not in out.read_text()

    # parity: the CPU against itself is exact
    for what, shape in (("generate", [2, 1, 32, 32, 32]), ("encode", [2, 32])):
        res = sections["parity"][what]
        assert res["shape"] == shape and res["max_abs_diff"] == 0.0 and res["agree"] is True, what
        assert res["corr"] == pytest.approx(1.0)

    # training: every size and precision has a row; fp16 beyond the first size is skipped on the CPU, with why
    rows = {(r["size"], r["precision"]): r for r in sections["train"]["rows"]}
    assert set(rows) == {(s, p) for s in (32, 64) for p in ("fp32", "bf16", "fp16")}
    assert rows[64, "fp16"]["status"] == "skipped" and "fp16 on the CPU" in rows[64, "fp16"]["reason"]
    ran = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ran) == 5
    for r in ran:
        assert r["it_per_s"] > 0 and r["losses_finite"] is True and len(r["times_s"]) == 2
        assert r["s_per_iter"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["it_per_s"] == pytest.approx(1 / r["s_per_iter"])
        assert r["peak_kind"] == "cpu_ru_maxrss_rise" and r["peak_mb"] >= 0
        assert set(r["last_losses"]) >= {"loss_D", "loss_G", "loss_EH", "loss_EG"}
        assert r["gflop_per_step"] > 0 and set(r["tf32"]) == {"matmul", "cudnn"}
        if r["precision"] == "fp16":  # no fp16 matmul rate on a CPU
            assert r["matmul_gflops"] is None and r["efficiency"] is None
        else:
            assert r["matmul_gflops"] == doc["machine"]["matmul_gflops"][r["precision"]]
            assert r["efficiency"] == pytest.approx(r["gflop_per_step"] / r["s_per_iter"] / r["matmul_gflops"])

    # slab generation: both slab widths give the same volume
    slab = sections["slab"]["rows"]
    assert [(r["precision"], r["slab"]) for r in slab] == [("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)]
    for r in slab:
        assert r["status"] == "ok" and r["shape"] == [1, 1, 64, 64, 64] and r["finite"] is True
        assert -1.0 <= r["min"] <= r["max"] <= 1.0
    assert slab[1]["max_abs_diff_vs_slab_1"] <= 1e-5
    # bf16 (8 bits of mantissa): 0.0 here; 0.05 is six of its steps at 1.0, far below a misplaced slab's error
    assert slab[3]["max_abs_diff_vs_slab_1"] <= 0.05

    # encode: every series encoded at both precisions, the bf16 features close to the fp32 ones
    enc = sections["encode"]
    assert [r["precision"] for r in enc["rows"]] == ["fp32", "bf16"]
    for r in enc["rows"]:
        assert r["status"] == "ok" and r["counts"]["ok"] == 2 and r["series_per_min"] > 0 and r["warmup_s"] > 0
    assert enc["bf16_vs_fp32"]["finite"] is True and enc["bf16_vs_fp32"]["corr"] > 0.9

    # torchrun: exit 0 and the final state written
    tr = sections["torchrun"]
    assert tr["returncode"] == 0 and tr["state_written"] is True and tr["model_written"] is True
    assert tr["last_metrics"]["iteration"] == tr["iterations"]
    assert tr["command"].startswith("python -m torch.distributed.run ")

    # the table on stdout, one progress line per section on stderr
    table = proc.stdout.splitlines()
    assert table[0].split()[:3] == ["section", "status", "wall_s"] and table[-1] == f"wrote {out}"
    assert [line.split()[:2] for line in table if line and not line.startswith(" ")][1:-1] == [
        [name, "ok"] for name in sections
    ]
    progress = [line for line in proc.stderr.splitlines() if line.startswith("gpu_check: ")]
    assert [line.split()[1] for line in progress] == list(sections)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_exits_2_in_one_line(tmp_path):
    out = tmp_path / "x.json"
    proc = run_script("--device", "cuda", "--quick", "--out", out, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "CUDA is not available" in proc.stderr
    assert not out.exists()


def test_a_spent_budget_skips_every_section_with_its_reason(gpu_check, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--budget", "0", "--out", str(out)]) == 0
    sections = json.loads(out.read_text())["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for s in sections.values():
        assert s["status"] == "skipped" and "budget of 0 s was spent" in s["reason"]
    assert f"wrote {out}" in capsys.readouterr().out


def test_a_step_that_would_overrun_its_share_is_skipped(gpu_check, tmp_path):
    """Each section may spend its share of the budget plus what the ones before it left (parity 5 %, train 45 %)."""
    check = gpu_check.Check(torch.device("cpu"), "cpu", True, 100.0, tmp_path / "x.json", tmp_path, {}, {})
    check.start = time.perf_counter() - 45  # 45 s used of 100
    assert "would pass the 50 s" in check.over_budget("train", 10.0)
    assert check.over_budget("train", 2.0) is None
    assert "would pass the 5 s" in check.over_budget("parity", 0.0)
    assert check.over_budget("torchrun", 50.0) is None  # up to the whole budget


def test_a_failing_section_is_recorded_and_the_others_still_run(gpu_check, tmp_path, monkeypatch, capsys):
    ran = []

    def fails(check, res):
        raise RuntimeError("out of memory\nat line 2")

    def works(check, res):
        assert json.loads(check.out.read_text())["sections"]["parity"]["status"] == "error"  # written already
        ran.append(res)
        res["figure"] = 1

    def one_row_fails(check, res):
        """Rows as train and slab make them: the failed row is recorded, the next one still runs."""
        res["rows"] = [{"precision": "fp16"}, {"precision": "fp32"}]
        gpu_check.attempt(check, res["rows"][0], lambda: fails(check, res))
        assert json.loads(check.out.read_text())["sections"]["slab"]["rows"][0]["status"] == "error"
        gpu_check.attempt(check, res["rows"][1], lambda: {"time_s": 1.0})

    runners = {name: fails if name == "parity" else works for name in gpu_check.SECTIONS}
    runners["slab"] = one_row_fails
    monkeypatch.setattr(gpu_check, "RUNNERS", runners)  # the table prints these figureless sections as they are
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 1
    sections = json.loads(out.read_text())["sections"]
    assert sections["parity"] == {"status": "error", "error": "RuntimeError: out of memory at line 2",
                                  "wall_s": sections["parity"]["wall_s"]}  # one line  # fmt: skip
    assert len(ran) == 3 and all(sections[n] == {"status": "ok", "figure": 1, "wall_s": sections[n]["wall_s"]}
                                 for n in ("train", "encode", "torchrun"))  # fmt: skip
    slab = sections["slab"]
    assert slab["status"] == "error" and slab["error"] == "fp16: RuntimeError: out of memory at line 2"
    assert slab["rows"] == [{"precision": "fp16", "status": "error", "error": "RuntimeError: out of memory at line 2"},
                            {"precision": "fp32", "status": "ok", "time_s": 1.0}]  # fmt: skip
    assert "RuntimeError: out of memory at line 2" in capsys.readouterr().out


def test_mps_is_refused_in_one_line(gpu_check, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "mps", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr()
    assert err.out == "" and len(err.err.strip().splitlines()) == 1 and "not synchronised" in err.err
    assert not out.exists()


def test_a_device_failing_its_first_matmuls_is_recorded_and_exits_2(gpu_check, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available\nfor execution on the device")

    monkeypatch.setattr(gpu_check, "record", broken)
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr()
    assert err.out == "" and len(err.err.strip().splitlines()) == 1 and "failed its first matmuls" in err.err
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "gpu_check" and doc["sections"] == {} and doc["machine"]["device"] == "cpu"
    assert doc["error"] == "RuntimeError: CUDA error: no kernel image is available for execution on the device"


def test_the_reference_matmul_is_large_on_a_gpu(gpu_check):
    """One 2048^2 matmul on a GPU is bound by its launch: the rate there comes from 8192^2."""
    assert gpu_check.matmul_size(torch.device("cuda"), quick=False) == 8192
    assert gpu_check.matmul_size(torch.device("cuda", 0), quick=True) == 8192
    assert gpu_check.matmul_size(torch.device("cpu"), quick=False) == 2048
    assert gpu_check.matmul_size(torch.device("cpu"), quick=True) == 512


def test_an_encode_row_that_raises_is_recorded_and_each_precision_warms_up(gpu_check, tmp_path, monkeypatch, capsys):
    """The encoder run fails for bf16 after its row exists: the row says so, the fp32 row stands, the table prints
    and the JSON is whole. Each precision's timed run follows a warm-up at that precision."""
    import hagan_clinic.pipelines.encode as encode_pipeline

    calls = []

    def fake_run(src, opts, tracker=None):
        calls.append(("cohort" if Path(src).name == "cohort" else "warm-up", opts.precision))
        if calls[-1] == ("cohort", "bf16"):
            raise RuntimeError("bf16 kernel missing\nat line 2")
        return SimpleNamespace(counts={"ok": 2}, seconds={"read": 0.5, "encode": 0.25})

    monkeypatch.setattr(encode_pipeline, "run", fake_run)
    runners = dict.fromkeys(gpu_check.SECTIONS, lambda check, res: None)
    monkeypatch.setattr(gpu_check, "RUNNERS", {**runners, "encode": gpu_check.encode})
    out = tmp_path / "x.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 1
    assert calls == [("warm-up", "fp32"), ("cohort", "fp32"), ("warm-up", "bf16"), ("cohort", "bf16")]
    enc = json.loads(out.read_text())["sections"]["encode"]
    fp32, bf16 = enc["rows"]
    assert fp32["status"] == "ok" and fp32["counts"] == {"ok": 2} and fp32["encoder_series_per_min"] > 0
    assert bf16 == {"precision": "bf16", "status": "error", "error": "RuntimeError: bf16 kernel missing at line 2"}
    assert enc["status"] == "error" and enc["error"] == "bf16: RuntimeError: bf16 kernel missing at line 2"
    table = capsys.readouterr().out.splitlines()
    assert table[-1] == f"wrote {out}"
    assert any(line.strip() == "bf16: error: RuntimeError: bf16 kernel missing at line 2" for line in table)


def test_the_table_prints_rows_a_section_left_half_written(gpu_check):
    report = benchmark_module("gpu_check_report")
    sections = {
        "train": {"status": "error", "wall_s": 1.0, "rows": [{"size": 32, "precision": "fp32"}]},  # no status
        "slab": {"status": "ok", "wall_s": 2.0, "rows": [{"precision": "bf16", "slab": 4, "status": "ok"}]},
        "encode": {"status": "running"},  # no wall time yet
    }
    lines = report.table(sections).splitlines()
    assert [line.split()[:2] for line in lines if not line.startswith(" ")] == [
        ["section", "status"], ["train", "error"], ["slab", "ok"], ["encode", "running"]
    ]  # fmt: skip
    assert "32^3 fp32: unfinished" in lines[1] and "bf16 slab=4: ok, figures incomplete (KeyError" in lines[2]


def test_train_row_counts_its_flops_and_records_tf32(gpu_check, tmp_path):
    from hagan_clinic.config import load_config

    machine = {"matmul_gflops": {"fp32": 50.0, "bf16": 100.0}}
    check = gpu_check.Check(torch.device("cpu"), "cpu", True, 100.0, tmp_path / "x.json", tmp_path, machine, {})
    cfg = load_config("tiny", ["model.size=32", "train.precision=fp32", "train.batch_size=2"])
    # the reverse of torch's defaults (matmul off, cuDNN on), so that a row reporting the defaults fails
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
    try:
        row = gpu_check.train_row(check, cfg, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert row["gflop_per_step"] > 0 and row["matmul_gflops"] == 50.0
    assert row["efficiency"] == pytest.approx(row["gflop_per_step"] / row["s_per_iter"] / 50.0)
    assert row["tf32"] == {"matmul": True, "cudnn": False}


def test_a_timed_out_child_is_killed_with_its_whole_process_group(gpu_check, tmp_path):
    """A grandchild that left its parent (as a worker can) holds the output pipe: only killing the group frees it."""
    cmd = ["sh", "-c", "(sleep 300 & echo $!); sleep 300"]
    got: list[tuple[str, int | None]] = []
    thread = threading.Thread(target=lambda: got.append(gpu_check.run_with_timeout(cmd, tmp_path, 1.0)), daemon=True)
    thread.start()
    thread.join(120)  # without the group kill, this would wait for the orphan's 300 s
    assert got, "run_with_timeout did not return"
    log, code = got[0]
    assert code is None and log.startswith("(timed out after 1 s)")
    orphan = int(log.splitlines()[1])
    try:
        state = Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state  # killed (a zombie until its new parent reaps it)
