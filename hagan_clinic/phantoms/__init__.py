"""A synthetic thorax CT cohort with known truth: the built-in data of the demo and the tests.

Each patient is drawn by :func:`draw_patient` (all randomness, in millimetres, from ``(seed, index)`` only) and
rasterised by its deterministic twin :func:`render_thorax` at any grid shape (D, H, W): the field of view is 400 mm
in-plane and 300 mm along z whatever the shape. Arrays follow the canonical orientation of
:mod:`hagan_clinic.io.volume` ((D, H, W) = (z, y, x), LPS: x to the patient's left, y posterior, z superior).

Anatomy (a label map, then HU plus scanner noise): air, a body ellipse with subcutaneous fat, a vertebral column,
ribs, the heart, two lungs (superellipsoids cut by the rib cage, a diaphragm dome and the heart) with branching
vessels and emphysema clusters, and the airways (trachea and two main bronchi as closed tubes whose wall separates
their lumen from the parenchyma). On request a patient also gets what real scans hold outside the lungs: a scanner
couch under the back (a dense shell round a foam core), foam cushions with air pockets, a stomach gas bubble; they
change no lung voxel. The truth (lung volume, %LAA-950, 15th percentile) is measured on the label map and the
final integer HU, exactly what a reader of the written DICOM sees.

Public API: ``draw_patient``/``draw_cohort`` -> PatientParams, ``render_thorax`` -> ThoraxPhantom, ``write_cohort``
-> the clinical table, ``gold_stage``, ``clinical_row``, ``parse_shape``/``check_shape`` (a grid shape from text or
numbers, within bounds), ``PROFILES``, ``PhantomError``.
"""

from .cohort import clinical_row, write_cohort
from .params import (
    AIR,
    CLINICAL_COLUMNS,
    COUCH_CORE,
    COUCH_SHELL,
    CUSHION_COVER,
    CUSHION_FOAM,
    DEFAULT_SHAPE,
    GAS,
    LUMEN,
    LUNG_LABELS,
    PARENCHYMA,
    PROFILES,
    WALL,
    Couch,
    Cushions,
    PatientParams,
    PhantomError,
    ScannerProfile,
    draw_cohort,
    draw_patient,
    gold_stage,
)
from .render import ThoraxPhantom, check_shape, parse_shape, render_thorax

__all__ = [
    "AIR",
    "LUMEN",
    "PARENCHYMA",
    "WALL",
    "COUCH_CORE",
    "COUCH_SHELL",
    "CUSHION_COVER",
    "CUSHION_FOAM",
    "GAS",
    "CLINICAL_COLUMNS",
    "DEFAULT_SHAPE",
    "LUNG_LABELS",
    "PROFILES",
    "Couch",
    "Cushions",
    "PatientParams",
    "PhantomError",
    "ScannerProfile",
    "ThoraxPhantom",
    "check_shape",
    "clinical_row",
    "draw_cohort",
    "draw_patient",
    "gold_stage",
    "parse_shape",
    "render_thorax",
    "write_cohort",
]
