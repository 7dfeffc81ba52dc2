"""The lung mask against what real scans hold besides the lungs: a couch, cushions, stomach gas, a field of view
that cuts a lung, and masks that cannot be right (ours or a user's), which must always be reported."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hagan_clinic.phantoms import (
    COUCH_CORE,
    COUCH_SHELL,
    CUSHION_COVER,
    CUSHION_FOAM,
    GAS,
    LUNG_LABELS,
    draw_patient,
    render_thorax,
)
from hagan_clinic.qct import QCTError, measure, measure_with_mask

SHAPE = (48, 96, 96)
NOT_LUNG = (COUCH_SHELL, COUCH_CORE, CUSHION_COVER, CUSHION_FOAM, GAS)
FINDINGS = ("implausible", "one lung", "edge of the field of view", "outside the body", "first or last slice")
PROFILES = {  # profiles with a square field of view, where the couch lies wholly inside the image
    "soft": lambda p: not p.profile.padded_fov and not p.profile.sharp,
    "sharp_noisy": lambda p: not p.profile.padded_fov and p.profile.noise_hu >= 50,
}


def _index(wanted, seed: int = 0) -> int:
    return next(i for i in range(200) if wanted(draw_patient(seed, i)))


def _measure(ph, **kwargs) -> tuple[dict, np.ndarray]:
    vol = ph.volume
    return measure_with_mask(vol.hu, vol.spacing, vol.valid, vol.meta["kernel"], 1.0, **kwargs)


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("couch_mm, cushions, stomach", [(10, False, False), (30, False, False), (60, False, False),
                                                         (30, True, True), (60, True, True)])  # fmt: skip
def test_couch_cushions_and_stomach_are_never_lung(profile, couch_mm, cushions, stomach):
    params = draw_patient(0, _index(PROFILES[profile]), couch_mm=couch_mm, cushions=cushions, stomach=stomach)
    ph = render_thorax(params, SHAPE)
    assert (ph.labels == COUCH_CORE).any() and (ph.labels == GAS).any() == stomach
    res, mask = _measure(ph)
    assert not np.isin(ph.labels[mask], NOT_LUNG).any()
    assert res["lung_volume_ml"] == pytest.approx(ph.truth["lung_volume_ml"], rel=0.03)
    assert res["laa950_pct"] == pytest.approx(ph.truth["laa950_pct"], abs=1.0)
    assert res["perc15_hu"] == pytest.approx(ph.truth["perc15_hu"], abs=5.0)
    assert not any(f in res["warning"] for f in FINDINGS)


def _without_left_lung(ph) -> np.ndarray:
    """The phantom's HU with the left lung (x > 0, the image's right half) turned into soft tissue."""
    hu = ph.volume.hu.copy()
    gone = np.isin(ph.labels, LUNG_LABELS)
    gone[:, :, : hu.shape[2] // 2] = False
    hu[gone] = 40.0
    return hu


def test_stomach_gas_is_not_taken_for_a_missing_lung():
    params = draw_patient(0, _index(PROFILES["soft"]), stomach=True)
    x, y, z, *_ = params.stomach
    ph = render_thorax(replace(params, stomach=(x, y, z, 70.0, 50.0, 45.0)), SHAPE)  # a large gas bubble
    gas_ml = (ph.labels == GAS).sum() * np.prod(ph.volume.spacing) / 1000
    right = np.isin(ph.labels, LUNG_LABELS)
    right[:, :, SHAPE[2] // 2 :] = False
    right_ml = right.sum() * np.prod(ph.volume.spacing) / 1000
    assert gas_ml > 0.15 * right_ml  # big enough to pass for the other lung by size alone
    res, mask = measure_with_mask(_without_left_lung(ph), ph.volume.spacing, ph.volume.valid, "B30f", 1.0)
    assert not (mask & (ph.labels == GAS)).any()
    assert "one lung found" in res["warning"]
    assert res["lung_volume_ml"] == pytest.approx(right_ml, rel=0.03)


@pytest.mark.parametrize("cut_mm", [80, 100])
def test_lung_cut_by_the_image_edge_is_measured_and_reported(cut_mm):
    ph = render_thorax(draw_patient(0, _index(PROFILES["soft"])), SHAPE)
    vol = ph.volume
    cut = int(round(cut_mm / vol.spacing[0]))  # the image starts this far into the patient's right side
    truth = ph.lung_mask[:, :, cut:]
    assert truth[:, :, 0].any()  # the edge really runs through the right lung
    res = measure(vol.hu[:, :, cut:], vol.spacing, None, "B30f", 1.0)
    assert "lung touches the edge of the field of view" in res["warning"]
    assert "one lung" not in res["warning"]
    assert res["lung_volume_ml"] == pytest.approx(truth.sum() * np.prod(vol.spacing) / 1000, rel=0.03)


def test_lung_cut_by_a_circular_field_of_view_is_reported():
    params = draw_patient(0, _index(lambda p: p.profile.padded_fov))
    ph = render_thorax(replace(params, fov_radius_mm=110.0), SHAPE)
    vol = ph.volume
    measured = ph.lung_mask & vol.valid
    assert (ph.lung_mask & ~vol.valid).any()  # the circle runs through the lungs
    res = measure(vol.hu, vol.spacing, vol.valid, "STANDARD", 1.0)
    assert "lung touches the edge of the field of view" in res["warning"]
    assert res["lung_volume_ml"] == pytest.approx(measured.sum() * np.prod(vol.spacing) / 1000, rel=0.03)


@pytest.fixture(scope="module")
def couch_phantom():
    return render_thorax(draw_patient(0, _index(PROFILES["soft"]), couch_mm=40), SHAPE)


def test_external_mask_is_measured_as_given(couch_phantom):
    ph = couch_phantom
    res, mask = _measure(ph, mask=ph.lung_mask.astype(np.uint8))
    np.testing.assert_array_equal(mask, ph.lung_mask)
    assert res["lung_volume_ml"] == pytest.approx(ph.truth["lung_volume_ml"])
    assert res["laa950_pct"] == pytest.approx(ph.truth["laa950_pct"])
    assert not any(f in res["warning"] for f in FINDINGS)


def _one_lung(ph) -> np.ndarray:
    mask = ph.lung_mask.copy()
    mask[:, :, SHAPE[2] // 2 :] = False
    return mask


def _small(ph) -> np.ndarray:
    mask = np.zeros(ph.lung_mask.shape, bool)
    mask[20:24, 40:50, 20:30] = ph.lung_mask[20:24, 40:50, 20:30]
    return mask


def _with_couch(ph) -> np.ndarray:
    return ph.lung_mask | (ph.labels == COUCH_CORE)


def _touching_edge(ph) -> np.ndarray:
    mask = ph.lung_mask.copy()
    mask[20:30, 40:50, :30] = True  # from the right lung out to the image border
    return mask


@pytest.mark.parametrize(
    "make, finding",
    [(_one_lung, "one lung found"), (_small, "implausible lung volume"),
     (_with_couch, "of the mask lies outside the body's outer contour"),
     (_touching_edge, "lung touches the edge of the field of view")],
)  # fmt: skip
def test_implausible_masks_are_reported(couch_phantom, make, finding):
    res = measure(couch_phantom.volume.hu, couch_phantom.volume.spacing, None, "B30f", 1.0, mask=make(couch_phantom))
    assert finding in res["warning"]


def test_external_mask_of_another_shape_or_empty_is_refused(couch_phantom):
    vol = couch_phantom.volume
    with pytest.raises(QCTError, match="shape"):
        measure(vol.hu, vol.spacing, mask=np.ones((4, 4, 4), bool))
    with pytest.raises(QCTError, match="empty"):
        measure(vol.hu, vol.spacing, mask=np.zeros(vol.hu.shape, bool))


@pytest.mark.parametrize("shell_mm", [8.0, 12.0])
def test_couch_with_a_shell_too_thick_to_cut_off_is_not_lung(shell_mm):
    """A shell the body's opening cannot detach joins the couch to the body; its foam is still not lung."""
    params = draw_patient(0, 0, couch_mm=60)
    params = replace(params, couch=replace(params.couch, shell_mm=shell_mm))
    ph = render_thorax(params, (32, 128, 128))
    res, mask = _measure(ph)
    assert not np.isin(ph.labels[mask], NOT_LUNG).any()
    assert res["lung_volume_ml"] == pytest.approx(ph.truth["lung_volume_ml"], rel=0.03)
    assert res["laa950_pct"] == pytest.approx(ph.truth["laa950_pct"], abs=1.0)


