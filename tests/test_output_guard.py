"""No command writes over one of its inputs, or over a file it did not write, unless told to."""

import os
import time
from pathlib import Path

import pandas as pd
import pytest

from hagan_clinic.errors import HaganError
from hagan_clinic.io.files import LEDGER_NAME, Outputs, csv_safe, csv_safe_frame, table_format

from conftest import run_cli


def test_refuses_an_input_and_a_foreign_file(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    guard = Outputs("encode", inputs=[model])
    with pytest.raises(HaganError, match="input of this command"):
        guard.check(model)
    other = tmp_path / "notes.csv"
    other.write_text("mine\n")
    with pytest.raises(HaganError, match="not written by hagan-clinic encode"):
        guard.check(other)
    assert other.read_text() == "mine\n" and model.read_bytes() == b"weights"


def test_overwrite_allows_and_new_files_pass(tmp_path):
    other = tmp_path / "notes.csv"
    other.write_text("mine\n")
    Outputs("encode", overwrite=True).write_text(other, "new\n")
    assert other.read_text() == "new\n"
    Outputs("encode").write_text(tmp_path / "fresh.csv", "x\n")
    assert (tmp_path / "fresh.csv").read_text() == "x\n"


def test_a_command_may_replace_its_own_output_but_not_anothers(tmp_path):
    out = tmp_path / "table.csv"
    Outputs("encode").write_text(out, "a\n")
    Outputs("encode").write_text(out, "b\n")  # a re-run replaces its own file
    assert out.read_text() == "b\n"
    with pytest.raises(HaganError, match="not written by hagan-clinic predict"):
        Outputs("predict").check(out)
    assert (tmp_path / LEDGER_NAME).is_file()


def test_a_changed_file_is_no_longer_ours(tmp_path):
    out = tmp_path / "table.csv"
    Outputs("encode").write_text(out, "a\n")
    time.sleep(0.01)
    out.write_text("edited by hand, longer\n")
    with pytest.raises(HaganError, match="not written"):
        Outputs("encode").check(out)


def test_a_garbage_ledger_protects_rather_than_crashes(tmp_path):
    out = tmp_path / "table.csv"
    out.write_text("a\n")
    (tmp_path / LEDGER_NAME).write_bytes(b"\x00\xff not json")
    with pytest.raises(HaganError, match="not written"):
        Outputs("encode").check(out)


def test_a_folder_or_a_link_to_an_input_is_refused(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(HaganError, match="not a regular file"):
        Outputs("encode").check(tmp_path / "dir")
    src = tmp_path / "features.parquet"
    src.write_bytes(b"x")
    os.symlink(src, tmp_path / "link.parquet")
    with pytest.raises(HaganError, match="input"):
        Outputs("predict", inputs=[src]).check(tmp_path / "link.parquet")


def test_failed_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "table.csv"
    guard = Outputs("encode")
    guard.write_text(out, "a\n")
    with pytest.raises(RuntimeError), guard.target(out) as tmp:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")
    assert out.read_text() == "a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_NAME, "table.csv"]


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+cmd", "'+cmd"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("-2+3", "'-2+3"),
        ("\t=1", "'\t=1"),
        ("-1.5", "-1.5"),
        ("P001", "P001"),
        (3, 3),
    ],
)
def test_csv_safe(cell, expected):
    assert csv_safe(cell) == expected


def test_csv_safe_frame_leaves_numbers(tmp_path):
    table = pd.DataFrame({"patient_id": ["=1+1", "P2"], "z0": [-1.0, 2.0]})
    safe = csv_safe_frame(table)
    assert safe["patient_id"].tolist() == ["'=1+1", "P2"] and safe["z0"].tolist() == [-1.0, 2.0]
    assert table["patient_id"][0] == "=1+1"  # the caller's frame is not changed


