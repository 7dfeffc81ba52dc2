"""A canonical scan onto the model's grid: range, physical size, centring, crop, trimming, antialiasing, MR scaling,
and the cache encoding."""

from __future__ import annotations

import numpy as np
import pytest

from hagan_clinic.config import load_config
from hagan_clinic.io.nifti import from_model_range
from hagan_clinic.io.volume import SeriesError, Volume
from hagan_clinic.preprocessing import normalise_intensity, to_model_grid

AIR, TISSUE = -1024.0, 40.0


def tiny(*overrides: str):
    return load_config("tiny", overrides)


def box_volume(shape, box, spacing, value: float = TISSUE, air: float = AIR) -> Volume:
    """Air with one box of tissue; ``box`` is (start, stop) per axis (D, H, W)."""
    hu = np.full(shape, air, np.float32)
    hu[tuple(slice(a, b) for a, b in box)] = value
    return Volume(hu, spacing)


def extent(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index per axis (D, H, W) of the True voxels."""
    out = []
    for axis in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append((int(idx[0]), int(idx[-1])))
    return out


def body_of(grid: np.ndarray, cfg) -> np.ndarray:
    return from_model_range(grid, cfg.data.window) > cfg.data.body_threshold


def test_output_shape_dtype_range_and_air():
    cfg = tiny()
    rng = np.random.default_rng(0)
    hu = rng.uniform(-3000, 3000, (16, 24, 32)).astype(np.float32)  # beyond the window on both sides
    hu[:, :2] = AIR
    grid, info = to_model_grid(Volume(hu, (10.0, 10.0, 10.0)), cfg)
    assert grid.shape == (32, 32, 32) and grid.dtype == np.float32
    assert grid.min() >= -1.0 and grid.max() <= 1.0
    assert info.source_shape == (16, 24, 32) and info.source_spacing == (10.0, 10.0, 10.0)
    # the padding around the scan is air, and air is the bottom of the window
    assert grid[0, 0, 0] == -1.0 and grid[-1, -1, -1] == -1.0


def test_invalid_voxels_are_air_and_not_body():
    cfg = tiny("data.spacing_mm=[4,4,4]")
    volume = box_volume((24, 24, 32), ((6, 18), (6, 18), (6, 18)), (4.0, 4.0, 4.0))
    volume.hu[:, :, 26:] = 1000.0  # bright, but outside the field of view
    volume.valid = np.ones(volume.shape, bool)
    volume.valid[:, :, 26:] = False
    grid, info = to_model_grid(volume, cfg)
    assert info.box[2][1] < 26  # the invalid slab did not widen the body box
    assert (from_model_range(grid, cfg.data.window) > 100).sum() == 0  # nothing bright on the grid


def test_body_keeps_its_physical_size():
    """A 60 mm cube at 2 mm spacing is 15 voxels wide on a 4 mm grid, along every axis."""
    cfg = tiny("data.spacing_mm=[4,4,4]")
    volume = box_volume((40, 40, 40), ((5, 35), (3, 33), (8, 38)), (2.0, 2.0, 2.0))
    grid, _ = to_model_grid(volume, cfg)
    for first, last in extent(body_of(grid, cfg)):
        assert abs((last - first + 1) - 15) <= 1


def test_anisotropic_spacing_keeps_physical_size():
    """Source voxels of (x, y, z) = (2, 3, 5) mm: a box of 40 x 60 x 80 mm comes out 10 x 15 x 20 voxels of 4 mm."""
    cfg = tiny("data.spacing_mm=[4,4,4]")
    box = ((4, 20), (5, 25), (6, 26))  # (D, H, W) voxels: 16 x 5 = 80 mm, 20 x 3 = 60 mm, 20 x 2 = 40 mm
    grid, _ = to_model_grid(box_volume((24, 30, 32), box, (2.0, 3.0, 5.0)), cfg)
    sizes = [last - first + 1 for first, last in extent(body_of(grid, cfg))]
    assert all(abs(s - e) <= 1 for s, e in zip(sizes, (20, 15, 10))), sizes


def test_body_is_centred():
    cfg = tiny("data.spacing_mm=[4,4,4]")
    volume = box_volume((40, 40, 40), ((25, 37), (4, 14), (24, 36)), (2.0, 2.0, 2.0))  # far off centre
    grid, _ = to_model_grid(volume, cfg)
    centre = np.argwhere(body_of(grid, cfg)).mean(axis=0)
    np.testing.assert_allclose(centre, (32 - 1) / 2, atol=1.0)


def test_wider_scan_is_cropped_with_a_note():
    cfg = tiny("data.spacing_mm=[4,4,4]")  # a 128 mm grid
    volume = box_volume((16, 24, 40), ((2, 14), (4, 20), (0, 40)), (5.0, 5.0, 5.0))  # a body 200 mm wide
    grid, info = to_model_grid(volume, cfg)
    assert grid.shape == (32, 32, 32)
    assert any("cropped along x" in n for n in info.notes), info.notes
    assert not any("along y" in n or "along z" in n for n in info.notes)
    assert body_of(grid, cfg)[16, 16].all()  # the body fills the grid's width


def test_no_crop_note_when_the_body_fits():
    cfg = tiny("data.spacing_mm=[4,4,4]")
    _, info = to_model_grid(box_volume((16, 24, 24), ((2, 14), (4, 20), (4, 20)), (4.0, 4.0, 4.0)), cfg)
    assert info.notes == []


def test_blank_end_slices_are_trimmed():
    """Slices without body at the ends are cut before fitting: a body in the top third ends up centred in z."""
    cfg = tiny("data.spacing_mm=[4,4,4]")
    volume = box_volume((24, 20, 20), ((17, 23), (5, 15), (5, 15)), (4.0, 4.0, 4.0))
    grid, info = to_model_grid(volume, cfg)
    start, stop = info.box[0]
    assert 0 < start <= 17 and stop >= 23
    assert start >= 17 - 3  # no more than the 5 mm margin (2 slices) and a coarse step
    z = np.argwhere(body_of(grid, cfg))[:, 0]
    assert abs(z.mean() - (32 - 1) / 2) <= 1.0
    # without the body crop the same scan stays where it was in z: the body sits high on the grid
    grid_none, _ = to_model_grid(volume, tiny("data.spacing_mm=[4,4,4]", "data.crop=none"))
    assert np.argwhere(body_of(grid_none, cfg))[:, 0].mean() > 20


def test_no_body_is_a_series_error():
    with pytest.raises(SeriesError, match="no body"):
        to_model_grid(Volume(np.full((16, 16, 16), AIR, np.float32), (4.0, 4.0, 4.0)), tiny())


def test_downsampling_is_antialiased():
    """A 1 mm checkerboard shrunk threefold averages out; plain interpolation would hit single voxels (+-750 HU)."""
    cfg = tiny("data.spacing_mm=[3,3,3]", "data.crop=none")
    i, j, k = np.indices((30, 30, 30))
    checker = np.where((i + j + k) % 2, 500.0, -1000.0).astype(np.float32)
    grid, info = to_model_grid(Volume(checker, (1.0, 1.0, 1.0)), cfg)
    assert info.resampled_shape == (10, 10, 10)
    inner = from_model_range(grid, cfg.data.window)[12:20, 12:20, 12:20]  # away from the scan's edges
    np.testing.assert_allclose(inner, -250.0, atol=50.0)


def test_mr_body_percentiles_map_to_the_window():
    cfg = tiny("data.modality=MR", "data.mr_percentiles=[2,98]", "data.spacing_mm=[8,8,8]")  # no resampling
    lo_w, hi_w = cfg.data.window
    rng = np.random.default_rng(1)
    hu = np.zeros((16, 24, 24), np.float32)
    hu[3:13, 4:20, 4:20] = rng.uniform(300.0, 1300.0, (10, 16, 16))  # arbitrary scanner units
    volume = Volume(hu, (8.0, 8.0, 8.0), meta={"modality": "MR"})
    scaled = normalise_intensity(volume, cfg)
    body = hu > 0
    np.testing.assert_allclose(np.percentile(scaled[body], [2, 98]), [lo_w, hi_w], rtol=1e-4, atol=1e-2)
    grid, _ = to_model_grid(volume, cfg)
    assert grid.shape == (32, 32, 32) and grid.min() == -1.0 and grid.max() == 1.0
    assert grid[0, 0, 0] == -1.0  # background
    # 2 % of the body lies above the upper percentile, clipped to the top; the rest is spread below it
    assert abs((grid == 1.0).sum() / body.sum() - 0.02) < 0.005
    inside = grid[(grid > -1.0) & (grid < 1.0)]
    assert inside.size > 0.9 * body.sum() and inside.std() > 0.3


def test_mr_scaling_ignores_the_scanners_units():
    cfg = tiny("data.modality=MR", "data.crop=none")
    rng = np.random.default_rng(2)
    hu = np.zeros((16, 16, 16), np.float32)
    hu[4:12, 4:12, 4:12] = rng.uniform(1.0, 2.0, (8, 8, 8))
    a, _ = to_model_grid(Volume(hu, (8.0, 8.0, 8.0)), cfg)
    b, _ = to_model_grid(Volume(hu * 1000.0, (8.0, 8.0, 8.0)), cfg)
    np.testing.assert_allclose(a, b, atol=1e-4)
