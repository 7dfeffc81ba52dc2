"""One owner per concern, as executable rules: the sources are scanned for writers and library imports outside the
module that owns them, and the writers of DICOM, NIfTI and figures are made to fail mid-write to show that they
go through the one atomic writer (a crash leaves the previous file, or nothing, never half a file)."""

from __future__ import annotations

import ast
import errno
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("hagan_clinic", "pipelines")

#: Temp-file-and-rename by hand; io/files.py's atomic_target is the one place that does it.
HAND_WRITTEN_RENAME = re.compile(r"os\.replace\(|tempfile\.mkstemp\(|\.rename\(")
ATOMIC_WRITER = "hagan_clinic/io/files.py"

#: A library and the only modules that may import it (glob patterns relative to the repository).
LIBRARY_OWNERS = {
    "pydicom": ("hagan_clinic/io/dicom*.py",),
    "mlflow": ("hagan_clinic/tracking/*.py", "hagan_clinic/serving/*.py"),
    "nibabel": ("hagan_clinic/io/nifti.py",),
    "skops": ("hagan_clinic/io/model_file.py",),
}


def _sources() -> list[Path]:
    return sorted(p for folder in SOURCE_FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _imported(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_sources_are_found():
    names = {_name(p) for p in _sources()}
    expected = {ATOMIC_WRITER, "hagan_clinic/io/dicom.py", "hagan_clinic/tracking/__init__.py", "pipelines/cohort.py"}
    assert expected <= names


def test_temp_file_and_rename_only_in_the_atomic_writer():
    """Every file is written through hagan_clinic.io.files: no other module renames a temp file into place."""
    offenders = [
        f"{_name(p)}:{n}: {line.strip()}"
        for p in _sources()
        if _name(p) != ATOMIC_WRITER
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if HAND_WRITTEN_RENAME.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("library", sorted(LIBRARY_OWNERS))
def test_library_imported_only_by_its_owner(library):
    """pydicom only in io/dicom*.py, mlflow only in tracking/, nibabel only in io/nifti.py: every command reads
    and writes a format the same way, and a library can be replaced in one place."""
    owners = LIBRARY_OWNERS[library]
    users = [_name(p) for p in _sources() if library in _imported(p)]
    assert users, f"no module imports {library}: the rule checks nothing"
    assert [u for u in users if not any(Path(u).match(pattern) for pattern in owners)] == []


# ---------------------------------------------------------------- writers that fail mid-write
def _half_then_fail(target_arg: int):
    """A stand-in for a library's save that writes a few bytes to its target (argument ``target_arg``, a file name)
    and then fails as a full disk would."""

    def save(*args, **kwargs):
        Path(args[target_arg]).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_dicom_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from pydicom.dataset import Dataset

    from hagan_clinic.io.dicom_write import write_enhanced, write_series

    hu = np.full((2, 4, 4), 40.0, np.float32)
    monkeypatch.setattr(Dataset, "save_as", _half_then_fail(1))
    with pytest.raises(OSError, match="No space"):
        write_series(tmp_path / "series", hu, (1.0, 1.0, 1.0), patient_id="P1", shuffle=False)
    assert _files(tmp_path / "series") == []
    with pytest.raises(OSError, match="No space"):
        write_enhanced(tmp_path / "enhanced" / "frames.dcm", hu, (1.0, 1.0, 1.0), patient_id="P1")
    assert _files(tmp_path / "enhanced") == []


def test_failed_nifti_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import hagan_clinic.io.nifti as nifti
    from hagan_clinic.io.volume import Volume

    path = nifti.write_scan(tmp_path / "scan.nii.gz", Volume(hu=np.zeros((2, 3, 4), np.float32), spacing=(1, 1, 1)))
    before = path.read_bytes()
    monkeypatch.setattr(nifti.nib, "save", _half_then_fail(1))
    with pytest.raises(OSError, match="No space"):
        nifti.write_scan(path, Volume(hu=np.ones((2, 3, 4), np.float32), spacing=(1, 1, 1)))
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["scan.nii.gz"]


def test_failed_figure_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from hagan_clinic.plots import mid_slices_png

    rows = [("a", np.zeros((4, 4, 4), np.float32))]
    path = mid_slices_png(rows, tmp_path / "preview.png")
    before = path.read_bytes()
    monkeypatch.setattr(Figure, "savefig", _half_then_fail(1))
    with pytest.raises(OSError, match="No space"):
        mid_slices_png(rows, path)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["preview.png"]


def test_figure_write_that_cannot_start_says_why(tmp_path, monkeypatch):
    """A folder where no temp file can be made gives the system's reason, not an error about the plot code."""
    import hagan_clinic.io.files as files
    from hagan_clinic.plots import mid_slices_png

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.tempfile, "mkstemp", no_space)
    with pytest.raises(OSError, match="No space"):
        mid_slices_png([("a", np.zeros((4, 4, 4), np.float32))], tmp_path / "preview.png")
    assert _files(tmp_path) == []