@pytest.mark.parametrize(
    "name, fmt, default, expected",
    [
        ("t.csv", None, None, "csv"),
        ("t.CSV", None, "parquet", "csv"),
        ("t.parquet", None, "csv", "parquet"),
        ("t.pq", None, None, "parquet"),
        ("t", None, "parquet", "parquet"),  # no suffix: the command's usual format
        ("t", None, "csv", "csv"),
        ("t", "csv", "parquet", "csv"),
        ("t.tsv", "csv", "csv", "csv"),  # a suffix that says no format: --format decides
        ("t.csv", "csv", None, "csv"),
        ("t.tsv", None, "csv", "name a table .csv or .parquet"),  # never CSV text under another suffix unasked
        ("t.txt", None, "parquet", "name a table .csv or .parquet"),
        ("t", None, None, "name a table .csv or .parquet"),
        ("t.parquet", "csv", "csv", "the name says parquet but --format is csv"),
        ("t.csv", "parquet", None, "the name says csv but --format is parquet"),
        ("t.csv", "xlsx", None, "unknown table format"),
        (".csv", None, "parquet", "csv"),  # a hidden file's name is all suffix: it still says CSV
        (".parquet", "csv", None, "the name says parquet but --format is csv"),
        ("t.", None, "csv", "name a table .csv or .parquet"),
    ],
)
def test_one_table_format_rule(name, fmt, default, expected):
    if expected in ("csv", "parquet"):
        assert table_format(name, fmt, default) == expected
    else:
        with pytest.raises(HaganError, match=expected):
            table_format(name, fmt, default)


def test_no_command_writes_a_table_under_a_name_that_says_another_format(tmp_path, capsys):
    """predict wrote CSV text into p.tsv and qct refused a name without a suffix: one rule now holds for both."""
    features, model = tmp_path / "features.csv", tmp_path / "model.joblib"
    features.write_text("patient_id,z0\nP1,0.5\n")
    model.write_bytes(b"not read before the check")
    for out in ("p.tsv", "p.txt"):
        code, err = _cli(["predict", "--model", str(model), "--features", str(features), "--out", str(tmp_path / out)],
                         capsys)  # fmt: skip
        assert code == 2 and "name a table .csv or .parquet, or give --format" in err
        assert not (tmp_path / out).exists()
    code, err = _cli(["qct", str(tmp_path / "none"), "--out", str(tmp_path / "q")], capsys)
    assert code == 2 and "format" not in err  # a name without a suffix is the command's usual CSV: the run starts


# ---------------------------------------------------------------- through the commands
def _cli(argv, capsys):
    code, _, err = run_cli(capsys, *argv)
    return code, err.strip()


def test_encode_never_writes_over_its_checkpoint_or_a_source_file(tmp_path, checkpoint, capsys):
    src = tmp_path / "dicom"
    src.mkdir()
    slice_file = src / "IM0001.dcm"
    slice_file.write_bytes(b"\0" * 128 + b"DICM" + b"scan")
    before = checkpoint.read_bytes()
    # --format: a .pt or .dcm name says no table format, and the guard is what is tested here
    code, err = _cli(["encode", str(src), "--checkpoint", str(checkpoint), "--out", str(checkpoint),
                      "--format", "parquet", "--no-tracking"], capsys)  # fmt: skip
    assert code == 2 and "input of this command" in err and len(err) < 300
    assert checkpoint.read_bytes() == before
    code, err = _cli(["encode", str(src), "--checkpoint", str(checkpoint), "--out", str(slice_file),
                      "--format", "parquet", "--no-tracking"], capsys)  # fmt: skip
    assert code == 2 and "not written by hagan-clinic encode" in err and "--overwrite" in err
    assert slice_file.read_bytes().endswith(b"scan")


def test_predict_never_writes_over_its_features_or_its_model(tmp_path, capsys):
    features, model = tmp_path / "features.csv", tmp_path / "model.joblib"
    features.write_text("patient_id,z0\nP1,0.5\n")
    model.write_bytes(b"not read before the check")
    for target in (features, model):
        before = target.read_bytes()
        argv = ["predict", "--model", str(model), "--features", str(features), "--out", str(target), "--format", "csv"]
        code, err = _cli(argv, capsys)
        assert code == 2 and "input of this command" in err
        assert target.read_bytes() == before


