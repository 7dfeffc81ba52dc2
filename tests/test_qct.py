"""The lung mask and emphysema indices against phantoms with known truth, and the warnings and errors."""

from __future__ import annotations

import numpy as np
import pytest

from hagan_clinic.errors import HaganError
from hagan_clinic.phantoms import AIR, LUMEN, WALL, draw_patient, render_thorax
from hagan_clinic.qct import QCTError, is_sharp_kernel, lung_mask, measure, measure_volume

SHAPE = (48, 96, 96)
CASES = {
    "padded_sharp": lambda p: p.profile.padded_fov and p.profile.sharp,
    "sharp_noisy": lambda p: p.profile.noise_hu >= 50 and not p.profile.padded_fov,
    "severe": lambda p: p.severity > 0.85,
    "padded_severe": lambda p: p.profile.padded_fov and p.severity > 0.6,
    "unsigned_storage": lambda p: p.profile.storage == "uint16",
    "healthy_soft": lambda p: p.severity < 0.05 and not p.profile.sharp,
}


def _first(seed: int, wanted) -> int:
    return next(i for i in range(200) if wanted(draw_patient(seed, i)))


@pytest.fixture(scope="module")
def phantoms():
    """Rendered phantoms by (case, seed, shape), made once for the module."""
    cache = {}

    def get(case: str, seed: int = 0, shape=SHAPE):
        key = (case, seed, shape)
        if key not in cache:
            cache[key] = render_thorax(draw_patient(seed, _first(seed, CASES[case])), shape)
        return cache[key]

    return get


@pytest.mark.parametrize(
    "case, seed, shape",
    [(case, seed, SHAPE) for case in CASES for seed in (0, 1)]
    + [("severe", 0, (96, 128, 128)), ("padded_sharp", 0, (96, 128, 128)), ("healthy_soft", 2, (32, 64, 64))],
)
@pytest.mark.slow
def test_accuracy_against_truth(phantoms, case, seed, shape):
    ph = phantoms(case, seed, shape)
    vol = ph.volume
    res = measure(vol.hu, vol.spacing, vol.valid, vol.meta["kernel"], vol.meta["slice_thickness_mm"])
    assert res["lung_volume_ml"] == pytest.approx(ph.truth["lung_volume_ml"], rel=0.03)
    assert res["laa950_pct"] == pytest.approx(ph.truth["laa950_pct"], abs=1.0)
    assert res["perc15_hu"] == pytest.approx(ph.truth["perc15_hu"], abs=5.0)
    assert measure_volume(vol) == res


def test_mask_keeps_out_air_airways_and_invalid(phantoms):
    ph = phantoms("padded_sharp")
    vol = ph.volume
    mask = lung_mask(vol.hu, vol.spacing, vol.valid)
    assert mask.dtype == bool and mask.shape == vol.hu.shape
    assert not (mask & ~vol.valid).any()
    assert not (mask & (ph.labels == AIR)).any()  # outside air
    assert not (mask & (ph.labels == LUMEN)).any()  # trachea and main bronchi
    assert (mask & (ph.labels == WALL)).sum() <= 0.05 * (ph.labels == WALL).sum()


def test_invalid_region_is_never_lung(phantoms):
    ph = phantoms("healthy_soft")
    hu, valid = ph.volume.hu.copy(), np.ones(ph.volume.hu.shape, bool)
    blocked = np.zeros_like(valid)
    blocked[10:20, 30:60, 10:40] = True  # a block through the right lung that the scanner did not measure
    hu[blocked], valid[blocked] = -1024.0, False
    mask = lung_mask(hu, ph.volume.spacing, valid)
    assert ph.lung_mask[blocked].any() and not mask[blocked].any()
    assert mask.sum() == pytest.approx((ph.lung_mask & valid).sum(), rel=0.03)


