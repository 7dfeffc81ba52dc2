"""The preprocess cache: how a grid is stored, what a cache records, and that every reader (training, encode,
evaluate, augment) refuses a cache made at other settings than its run's, in one line that names the setting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hagan_clinic.errors import HaganError
from hagan_clinic.io.cache import (
    MANIFEST_COLUMNS,
    claim_folder,
    decode_grid,
    encode_grid,
    open_cache,
    write_grid,
)
from hagan_clinic.io.files import write_rows
from hagan_clinic.io.volume import SeriesError

from conftest import assert_one_line, assert_refused, run_cli, tiny_config

SIZE = 32  # the tiny config's grid


def make_cache(folder, cfg, n: int = 6, seed: int = 0):
    """A cache as ``preprocess`` writes it under ``cfg``, without the scans: ``n`` ok rows of smooth random grids
    (patients P00.., labels alternating in clinical.csv beside it) and one failed row."""
    folder.mkdir(parents=True)
    claim_folder(folder, cfg)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        grid = np.clip(rng.normal(0.0, 0.3, (SIZE,) * 3), -1.0, 1.0).astype(np.float32)
        rel = write_grid(folder, f"v{i:02d}", grid, cfg.data.cache_dtype)
        rows.append({"patient_id": f"P{i:02d}", "series_uid": f"1.2.{i}", "path": rel, "status": "ok"})
    rows.append({"patient_id": "PX", "series_uid": "1.2.99", "path": "", "status": "failed", "reason": "bad"})
    write_rows(folder / "manifest.csv", rows, MANIFEST_COLUMNS)
    clinical = "patient_id,label\n" + "".join(f"P{i:02d},{i % 2}\n" for i in range(n))
    (folder.parent / "clinical.csv").write_text(clinical)
    return folder


@pytest.fixture
def uncropped(tmp_path):
    """A cache under the tiny data contract, preprocessed without the body crop: the same contract, other volumes."""
    return make_cache(tmp_path / "uncropped", tiny_config("data.crop=none"))


# ---------------------------------------------------------------- a stored grid
@pytest.mark.parametrize(("dtype", "atol"), [("float16", 2.0**-11), ("int16", 0.5 / 32767 + 1e-7)])
def test_cache_encoding_round_trips(dtype, atol):
    values = np.r_[-1.0, 1.0, 0.0, np.random.default_rng(3).uniform(-1, 1, 997)].astype(np.float32).reshape(10, 10, 10)
    stored = encode_grid(values, dtype)
    assert stored.dtype == np.dtype(dtype) and stored.shape == values.shape
    back = decode_grid(stored)
    assert back.dtype == np.float32
    assert np.abs(back - values).max() <= atol
    assert back.min() >= -1.0 and back.max() <= 1.0
    assert back.ravel()[0] == -1.0 and back.ravel()[1] == 1.0 and back.ravel()[2] == 0.0


# ---------------------------------------------------------------- open_cache
def test_an_opened_cache_lists_its_ok_rows_and_loads_them(tmp_path):
    cfg = tiny_config("data.cache_dtype=int16")
    cache = open_cache(make_cache(tmp_path / "cache", cfg), tiny_config())  # the stored dtype is not a setting
    assert len(cache) == 6 and len(cache.manifest) == 7 and not cache.broken
    assert [r["patient_id"] for r in cache.rows] == [f"P{i:02d}" for i in range(6)]
    assert cache.path_of(2) == tmp_path / "cache" / "volumes" / "v02.npy"
    vol = cache.load(2)
    assert vol.dtype == np.float32 and vol.shape == (SIZE,) * 3 and -1.0 <= vol.min() <= vol.max() <= 1.0
    cache.require_volumes()

    (tmp_path / "cache" / "volumes" / "v03.npy").unlink()
    np.save(tmp_path / "cache" / "volumes" / "v04.npy", np.full((SIZE,) * 3, np.nan, np.float16))
    cache = open_cache(tmp_path / "cache", cfg)
    assert len(cache) == 5 and [r["path"] for r in cache.broken] == ["volumes/v03.npy"]
    with pytest.raises(HaganError, match="1 volume") as info:
        cache.require_volumes()
    assert_one_line(f"hagan-clinic: error: {info.value}", "v03.npy", "not regular files")
    with pytest.raises(SeriesError, match="NaN or infinite"):
        cache.load(3)  # v04, now the fourth ok row with a volume


REFUSALS = {  # made with -> what the refusal says
    "data.spacing_mm=[6,6,6]": "was made at spacing 6 mm; this run's data contract needs spacing 12 mm: preprocess "
    "again into another folder",
    "data.spacing_mm=[6,6,3]": "was made at spacing 6 x 6 x 3 mm; this run's data contract needs spacing 12 mm",
    "data.modality=MR": "was made at modality MR; this run's data contract needs modality CT",
    "data.window=[-1000,400]": "was made at window [-1000.0, 400.0]; this run's data contract needs window "
    "[-1024.0, 600.0]",
    "data.crop=none": "was made at crop none; this run's config needs crop body",
    "data.body_threshold=-300": "was made at body threshold -300 HU; this run's config needs body threshold -500 HU",
    "data.irregular=resample": "was made at irregular series resample; this run's config needs irregular series refuse",
}


@pytest.mark.parametrize("made_with", REFUSALS)
def test_a_cache_made_at_other_settings_is_refused_naming_the_setting(tmp_path, made_with):
    folder = make_cache(tmp_path / "cache", tiny_config(made_with))
    with pytest.raises(HaganError) as info:
        open_cache(folder, tiny_config())
    assert_one_line(f"hagan-clinic: error: {info.value}", str(folder), REFUSALS[made_with])


def test_several_settings_and_unrecorded_ones_are_refused(tmp_path):
    folder = make_cache(tmp_path / "two", tiny_config("data.crop=none", "data.body_threshold=-300"))
    with pytest.raises(HaganError, match=r"crop none \(and 1 other setting\(s\)\); this run's config needs crop"):
        open_cache(folder, tiny_config())

    folder = make_cache(tmp_path / "cache", tiny_config())
    recorded = json.loads((folder / "cache.json").read_text())
    del recorded["crop"]
    (folder / "cache.json").write_text(json.dumps(recorded))
    with pytest.raises(HaganError, match="records no crop setting; this run's config needs crop body"):
        open_cache(folder, tiny_config())


def test_preprocess_refuses_to_mix_settings_in_one_cache(tmp_path):
    folder = make_cache(tmp_path / "cache", tiny_config())
    claim_folder(folder, tiny_config())  # the same settings: fine
    with pytest.raises(HaganError, match=r"other settings \(cache_dtype\); use another --out"):
        claim_folder(folder, tiny_config("data.cache_dtype=int16"))


# ---------------------------------------------------------------- every reader refuses it
def test_training_refuses_a_cache_made_at_other_settings(uncropped, tmp_path):
    from hagan_clinic.data import DataError, VolumeFolder

    with pytest.raises(DataError) as info:
        VolumeFolder.from_config(tiny_config(), uncropped)
    assert_one_line(f"hagan-clinic: error: {info.value}", "was made at crop none", "needs crop body")
    table = tmp_path / "table.csv"  # through a table (augment's training part) as well
    table.write_text("path,patient_id\nvolumes/v00.npy,P00\nvolumes/v01.npy,P01\n")
    with pytest.raises(DataError, match="was made at crop none"):
        VolumeFolder.from_config(tiny_config(f"data.table={table}"), uncropped)
    assert len(VolumeFolder.from_config(tiny_config("data.crop=none"), uncropped)) == 6  # its own settings


def test_a_non_finite_training_volume_is_named_when_loaded(tmp_path):
    from hagan_clinic.data import DataError, VolumeFolder

    folder = make_cache(tmp_path / "cache", tiny_config())
    data = VolumeFolder.from_config(tiny_config(), folder)
    np.save(folder / "volumes" / "v01.npy", np.full((SIZE,) * 3, np.inf, np.float16))
    with pytest.raises(DataError, match="v01.npy.*NaN or infinite"):
        data.load(1)


@pytest.mark.slow
def test_evaluate_refuses_a_cache_made_at_other_settings(uncropped, checkpoint, tmp_path):
    from hagan_clinic.pipelines.evaluate import EvaluateOptions, run

    opts = EvaluateOptions(checkpoint, uncropped, tmp_path / "eval", n=2, measure="mean_hu")
    with pytest.raises(HaganError) as info:
        run(opts)
    assert_one_line(f"hagan-clinic: error: {info.value}", "was made at crop none", "the checkpoint's config")
    own = make_cache(tmp_path / "own", tiny_config())
    opts = EvaluateOptions(checkpoint, own, tmp_path / "eval", n=2, measure="mean_hu", train=uncropped)
    with pytest.raises(HaganError, match="uncropped was made at crop none"):  # the training volumes too
        run(opts)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_augment_refuses_a_cache_made_at_other_settings(uncropped, tmp_path, capsys):
    from hagan_clinic.pipelines.augment import run

    settings = [f"augment.cache={uncropped}", f"augment.clinical={tmp_path / 'clinical.csv'}", "augment.arms=[real]"]
    with pytest.raises(HaganError) as info:
        run(tiny_config(*settings), tmp_path / "aug")
    assert_one_line(f"hagan-clinic: error: {info.value}", "was made at crop none", "this run's config")
    code, _, err = run_cli(capsys, "augment", "--config", "tiny", *[a for s in settings for a in ("--set", s)],
                           "--out", tmp_path / "aug", "--no-tracking")  # fmt: skip
    assert_refused(code, err, "crop none")
    assert not (tmp_path / "aug" / "split.csv").exists()