@pytest.mark.slow
def test_regress_leaves_a_foreign_file_in_its_folder_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("someone else's\n")
    features, clinical = tmp_path / "f.csv", tmp_path / "c.csv"
    features.write_text("patient_id,z0\n" + "".join(f"P{i},{i}\n" for i in range(12)))
    clinical.write_text("patient_id,fev1pp\n" + "".join(f"P{i},{50 + 3 * i}\n" for i in range(12)))
    argv = ["regress", "--features", str(features), "--clinical", str(clinical), "--targets", "fev1pp",
            "--out", str(out), "--no-tracking"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 2 and "predictions.csv exists and was not written by hagan-clinic regress" in err
    assert (out / "predictions.csv").read_text() == "someone else's\n"
    assert not (out / "metrics.json").exists()  # refused before any work
    assert _cli([*argv, "--overwrite"], capsys)[0] == 0
    assert _cli(argv, capsys)[0] == 0  # its own files: a re-run needs no --overwrite


def test_phantoms_refuse_a_folder_of_other_patients(tmp_path, capsys):
    out = tmp_path / "cohort"
    (out / "PH0001").mkdir(parents=True)
    (out / "PH0001" / "mine.dcm").write_bytes(b"x")
    code, err = _cli(["phantoms", str(out), "--n", "1", "--shape", "16,16,16"], capsys)
    assert code == 2 and "not part of a phantom cohort" in err
    assert (out / "PH0001" / "mine.dcm").read_bytes() == b"x"
    fresh = tmp_path / "fresh"
    assert _cli(["phantoms", str(fresh), "--n", "1", "--shape", "16,16,16"], capsys)[0] == 0
    assert _cli(["phantoms", str(fresh), "--n", "1", "--shape", "16,16,16"], capsys)[0] == 0  # its own cohort


def test_generate_and_import_never_replace_a_foreign_file(tmp_path, checkpoint, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "sample_0000.nii.gz").write_bytes(b"a scan of mine")
    code, err = _cli(["generate", "--checkpoint", str(checkpoint), "--out", str(out)], capsys)
    assert code == 2 and "sample_0000.nii.gz exists" in err
    assert (out / "sample_0000.nii.gz").read_bytes() == b"a scan of mine"
    ref = tmp_path / "G.pth"
    ref.write_bytes(b"reference weights")
    code, err = _cli(["import-reference", "--generator", str(ref), "--encoder", str(ref), "--sub-encoder", str(ref),
                      "--size", "128", "--out", str(ref)], capsys)  # fmt: skip
    assert code == 2 and "input of this command" in err and ref.read_bytes() == b"reference weights"


def test_neutralised_cells_read_back_as_written(tmp_path):
    """IDs such as '-A12' must still join after a CSV round trip; so must the manifest's coordinate lists."""
    from hagan_clinic.io.files import read_csv_table, write_rows

    rows = [{"patient_id": "-A12", "grid_origin": "-180.5 -183.1 -330.0"}, {"patient_id": "=1+1", "grid_origin": ""}]
    write_rows(tmp_path / "t.csv", rows, ["patient_id", "grid_origin"])
    assert "'-A12" in (tmp_path / "t.csv").read_text()  # what a spreadsheet sees: text
    back = read_csv_table(tmp_path / "t.csv", "table", dtype=str, keep_default_na=False)
    assert back.to_dict("records") == rows


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder"])
def test_a_special_file_where_a_table_belongs_is_refused_not_read(tmp_path, kind):
    from hagan_clinic.io.files import read_csv_table

    path = tmp_path / "manifest.csv"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    with pytest.raises(HaganError, match="not a regular file"):
        read_csv_table(path, "manifest")


@pytest.mark.slow
def test_a_cache_or_table_made_before_outputs_were_recorded_is_still_ours(tmp_path, checkpoint, capsys):
    """A cache whose cache.json and state show it is ours (made by an older version, or copied, so no ledger) is
    re-run without --overwrite; so is an encode whose state folder sits beside its table."""
    from hagan_clinic.phantoms import write_cohort

    write_cohort(tmp_path / "cohort", 2, seed=0, shape=(24, 48, 48), progress=False, extras=False)
    cache, table = tmp_path / "cache", tmp_path / "f.csv"
    prep = ["preprocess", str(tmp_path / "cohort"), "--out", str(cache), "--config", "tiny"]
    enc = ["encode", str(cache), "--checkpoint", str(checkpoint), "--out", str(table), "--no-tracking"]
    assert _cli(prep, capsys)[0] == 0 and _cli(enc, capsys)[0] == 0
    (cache / LEDGER_NAME).unlink()
    (tmp_path / LEDGER_NAME).unlink()
    assert _cli(prep, capsys)[0] == 0
    assert _cli(enc, capsys)[0] == 0


@pytest.mark.slow
def test_coarse_grids_of_existing_models_still_load(tmp_path):
    """Checkpoints made before the config ranges (a 50 mm grid, a learning rate above 1) still load."""
    from hagan_clinic.config import load_config
    from hagan_clinic.models.hagan import HAGAN, load_checkpoint

    cfg = load_config("tiny", ["data.spacing_mm=[50,50,50]", "train.lr_d=2.0"])
    HAGAN.from_config(cfg).save(tmp_path / "coarse.pt")
    model = load_checkpoint(tmp_path / "coarse.pt")
    assert model.config.data.spacing_mm == (50.0,) * 3 and model.config.train.lr_d == 2.0


def test_an_output_folder_that_cannot_be_made_is_one_line_exit_2(tmp_path, capsys):
    """A file in the way of the output folder (or /proc, a read-only mount): the environment's fault, not ours."""
    (tmp_path / "blocker").write_text("a file, not a folder")
    features, clinical = tmp_path / "f.csv", tmp_path / "c.csv"
    features.write_text("patient_id,z0\n" + "".join(f"P{i},{i}\n" for i in range(12)))
    clinical.write_text("patient_id,y\n" + "".join(f"P{i},{50 + 3 * i}\n" for i in range(12)))
    argv = ["regress", "--features", str(features), "--clinical", str(clinical), "--targets", "y",
            "--out", str(tmp_path / "blocker" / "out"), "--no-tracking"]  # fmt: skip
    code, err = _cli(argv, capsys)
    assert code == 2 and err.startswith("hagan-clinic: error: cannot create the folder") and "internal" not in err


@pytest.mark.slow
def test_an_edited_output_is_not_adopted_even_beside_its_state(tmp_path, checkpoint, capsys):
    from hagan_clinic.phantoms import write_cohort

    write_cohort(tmp_path / "cohort", 1, seed=0, shape=(24, 48, 48), progress=False, extras=False)
    table = tmp_path / "f.csv"
    enc = ["encode", str(tmp_path / "cohort"), "--checkpoint", str(checkpoint), "--out", str(table), "--no-tracking"]
    assert _cli(enc, capsys)[0] == 0
    table.write_text("my own notes, replacing the table\n")
    code, err = _cli(enc, capsys)
    assert code == 2 and "not written by hagan-clinic encode" in err
    assert table.read_text() == "my own notes, replacing the table\n"


def test_apostrophes_of_the_values_themselves_survive_the_round_trip(tmp_path):
    from hagan_clinic.io.files import read_csv_table, write_rows

    rows = [{"id": v} for v in ["'=y", "=y", "'x", "''", "-A1", "O'Brien"]]
    write_rows(tmp_path / "t.csv", rows, ["id"])
    assert read_csv_table(tmp_path / "t.csv", "t", dtype=str, keep_default_na=False).to_dict("records") == rows


def test_qct_never_deletes_through_a_linked_state_folder(tmp_path, capsys):
    from hagan_clinic.phantoms import write_cohort

    write_cohort(tmp_path / "cohort", 1, seed=0, shape=(24, 48, 48), progress=False, extras=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    (tmp_path / ".q.csv.state").symlink_to(mine)
    code, err = _cli(["qct", str(tmp_path / "cohort"), "--out", str(tmp_path / "q.csv")], capsys)
    assert code == 2 and "not the state folder" in err
    assert (mine / "keep.txt").read_text() == "x"


def test_augment_with_too_few_patients_says_so():
    import numpy as np

    from hagan_clinic.config import load_config
    from hagan_clinic.pipelines.augment import split

    labels, groups = np.array([0, 1, 0]), np.array(["a", "b", "c"])
    with pytest.raises(HaganError, match="too few"):
        split(labels, groups, load_config("tiny"))