@pytest.mark.parametrize(
    "kernel, sharp",
    [("B70f", True), ("B60f", True), ("Br64", True), ("Br64\\2", True), ("Bl57", True), ("I70f", True), ("B30f", False),
     ("B40f", False), ("Br40", False), ("LUNG", True), ("BONEPLUS", True), ("HD LUNG", True), ("STANDARD", False),
     ("SOFT", False), ("L", True), ("D", True), ("YB", False), ("B", False), ("FC13", False), ("FC86", True),
     ("FC52", True), ("FC35", True), ("", False), (None, False)],
)  # fmt: skip
def test_sharp_kernels(kernel, sharp):
    assert is_sharp_kernel(kernel) is sharp


@pytest.mark.parametrize(
    "kernel, sharp",
    [("B45f", True), ("Br45", True), ("Br45d\\3", True), ("B46f", True), ("B50f", True), ("Br38f/3", False),
     ("B31f", False), ("B35f", False), ("B30f", False), ("B40f", False), ("Br40", False), ("Br44d", False),
     ("BONE", True), ("BONEPLUS", True), ("LUNG", True), ("EDGE", True), ("HD LUNG", True), ("STANDARD", False),
     ("SOFT", False), ("D", True), ("E", True), ("L", True), ("YC", True), ("YD", True), ("YE", True), ("C", True),
     ("B", False), ("A", False), ("YA", False), ("YB", False), ("FC50", True), ("FC55", True), ("FC59", True),
     ("FC80", True), ("FC89", True), ("FC30", True), ("FC39", True), ("FC13", False), ("FC03", False),
     ("SOFT\\LUNG", False), ("Br 64", True), ("Hr64", True), ("H70h", True), ("H45s", False), ("D45f", True),
     ("U90u", True), ("Qr40", False), ("I26f", False)],
)  # fmt: skip
def test_sharp_kernels_of_every_vendor(kernel, sharp):
    """Siemens 45 and above (B45f: COPDGene's sharp reconstruction), GE BONE/BONEPLUS/LUNG/EDGE, Philips C/D/E/L
    and YC/YD/YE, Canon/Toshiba FC30-39 and FC50 and above; the table is in docs/data.md."""
    assert is_sharp_kernel(kernel) is sharp


def test_warnings(phantoms):
    ph = phantoms("healthy_soft")
    vol = ph.volume
    assert measure(vol.hu, vol.spacing, vol.valid, "B30f", 1.0)["warning"] == ""
    sharp = measure(vol.hu, vol.spacing, vol.valid, "B70f", 1.0)["warning"]
    assert "sharp kernel B70f" in sharp and "slices" not in sharp
    thick = measure(vol.hu, vol.spacing, vol.valid, "B30f", 5.0)["warning"]
    assert "5 mm slices" in thick and "sharp" not in thick
    assert "slices" in measure(vol.hu, vol.spacing, vol.valid, "B30f")["warning"]  # falls back to the z spacing
    small = measure(vol.hu, (2.0, 2.0, 2.0), vol.valid, "B30f", 1.0)  # the same voxels, far too small a lung
    assert "implausible lung volume" in small["warning"]


def _cylinder(inside_hu: float) -> np.ndarray:
    hu = np.full((20, 40, 40), -1000.0, np.float32)
    yy, xx = np.mgrid[:40, :40]
    hu[:, (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2] = inside_hu
    return hu


@pytest.mark.parametrize(
    "hu", [np.full((20, 40, 40), -1000.0, np.float32), _cylinder(40.0), np.full((20, 40, 40), 40.0, np.float32)]
)
def test_no_lung_raises(hu):
    with pytest.raises(QCTError, match="no lung found") as err:
        measure(hu, (8.0, 8.0, 8.0))
    assert isinstance(err.value, HaganError)


def test_not_a_volume_raises():
    with pytest.raises(QCTError, match="3D"):
        lung_mask(np.zeros((40, 40), np.float32), (1.0, 1.0, 1.0))
