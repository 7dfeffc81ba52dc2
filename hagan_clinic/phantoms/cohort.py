"""Writing a phantom cohort: DICOM series per patient and clinical.csv."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypedDict

import numpy as np
import pandas as pd

from ..config import MAX_SEED
from ..errors import short_repr
from ..io.files import Outputs, make_folder
from ..io.logs import progress as show_progress
from .params import (
    CLINICAL_COLUMNS,
    DEFAULT_SHAPE,
    PatientParams,
    PhantomError,
    draw_patient,
    gold_stage,
    patient_id,
)
from .render import check_shape, render_thorax


def clinical_row(params: PatientParams, truth: dict) -> dict:
    """One clinical.csv row: truth, spirometry, GOLD, the binary label and scanner facts; no names or dates."""
    gold = gold_stage(params.fev1pp, params.fev1_fvc)
    row = {"patient_id": params.patient_id, **{k: round(v, 3) for k, v in truth.items()},
           "severity": round(params.severity, 4), "fev1pp": round(params.fev1pp, 1),
           "fev1_fvc": round(params.fev1_fvc, 3), "gold": gold, "label": int(gold >= 1), "sex": params.sex,
           "age": params.age, "kernel": params.profile.kernel, "manufacturer": params.profile.manufacturer,
           "model": params.profile.model, "slice_thickness_mm": params.profile.slice_thickness_mm}  # fmt: skip
    return {k: row[k] for k in CLINICAL_COLUMNS}


# ---------------------------------------------------------------- writing the cohort
class PatientObjects(TypedDict):
    """The objects beside the patient (draw_patient's keyword arguments)."""

    couch_mm: float
    cushions: bool
    stomach: bool


class SeriesHeader(TypedDict):
    """Header values shared by a phantom patient's series (write_series's extra keyword arguments)."""

    patient_name: str
    birth_date: str
    sex: str
    manufacturer: str
    model: str
    kernel: str
    institution: str


def _write_patient(args: tuple[Path, int, int, tuple[int, int, int], bool, PatientObjects]) -> dict:
    from ..io.dicom_write import uid, write_series  # pydicom only when writing

    out, seed, index, shape, extras, objects = args
    params = draw_patient(seed, index, **objects)
    ph = render_thorax(params, shape)
    vol, prof = ph.volume, params.profile
    study = uid("hagan-phantom", seed, index, "study")
    header: SeriesHeader = {
        "patient_name": f"PHANTOM^{params.patient_id}", "birth_date": params.birth_date, "sex": params.sex,
        "manufacturer": prof.manufacturer, "model": prof.model, "kernel": prof.kernel,
        "institution": "HAGAN PHANTOM HOSPITAL",
    }  # fmt: skip
    folder = out / params.patient_id / "STUDY_1"
    write_series(folder / "SERIES_2", vol.hu, vol.spacing, patient_id=params.patient_id, study_uid=study,
                 series_uid=uid(study, "series", 2), origin=vol.origin, slice_thickness=prof.slice_thickness_mm,
                 storage=prof.storage, intercept=prof.intercept, transfer_syntax=prof.transfer_syntax,
                 valid=vol.valid, padding_hu=-2000.0, shuffle=True, seed=seed * 100003 + index,
                 description="CHEST AXIAL", series_number=2, **header)  # fmt: skip
    if extras and index % 10 == 9:  # a scout (one coronal projection) that discovery must skip
        scout = vol.hu.mean(axis=1)[::-1][None]
        write_series(folder / "SERIES_1", scout, (vol.spacing[0], vol.spacing[2], 1.0), patient_id=params.patient_id,
                     study_uid=study, series_uid=uid(study, "series", 1),
                     image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), shuffle=False, description="TOPOGRAM",
                     series_number=1, **header)  # fmt: skip
    return clinical_row(params, ph.truth)


def write_cohort(
    out: str | Path,
    n: int,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    workers: int = 0,
    progress: bool = True,
    extras: bool = True,
    couch_mm: float = 0.0,
    cushions: bool = False,
    stomach: bool = False,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write ``n`` phantom patients as DICOM under ``out/<patient_id>/STUDY_1/SERIES_2/`` and ``out/clinical.csv``.

    shape: (slices, rows, cols), each >= 16; the anatomy is fixed in mm. extras: every 10th patient also gets a
    one-slice localizer series (SERIES_1). couch_mm, cushions, stomach: objects outside the lungs (see
    :func:`draw_patient`); the truth is the same with or without them. Headers carry a fake PatientName and birth
    date that must never reach any output; clinical.csv has neither. Returns the clinical table (one row per
    patient, CLINICAL_COLUMNS). A folder that holds patient folders or a clinical.csv not written by an earlier
    phantom cohort is refused unless ``overwrite``. workers: 0 writes in this process, N >= 1 in a pool of N worker
    processes (the same files either way). progress: a bar on stderr when it is a terminal, never under --quiet.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise PhantomError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise PhantomError(f"seed must be an integer from 0 to {MAX_SEED}, got {short_repr(seed)}")
    shape = check_shape(shape)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise PhantomError(f"workers must be an integer >= 0 (0: work in this process), got {short_repr(workers)}")
    objects: PatientObjects = {"couch_mm": couch_mm, "cushions": bool(cushions), "stomach": bool(stomach)}
    draw_patient(seed, 0, **objects)  # bad object arguments fail here, before anything is written
    out = Path(out)
    guard = Outputs("phantoms", overwrite=overwrite)
    guard.check(out / "clinical.csv")
    ours = overwrite or (out / "clinical.csv").is_file()  # checked above: written by an earlier phantom cohort
    taken = [patient_id(i) for i in range(int(n)) if (out / patient_id(i)).exists()]
    if taken and not ours:
        raise PhantomError(f"{out / taken[0]} exists and is not part of a phantom cohort: give a new folder, or "
                           "--overwrite to replace it")  # fmt: skip
    make_folder(out)
    jobs = [(out, int(seed), i, shape, extras, objects) for i in range(int(n))]
    hidden = {} if progress else {"disable": True}
    if workers == 0:
        rows = list(show_progress(map(_write_patient, jobs), "phantoms", "patient", len(jobs), **hidden))
    else:
        with ProcessPoolExecutor(int(workers)) as pool:
            results = pool.map(_write_patient, jobs)
            rows = list(show_progress(results, "phantoms", "patient", len(jobs), **hidden))
    table = pd.DataFrame(rows, columns=list(CLINICAL_COLUMNS))
    guard.write_text(out / "clinical.csv", table.to_csv(index=False))
    return table
