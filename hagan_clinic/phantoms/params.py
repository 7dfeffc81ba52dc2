"""Phantom patients as parameters in millimetres: all the randomness of the phantom cohort lives here."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import HaganError

DEFAULT_SHAPE = (96, 128, 128)
FOV_MM = (400.0, 400.0, 300.0)  # (x, y, z) extent of every phantom, whatever its shape
Z_ORIGIN_MM = -300.0  # LPS z of the bottom of the scan (a table position, nothing depends on it)
AIR, FAT, SOFT, BONE, MARROW, HEART, PARENCHYMA, VESSEL, WALL, LUMEN = range(10)
COUCH_SHELL, COUCH_CORE, CUSHION_COVER, CUSHION_FOAM, GAS = range(10, 15)  # outside the lungs: never lung truth
EMPHYSEMA = 20  # labels 20..40 are emphysema at -990..-970 HU
MAX_COUCH_MM = 60.0  # thicker couch cores would leave the 400 mm field of view under the largest patients
LUNG_LABELS = (PARENCHYMA, VESSEL, *range(EMPHYSEMA, EMPHYSEMA + 21))
CLINICAL_COLUMNS = (
    "patient_id", "lung_volume_ml", "laa950_pct", "perc15_hu", "pct_emphysema", "severity", "fev1pp", "fev1_fvc",
    "gold", "label", "sex", "age", "kernel", "manufacturer", "model", "slice_thickness_mm",
)  # fmt: skip


class PhantomError(HaganError):
    """Bad arguments to the phantom generator."""


@dataclass(frozen=True)
class ScannerProfile:
    """How one scanner model and reconstruction writes a chest CT.

    noise_hu: sd of the added noise (HU); noise_corr_mm: in-plane Gaussian correlation of that noise (mm, soft
    kernels are smoother); padded_fov: voxels outside a circular field of view hold padding (``valid`` False).
    slice_thickness_mm is header metadata only.
    """

    name: str
    manufacturer: str
    model: str
    kernel: str
    sharp: bool
    noise_hu: float
    noise_corr_mm: float
    storage: str
    intercept: float
    padded_fov: bool
    transfer_syntax: str
    slice_thickness_mm: float


PROFILES = tuple(ScannerProfile(*row) for row in (
    ("siemens_b30f", "SIEMENS", "Sensation 64", "B30f", False, 18, 0.8, "int16", -1024, False, "explicit", 1.0),
    ("siemens_b70f", "SIEMENS", "SOMATOM Force", "B70f", True, 55, 0.3, "int16", -1024, False, "explicit", 1.0),
    ("ge_standard", "GE MEDICAL SYSTEMS", "LightSpeed16", "STANDARD", False, 20, 0.8, "int16", -1024, True,
     "explicit", 1.25),
    ("ge_lung", "GE MEDICAL SYSTEMS", "Revolution CT", "LUNG", True, 50, 0.3, "int16", -1024, True, "explicit", 1.25),
    ("philips_b", "Philips", "Brilliance 64", "B", False, 16, 0.9, "uint16", -1024, False, "explicit", 2.0),
    ("philips_yb", "Philips", "iCT 256", "YB", False, 22, 0.7, "uint16", -1024, False, "rle", 1.0),
    ("toshiba_fc13", "TOSHIBA", "Aquilion ONE", "FC13", False, 20, 0.8, "int16", 0, False, "explicit", 3.0),
))  # fmt: skip
PROFILE_WEIGHTS = (0.22, 0.12, 0.18, 0.10, 0.16, 0.06, 0.16)  # compressed (rle) rare: slow to write


@dataclass(frozen=True)
class Lung:
    """One lung in mm: a superellipsoid |u|^p + |v|^p + w^2 <= 1 above a diaphragm dome (side -1 right, +1 left)."""

    side: int
    cx: float
    cy: float
    ax: float
    ay: float
    z_low: float
    height: float
    p: float
    dome_h: float


@dataclass(frozen=True)
class Couch:
    """A scanner couch under the patient's back, in mm: a shell (hu_shell) ``shell_mm`` thick around a foam core
    (hu_core) ``core_mm`` thick. Its top surface is y = top_y - x^2 / (2 radius) (rising gently at the sides) for
    |x| <= half_width; the patient lies on it (the back is flattened down to the surface). The whole couch lies
    inside the 400 mm image (a circular field of view may cut it)."""

    core_mm: float
    shell_mm: float
    top_y: float
    radius: float
    half_width: float
    hu_shell: float
    hu_core: float


@dataclass(frozen=True)
class Cushions:
    """Foam (hu_foam) in a thin cover (hu_cover, ``cover_mm``) around the patient, touching the skin, in mm.

    blanket: (foam thickness, front limit y) a layer over the front of the body where y < front limit; wedges:
    (x, y, semi-axis along the body's outward normal, semi-axis along its surface, angle of that normal in rad)
    beside the back; pockets: air bubbles (x, y, z, radius) in the foam.
    """

    blanket: tuple[float, float]
    wedges: tuple[tuple[float, ...], ...]
    pockets: tuple[tuple[float, ...], ...]
    cover_mm: float
    hu_foam: float
    hu_cover: float


@dataclass(frozen=True)
class PatientParams:
    """Everything random about one patient, in mm and HU; :func:`render_thorax` adds nothing random but noise.

    Segments are (x0, y0, z0, x1, y1, z1, radius) mm; blobs are (x, y, z, radius mm, level 0..20 -> -990..-970 HU).
    The optional objects (couch, cushions, a stomach gas bubble (x, y, z, semi-axes x, y, z)) lie outside the lungs
    and leave every lung voxel as it is.
    """

    seed: int
    index: int
    patient_id: str
    sex: str
    age: int
    birth_date: str
    severity: float
    fev1pp: float
    fev1_fvc: float
    profile: ScannerProfile
    lung_scale: float
    body_a: float
    body_b: float
    fat_mm: float
    spine_y: float
    spine_r: float
    heart: tuple[float, float, float, float, float, float]  # centre (x, y, z), semi-axes (x, y, z)
    lungs: tuple[Lung, Lung]
    airways: tuple[tuple[float, ...], ...]  # trachea, right and left main bronchus (lumen radius)
    ribs: tuple[tuple[float, ...], ...]
    vessels: tuple[tuple[float, ...], ...]
    blobs: tuple[tuple[float, ...], ...]
    hu_fat: float
    hu_bone: float
    hu_parenchyma: float
    fov_radius_mm: float
    couch: Couch | None = None
    cushions: Cushions | None = None
    stomach: tuple[float, ...] | None = None


# ---------------------------------------------------------------- drawing (all randomness lives here)
def _cage(body_a: float, body_b: float, fat: float, inset: float) -> tuple[float, float]:
    return body_a - fat - inset, body_b - fat - inset


def _inside_lung(p: PatientParams, lung: Lung, x, y, z, margin: float = 0.0) -> np.ndarray:
    """Whether points (mm, broadcastable arrays) lie in ``lung``, at least ``margin`` mm inside its surface."""
    u = np.abs((x - lung.cx) / (lung.ax - margin)) ** lung.p
    v = np.abs((y - lung.cy) / (lung.ay - margin)) ** lung.p
    w = (z - lung.z_low) / (lung.height - margin)
    dome = lung.z_low + margin + lung.dome_h * np.clip(1 - ((x - lung.cx) / lung.ax) ** 2
                                                       - ((y - lung.cy) / lung.ay) ** 2, 0, None)  # fmt: skip
    ca, cb = _cage(p.body_a, p.body_b, p.fat_mm, 17.0 + margin)  # ribs sit at inset 9 mm, radius 4 mm
    hx, hy, hz, hax, hay, haz = p.heart
    g = 6.0 + margin  # pericardial fat between heart and lung
    outside_heart = ((x - hx) / (hax + g)) ** 2 + ((y - hy) / (hay + g)) ** 2 + ((z - hz) / (haz + g)) ** 2 > 1
    return (u + v + w * w <= 1) & (z >= dome) & ((x / ca) ** 2 + (y / cb) ** 2 <= 1) & outside_heart


def _in_any_lung(p: PatientParams, x, y, z, margin: float = 0.0) -> np.ndarray:
    return _inside_lung(p, p.lungs[0], x, y, z, margin) | _inside_lung(p, p.lungs[1], x, y, z, margin)


def _vessel_tree(rng: np.random.Generator, root: np.ndarray, side: int) -> list[tuple[float, ...]]:
    segments = []
    stack = []
    for _ in range(6):
        d = np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.7, 0.7), rng.uniform(-1.0, 1.0)])
        stack.append((root, d / np.linalg.norm(d), rng.uniform(30, 40), rng.uniform(4.0, 5.5), 0))
    while stack:  # each segment splits into two thinner, shorter children with perturbed directions
        start, d, length, radius, depth = stack.pop()
        end = start + d * length
        segments.append((*start, *end, radius))
        if depth < 3:
            for _ in range(2):
                c = d + rng.normal(0, 0.45, 3)
                stack.append((end, c / np.linalg.norm(c), length * 0.8, radius * 0.72, depth + 1))
    return segments


def _emphysema_blobs(rng: np.random.Generator, p: PatientParams, fraction: float) -> list[tuple[float, ...]]:
    # lung volume by Monte Carlo on the analytic shapes, so the blob budget matches the target fraction
    lo, hi = np.array([-200.0, -200.0, 0.0]), np.array([200.0, 200.0, 300.0])
    pts = rng.uniform(lo, hi, (40000, 3))
    lung_ml = _in_any_lung(p, *pts.T).mean() * np.prod(hi - lo) / 1000
    blobs: list[tuple[float, ...]] = []
    budget = fraction * lung_ml * 1000 * 1.25  # x1.25: spheres overlap and are clipped to parenchyma
    while budget > 0 and len(blobs) < 3000:
        c = rng.uniform(lo, hi, (2000, 3))
        z_low = np.where(c[:, 0] < 0, p.lungs[0].z_low, p.lungs[1].z_low)
        w = (c[:, 2] - z_low) / p.lungs[0].height
        x, y, z = c.T
        keep = _in_any_lung(p, x, y, z, margin=4.0) & (rng.random(len(c)) < 0.35 + 0.65 * w)  # upper lobes first
        for centre in c[keep]:
            level = float(rng.integers(0, 21))
            for _ in range(int(rng.integers(1, 7))):
                r = 2.0 + 13.0 * rng.beta(1.3, 3.0)
                blobs.append((*(centre + rng.normal(0, 6.0, 3)), r, level))
                budget -= 4 / 3 * np.pi * r**3
            if budget <= 0:
                break
    return blobs


def patient_id(index: int) -> str:
    """The ID of phantom patient ``index`` (0-based), also the name of its folder."""
    return f"PH{index + 1:04d}"


def draw_patient(
    seed: int, index: int, couch_mm: float = 0.0, cushions: bool = False, stomach: bool = False
) -> PatientParams:
    """Draw patient ``index`` of cohort ``seed``: depends on (seed, index) only, never on the cohort size.

    couch_mm: core thickness of a scanner couch under the back (0: none, at most 60 mm); cushions: a blanket over
    the front and foam wedges beside the back; stomach: a gas bubble under the left hemidiaphragm. Each object is
    drawn from its own random stream, so adding one changes neither the patient nor the other objects.
    """
    rng = np.random.default_rng([int(seed), int(index), 7])
    sex = "M" if rng.random() < 0.5 else "F"
    age = int(rng.integers(45, 81))
    copd = rng.random() < 0.5
    severity = float(rng.uniform(0.12, 1.0) if copd else rng.uniform(0.0, 0.12))
    airway = rng.random()  # airway disease: lowers spirometry without showing in the phantom
    fev1_fvc = float(np.clip(0.80 - 0.40 * severity - 0.06 * airway + rng.normal(0, 0.035), 0.25, 0.92))
    fev1pp = float(np.clip(104 - 72 * severity - 12 * airway + rng.normal(0, 10), 12, 140))
    profile = PROFILES[rng.choice(len(PROFILES), p=PROFILE_WEIGHTS)]
    s = float(np.clip(rng.normal(1.03 if sex == "M" else 0.97, 0.07), 0.85, 1.15))
    body_a = 165 * (0.8 + 0.2 * s) * rng.uniform(0.96, 1.04)
    body_b = 115 * (0.8 + 0.2 * s) * rng.uniform(0.95, 1.05)
    fat = rng.uniform(6, 18)
    spine_r = rng.uniform(14, 18)
    spine_y = body_b - fat - spine_r - 22
    ca, cb = _cage(body_a, body_b, fat, 17.0)
    mw = rng.uniform(18, 26)  # half-width of the mediastinum
    ax = (ca - mw) / 2 * 1.05
    z_low = rng.uniform(22, 38)
    height = min(235 * s, 285 - z_low)

    def draw_lung(side: int) -> Lung:
        return Lung(side, side * (mw + ax), 0.1 * cb, ax, cb * 1.02, z_low + (5 if side < 0 else 0), height,
                    rng.uniform(2.2, 2.8), rng.uniform(25, 35) if side < 0 else rng.uniform(18, 28))  # fmt: skip

    lungs = (draw_lung(-1), draw_lung(1))  # right, then left: the order the random draws were made in
    heart = (rng.uniform(20, 32), 0.1 * cb - rng.uniform(30, 40), z_low + rng.uniform(50, 65),
             rng.uniform(52, 62), rng.uniform(42, 50), rng.uniform(45, 55))  # fmt: skip
    trachea_y, rt = spine_y - spine_r - 22, rng.uniform(7.5, 10)
    zc = z_low + 0.6 * height
    right_end = (-(mw + rng.uniform(30, 40)), trachea_y + rng.uniform(-5, 5), zc - rng.uniform(25, 35))
    left_end = (mw + rng.uniform(40, 50), trachea_y + rng.uniform(-5, 5), zc - rng.uniform(35, 45))
    carina = (0.0, trachea_y, zc)
    airways = ((0.0, trachea_y, 330.0, *carina, rt), (*carina, *right_end, rt * 0.75), (*carina, *left_end, rt * 0.7))
    ra, rb = _cage(body_a, body_b, fat, 9.0)
    ribs = []
    for z_rib in np.arange(z_low + 15, z_low + height - 25, rng.uniform(22, 26)):
        for side in (-1, 1):  # an arc from beside the spine round to the front, dropping ~25 mm anteriorly
            t = np.linspace(np.deg2rad(100), np.deg2rad(235), 7)
            pts = [(side * -ra * np.cos(a), rb * np.sin(a), z_rib - 25 * (a - t[0]) / (t[-1] - t[0])) for a in t]
            ribs += [(*pts[k], *pts[k + 1], 4.0) for k in range(6)]
    p = PatientParams(
        seed=seed, index=index, patient_id=patient_id(index), sex=sex, age=age,
        birth_date=f"{2026 - age}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}", severity=severity,
        fev1pp=fev1pp, fev1_fvc=fev1_fvc, profile=profile, lung_scale=s, body_a=body_a, body_b=body_b, fat_mm=fat,
        spine_y=spine_y, spine_r=spine_r, heart=heart, lungs=lungs, airways=airways, ribs=tuple(ribs), vessels=(),
        blobs=(), hu_fat=rng.uniform(-110, -85), hu_bone=rng.uniform(700, 1000),
        hu_parenchyma=rng.uniform(-875, -845), fov_radius_mm=rng.uniform(0.92, 0.97) * 200,
    )  # fmt: skip
    vessels = []
    for lung in lungs:
        root = np.array([lung.side * (mw + 14), trachea_y, zc - rng.uniform(45, 55)])
        vessels += _vessel_tree(rng, root, lung.side)
    fraction = 0.003 + 0.32 * severity**1.4
    blobs = _emphysema_blobs(rng, p, fraction)
    p = replace(p, vessels=tuple(vessels), blobs=tuple(blobs))
    return _add_objects(p, couch_mm, cushions, stomach)


# ---------------------------------------------------------------- objects outside the lungs
def _add_objects(p: PatientParams, couch_mm: float, cushions: bool, stomach: bool) -> PatientParams:
    if isinstance(couch_mm, bool) or not isinstance(couch_mm, (int, float)) or not 0 <= couch_mm <= MAX_COUCH_MM:
        raise PhantomError(f"couch_mm must be a number from 0 (no couch) to {MAX_COUCH_MM:g}, got {couch_mm!r}")
    couch = _draw_couch(np.random.default_rng([p.seed, p.index, 13]), p, float(couch_mm)) if couch_mm > 0 else None
    foam = _draw_cushions(np.random.default_rng([p.seed, p.index, 14]), p) if cushions else None
    gas = _draw_stomach(np.random.default_rng([p.seed, p.index, 15]), p) if stomach else None
    return replace(p, couch=couch, cushions=foam, stomach=gas)


def _draw_couch(rng: np.random.Generator, p: PatientParams, core_mm: float) -> Couch:
    flatten = rng.uniform(0.0, min(8.0, p.fat_mm - 2.0))  # the back rests on the couch; only fat is flattened
    return Couch(core_mm=core_mm, shell_mm=rng.uniform(2.0, 3.0), top_y=p.body_b - flatten,
                 radius=rng.uniform(900, 2500), half_width=rng.uniform(165, 185), hu_shell=rng.uniform(80, 150),
                 hu_core=rng.uniform(-960, -940))  # fmt: skip


def _draw_cushions(rng: np.random.Generator, p: PatientParams) -> Cushions:
    a, b = p.body_a, p.body_b
    wedges = []
    for side in (-1, 1):
        t = np.deg2rad(rng.uniform(50, 65))  # angle from the back (+y) round to the side
        px, py = side * a * np.sin(t), b * np.cos(t)
        normal = np.arctan2(py / b**2, px / a**2)
        rn, rt = rng.uniform(10, 16), rng.uniform(25, 40)
        wedges.append((px + rn * np.cos(normal), py + rn * np.sin(normal), rn, rt, normal))
    blanket = (rng.uniform(10, 20), -b * rng.uniform(0.35, 0.55))
    pockets = []
    for _ in range(int(rng.integers(20, 40))):  # in the blanket or a wedge: painting keeps those inside the foam
        if rng.random() < 0.6:
            t = rng.uniform(np.pi * 1.15, np.pi * 1.85)
            k = rng.uniform(3, blanket[0])
            x, y = (a + k) * np.cos(t), (b + k) * np.sin(t)
        else:
            wx, wy, *_ = wedges[int(rng.integers(0, 2))]
            x, y = wx + rng.normal(0, 5), wy + rng.normal(0, 5)
        pockets.append((x, y, rng.uniform(0, 300), rng.uniform(2.0, 5.0)))
    return Cushions(blanket=blanket, wedges=tuple(wedges), pockets=tuple(pockets), cover_mm=2.0,
                    hu_foam=rng.uniform(-980, -900), hu_cover=rng.uniform(-120, 60))  # fmt: skip


def _draw_stomach(rng: np.random.Generator, p: PatientParams) -> tuple[float, ...]:
    left = p.lungs[1]
    rz = rng.uniform(18, 28)
    top = left.z_low + left.dome_h - 10.0  # under the dome; painting keeps a gap of tissue to the lung
    return (left.cx * rng.uniform(0.8, 1.1), left.cy - rng.uniform(10, 30), top - rz, rng.uniform(35, 50),
            rng.uniform(25, 38), rz)  # fmt: skip


def draw_cohort(n: int, seed: int = 0, **objects) -> list[PatientParams]:
    """Parameters of patients 0..n-1 (cheap: nothing is rendered); ``objects`` as for :func:`draw_patient`."""
    return [draw_patient(seed, i, **objects) for i in range(n)]


def gold_stage(fev1pp: float, fev1_fvc: float) -> int:
    """GOLD spirometric grade: 0 when FEV1/FVC >= 0.70, else 1..4 by FEV1 % predicted (>=80, >=50, >=30, <30)."""
    if fev1_fvc >= 0.70:
        return 0
    return 1 if fev1pp >= 80 else 2 if fev1pp >= 50 else 3 if fev1pp >= 30 else 4