@pytest.mark.parametrize("both", [False, True])
def test_severely_emphysematous_lung_is_kept_however_dark(both):
    """Parenchyma at -980 HU (end-stage emphysema) keeps its vessels: lung, not gas."""
    from hagan_clinic.phantoms.params import VESSEL

    ph = render_thorax(draw_patient(0, 4), SHAPE)
    parenchyma = np.isin(ph.labels, LUNG_LABELS) & (ph.labels != VESSEL)
    if not both:
        parenchyma[:, :, : SHAPE[2] // 2] = False
    hu = ph.volume.hu.astype(np.float32).copy()
    hu[parenchyma] = -980.0 + np.random.default_rng(1).normal(0, 18, parenchyma.sum()).round()
    lung = np.isin(ph.labels, LUNG_LABELS)
    res = measure(hu, ph.volume.spacing, ph.volume.valid, "B30f", 1.0)
    assert res["lung_volume_ml"] == pytest.approx(lung.sum() * np.prod(ph.volume.spacing) / 1000, rel=0.03)
    assert res["laa950_pct"] == pytest.approx(np.mean(hu[lung] < -950) * 100, abs=1.0)
    assert "one lung" not in res["warning"]


@pytest.mark.parametrize("end", ["apex", "base"])
def test_scan_cut_through_the_apex_or_base_is_reported(end):
    ph = render_thorax(draw_patient(0, 1), SHAPE)
    lung_z = np.flatnonzero(np.isin(ph.labels, LUNG_LABELS).any(axis=(1, 2)))
    cut = lung_z[0] + (lung_z[-1] - lung_z[0]) // 3 if end == "base" else lung_z[-1] - (lung_z[-1] - lung_z[0]) // 3
    keep = slice(cut, None) if end == "base" else slice(None, cut + 1)
    vol = ph.volume
    valid = None if vol.valid is None else vol.valid[keep]
    res = measure(vol.hu[keep], vol.spacing, valid, vol.meta["kernel"], 1.0)
    assert "cut by the first or last slice" in res["warning"]
    full = measure(vol.hu, vol.spacing, vol.valid, vol.meta["kernel"], 1.0)
    assert "first or last slice" not in full["warning"]
