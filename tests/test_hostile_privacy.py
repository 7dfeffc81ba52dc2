"""``encode --pseudonymize``: with a salt, no file name, folder name or path of the cohort reaches anything the run
writes (table, report, state folder, tracker), whatever the readers put in their reasons; any salt works, bytes
that are not UTF-8 included. Without a salt, reasons name files relative to the source."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hagan_clinic.io.dicom_write import write_series
from hagan_clinic.pipelines.encode import EncodeOptions, run
from hagan_clinic.tracking import NullTracker

from conftest import ellipsoid_hu

SALT = "pepper-\udcff"  # a command line's way of passing the byte 0xff, which is not UTF-8
SECRETS = ("DOE", "JOHN", "SMITH", "JANE")


class Recorder(NullTracker):
    """A tracker that keeps what it is given in a folder: the parameters, and a copy of each artifact."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()

    def log_params(self, params) -> None:
        with open(self.folder / "params.jsonl", "a") as f:
            f.write(json.dumps(dict(params), default=str) + "\n")

    def log_artifact(self, path, artifact_path=None) -> None:
        shutil.copy(path, self.folder / Path(path).name)


@pytest.fixture
def cohort(tmp_path) -> Path:
    """Names everywhere: the root, the patient folders and every file. One series encodes; one has a slice whose
    pixel data is cut short (its reader names that file); one NIfTI file is garbage (nibabel quotes its path)."""
    root = tmp_path / "DOE_JOHN_site"
    for folder, number in (("ct", 2), ("ct_broken", 3)):
        written = write_series(root / "DOE_JOHN" / folder, ellipsoid_hu((16, 24, 32), number), (10.0, 10.0, 10.0),
                               patient_id="DOE_JOHN", series_number=number, patient_name="DOE^JOHN")  # fmt: skip
        for i, path in enumerate(sorted(written)):
            path.rename(path.with_name(f"DOE_JOHN_slice{i}.dcm"))
    cut = root / "DOE_JOHN" / "ct_broken" / "DOE_JOHN_slice5.dcm"
    cut.write_bytes(cut.read_bytes()[:-300])
    (root / "SMITH_JANE").mkdir()
    (root / "SMITH_JANE" / "SMITH_JANE_ct.nii").write_bytes(b"garbage" * 64)
    return root


def _written(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` as text; the state's batch rows decoded (numpy stores them as UTF-32)."""
    texts = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                texts[str(path)] = str(data["rows"])
        elif path.suffix == ".parquet":
            texts[str(path)] = pd.read_parquet(path).to_csv()
        else:
            texts[str(path)] = path.read_bytes().decode("utf-8", "replace")
    return texts


@pytest.mark.slow
def test_a_pseudonymised_run_writes_no_file_name_nor_path(cohort, checkpoint, tmp_path):
    out = tmp_path / "run" / "features.csv"
    out.parent.mkdir()
    opts = EncodeOptions(checkpoint, out, fmt="csv", workers=0, pseudonymize=SALT, progress=False)
    result = run(cohort, opts, Recorder(tmp_path / "run" / "tracker"))
    assert result.counts == {"ok": 1, "skipped": 0, "failed": 2}
    report = pd.read_csv(result.report, dtype=str, keep_default_na=False)
    assert all(report.loc[report["status"] == "failed", "reason"] != "")  # the reasons are there, names are not
    texts = _written(tmp_path / "run")
    assert any(p.endswith("settings.json") for p in texts) and any(p.endswith("params.jsonl") for p in texts)
    salt_bytes = SALT.encode("utf-8", "surrogateescape")
    forbidden = [*SECRETS, str(cohort), str(cohort.resolve()), SALT, hashlib.sha256(salt_bytes).hexdigest()]
    for where, text in texts.items():
        assert not [s for s in forbidden if s in text], where


@pytest.mark.slow
def test_without_a_salt_reasons_name_files_relative_to_the_source(cohort, checkpoint, tmp_path):
    out = tmp_path / "features.csv"
    result = run(cohort, EncodeOptions(checkpoint, out, fmt="csv", workers=0, progress=False))
    reasons = pd.read_csv(result.report, dtype=str, keep_default_na=False).set_index("source")["reason"]
    assert "DOE_JOHN_slice5.dcm" in reasons["DOE_JOHN/ct_broken"]
    assert reasons["SMITH_JANE/SMITH_JANE_ct.nii"] != ""
    assert not [r for r in reasons if str(tmp_path) in r or str(tmp_path.resolve()) in r]  # messages cut paths


# ---------------------------------------------------------------- the scrubber on messages readers may write
ROOT = Path("/data/DOE JOHN cohort")  # a space: a path does not end at the first blank
FILES = [ROOT / "DOE_JOHN" / "ct" / f"DOE_JOHN_slice{i}.dcm" for i in range(3)]
MESSAGES = [
    "DOE_JOHN_slice1.dcm: pixel data cannot be decoded (bad length)",
    f'unreadable NIfTI file (Cannot work out file type of "{ROOT}/SMITH_JANE/SMITH_JANE_ct.nii")',
    f"FileNotFoundError: [Errno 2] No such file or directory: '{ROOT}/DOE_JOHN/ct/DOE_JOHN_sli",  # cut short
    "slices of DOE_JOHN/ct differ; DOE_JOHN_slice2 is duplicated; see /home/SMITH_JANE/notes.txt",
]


@pytest.mark.parametrize("message", MESSAGES)
def test_with_a_salt_no_name_nor_path_survives(message):
    from hagan_clinic.pipelines.privacy import Scrubber, series_names

    scrub = Scrubber(ROOT, SALT)
    text = scrub.text(message, series_names(FILES, "DOE_JOHN/ct", ROOT))
    assert not [s for s in SECRETS if s in text], text
    assert "file-" in text and scrub.text(message, series_names(FILES, "DOE_JOHN/ct", ROOT)) == text  # stable


def test_without_a_salt_paths_become_relative_and_words_stay():
    from hagan_clinic.pipelines.privacy import Scrubber

    scrub = Scrubber(ROOT, None)
    assert scrub.text(MESSAGES[1]).endswith('file type of "SMITH_JANE/SMITH_JANE_ct.nii")')
    plain = "other modality (MR; CT wanted); ImagePositionPatient/ImageOrientationPatient missing"
    assert Scrubber(ROOT, SALT).text(plain, {"ct", "DOE_JOHN"}) == plain == scrub.text(plain)
