"""The preprocess cache: the one place that knows its files, how a grid is stored, and whether a cache fits a run.

Layout of a cache folder (``hagan-clinic preprocess`` writes it)::

    cache.json      the data contract and preprocessing options the cache was made with (:func:`settings`)
    manifest.csv    one row per series found (ok, skipped, failed) with the reason (:data:`MANIFEST_COLUMNS`)
    volumes/        <id>.npy (S, S, S) float16 in [-1, 1] (or int16 fixed point x 32767), one per ok series
    nifti/          optional: <id>.nii.gz, the same grids in scanner units, to open in a viewer
    .state/         one JSON per finished series, so a re-run skips them

Readers open a cache with :func:`open_cache`, which refuses, in one line naming the setting, a cache made at other
settings than the run's config: training, encode, evaluate, augment and the demo all see the same check. Any file
of a cache may be damaged or edited by hand: cache.json and the manifest as a whole are checked when the cache is
opened (HaganError), each volume when it is loaded (SeriesError: that volume's problem).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import HaganError, one_line, short_repr
from .files import Outputs, atomic_target, read_csv_table, regular_file, write_json
from .volume import SeriesError

MANIFEST_COLUMNS = [
    "patient_id", "study_uid", "series_uid", "path", "shape", "spacing", "kernel", "status", "reason",
    "slice_thickness_mm", "manufacturer", "modality", "n_slices", "source", "notes", "grid_origin", "grid_spacing",
]  # fmt: skip
MANIFEST_REQUIRED = ("path", "status")
#: What a cached volume may be stored as: the first two are what preprocess writes, the others arrays made by hand.
STORED_DTYPES = tuple(np.dtype(t) for t in ("float16", "int16", "float32", "float64"))
#: What a run's config must agree with, in the order a refusal names them (the data contract first). The cache's
#: dtype and ``min_slices`` are left out: neither changes a cached volume's values.
CONTRACT_KEYS = ("modality", "resize", "size", "spacing_mm", "window")
CHECKED = (*CONTRACT_KEYS, "crop", "body_threshold", "mr_percentiles", "irregular")
REMEDY = "preprocess again into another folder"


# ---------------------------------------------------------------- settings: what cache.json records
def settings(cfg: Config) -> dict[str, Any]:
    """What a cache made under ``cfg`` records in cache.json: the data contract and the preprocessing options."""
    d = cfg.data
    return {
        "contract": cfg.data_contract(),
        "crop": d.crop,
        "body_threshold": d.body_threshold,
        "mr_percentiles": list(d.mr_percentiles),
        "irregular": d.irregular,
        "min_slices": d.min_slices,
        "cache_dtype": d.cache_dtype,
    }


def _why(err: BaseException) -> str:
    """A reading error in a few words, without the file's path (the message names it once)."""
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(err, json.JSONDecodeError):
        return f"not JSON: {err.msg} at line {err.lineno}"
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    return one_line(err, 120) or type(err).__name__


def read_settings(folder: Path) -> dict[str, Any]:
    """A cache's ``cache.json``; HaganError naming the file when it is missing or not a JSON object."""
    path = folder / "cache.json"
    try:
        recorded = json.loads(regular_file(path, "cache description", 2**20).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HaganError(f"{path} cannot be read ({_why(err)}): not a preprocess cache; preprocess again") from None
    if not isinstance(recorded, dict):
        raise HaganError(f"{path} is not a preprocess cache's description (a JSON object): preprocess again")
    return recorded


def is_cache(folder: Path) -> bool:
    """True when ``folder`` holds a readable cache.json of a preprocess cache."""
    try:
        return "contract" in read_settings(folder)
    except HaganError:
        return False


def looks_like_cache(folder: Path) -> bool:
    """True when ``folder`` is meant as a preprocess cache, whole or damaged (then :func:`open_cache` says what is
    wrong): it has a cache.json, or a manifest beside a volumes folder. A cohort or volume folder that merely holds
    a file called manifest.csv is not taken for one."""
    return (folder / "cache.json").exists() or ((folder / "manifest.csv").exists() and (folder / "volumes").is_dir())


def claim_folder(folder: Path, cfg: Config, guard: Outputs | None = None) -> None:
    """Make ``folder`` a cache of ``cfg``'s settings (write cache.json), or check that it is one: volumes
    preprocessed two different ways never mix in one cache."""
    wanted = settings(cfg)
    if (folder / "cache.json").exists():
        old = read_settings(folder)
        if old != wanted:
            diff = sorted(k for k in wanted if old.get(k) != wanted[k])
            raise HaganError(f"{folder} was preprocessed with other settings ({', '.join(diff)}); use another --out")
    else:
        write_json(folder / "cache.json", wanted, guard, sort_keys=False)


def _label(key: str, value: Any) -> str:
    """A setting and its value as a person reads them: 'spacing 6 mm', 'grid 64^3', 'crop body'."""
    if key == "spacing_mm":
        if value is None:
            return "no defined spacing (reference resize)"
        if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            same = len(set(value)) == 1 and len(value) == 3
            return f"spacing {value[0]:g} mm" if same else f"spacing {' x '.join(f'{v:g}' for v in value)} mm"
    if key == "size" and isinstance(value, int):
        return f"grid {value}^3"
    if key == "body_threshold" and isinstance(value, (int, float)):
        return f"body threshold {value:g} HU"
    names = {"mr_percentiles": "MR percentiles", "irregular": "irregular series"}
    shown = value if isinstance(value, str) else short_repr(value, 60)
    return f"{names.get(key, key)} {shown}"


def check_settings(folder: Path, recorded: Mapping[str, Any], cfg: Config, by: str = "this run") -> None:
    """HaganError naming the first setting in which the cache at ``folder`` (its cache.json, ``recorded``) differs
    from what ``cfg`` would make, e.g. "CACHE was made at spacing 6 mm; this run's data contract needs spacing
    12 mm: preprocess again into another folder". ``by`` says whose config it is ("the checkpoint")."""
    wanted = settings(cfg)
    contract = recorded.get("contract")
    contract = contract if isinstance(contract, Mapping) else {}
    differ = []  # (setting, the cache's value, the run's value, whether the cache records it)
    for key in CHECKED:
        ours = contract if key in CONTRACT_KEYS else recorded
        theirs = wanted["contract"] if key in CONTRACT_KEYS else wanted
        if key not in ours or ours[key] != theirs[key]:
            differ.append((key, ours.get(key), theirs[key], key in ours))
    if not differ:
        return
    key, old, new, known = differ[0]
    whose = f"{by}'s data contract" if key in CONTRACT_KEYS else f"{by}'s config"
    made = f"was made at {_label(key, old)}" if known else f"records no {key} setting"
    more = f" (and {len(differ) - 1} other setting(s))" if len(differ) > 1 else ""
    raise HaganError(f"{folder} {made}{more}; {whose} needs {_label(key, new)}: {REMEDY}")


# ---------------------------------------------------------------- the manifest
def read_manifest(folder: Path) -> list[dict[str, str]]:
    """The rows of a cache's ``manifest.csv``, every cell as text (missing ones empty); HaganError naming the file
    when it is not a CSV table with the ``path`` and ``status`` columns."""
    import pandas as pd

    path = folder / "manifest.csv"
    try:
        table = read_csv_table(path, "manifest", dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise HaganError(f"{path} is not a readable CSV table ({_why(err)}): restore it, or preprocess again") from None
    missing = [c for c in MANIFEST_REQUIRED if c not in table.columns]
    if missing:
        raise HaganError(f"{path} has no '{missing[0]}' column: not a preprocess manifest; restore it, or preprocess")
    return [{str(k): v if isinstance(v, str) else "" for k, v in row.items()} for row in table.to_dict("records")]


def cached_file(folder: Path, rel: str) -> Path | None:
    """``folder / rel`` when ``rel`` names a regular file inside the cache folder, else None (a manifest may be
    hostile: a path out of the cache, or a FIFO that would block the reader)."""
    if not rel or Path(rel).is_absolute():
        return None
    path = folder / rel
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return None
    return path if inside and path.is_file() else None


def manifest_numbers(row: Mapping[str, str]) -> dict[str, float | None] | str:
    """The numeric cells of a manifest row (``slice_thickness_mm``, ``n_slices``; None where empty), or why they
    are not numbers (an edited or damaged manifest)."""
    numbers: dict[str, float | None] = {}
    for column, kind in (("slice_thickness_mm", float), ("n_slices", int)):
        text = row.get(column, "").strip()
        try:
            value = float(kind(text)) if text else None
        except ValueError:
            value = math.nan
        if value is not None and not 0 <= value < math.inf:  # NaN fails too
            return f"manifest {column} {short_repr(text)} is not a number: repair the row, or preprocess again"
        numbers[column] = value
    return numbers


# ---------------------------------------------------------------- a stored grid
def encode_grid(grid: np.ndarray, dtype: str) -> np.ndarray:
    """Model-range values (S, S, S) in [-1, 1] as the cache stores them: float16, or int16 fixed point (x 32767)."""
    if dtype == "int16":
        return np.rint(np.clip(grid, -1.0, 1.0) * 32767.0).astype(np.int16)
    return grid.astype(np.float16)


def decode_grid(stored: np.ndarray) -> np.ndarray:
    """The inverse of :func:`encode_grid`: float32 in [-1, 1] (int16 fixed point divided by 32767, floats clipped)."""
    if stored.dtype == np.int16:
        return stored.astype(np.float32) / 32767.0
    return np.clip(stored.astype(np.float32), -1.0, 1.0)


def require_finite(grid: np.ndarray) -> None:
    """SeriesError for a grid with NaN or infinite values: it is never 'ok', the model would turn it into NaN."""
    if not np.isfinite(grid).all():
        raise SeriesError("the model grid holds NaN or infinite values (NaN/inf voxels in the scan)")


def load_grid(path: Path, size: int, name: str) -> np.ndarray:
    """One stored volume as float32 (S, S, S) in [-1, 1]. SeriesError with the reason (``name`` for the file) when
    it is not a plain .npy array (pickled objects are never loaded), has another shape or dtype, or holds NaN/inf.
    The header is checked before the data is read: a hostile header cannot make us allocate what it claims."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as err:
        raise SeriesError(f"cached volume {name} cannot be read ({_why(err)})") from None
    if not regular:  # a FIFO put in a volume's place would block the reader
        raise SeriesError(f"cached volume {name} is not a regular file (a FIFO or device): not read")
    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SeriesError(f"cached volume {name} cannot be read as a .npy array ({_why(err)})") from None
    if not isinstance(stored, np.ndarray):  # an .npz archive
        stored.close()
        raise SeriesError(f"cached volume {name} is an archive, not one .npy array")
    if stored.dtype not in STORED_DTYPES:
        raise SeriesError(f"cached volume {name} has dtype {stored.dtype}; a cache stores float16 or int16")
    if stored.shape != (size,) * 3:
        raise SeriesError(
            f"cached volume {name} has shape {stored.shape}, but the model's grid is {size}^3 (preprocess it first)"
        )
    data = np.array(stored)  # read now, the file closed
    del stored
    if not np.isfinite(data).all():  # checked before decoding, whose clip would turn inf into +-1
        raise SeriesError(f"cached volume {name} holds NaN or infinite values")
    return decode_grid(data)


def write_grid(folder: Path, name: str, grid: np.ndarray, dtype: str) -> str:
    """Store ``grid`` (S, S, S) in [-1, 1] as ``volumes/<name>.npy`` of the cache, atomically; its path relative to
    the cache (the manifest's ``path``). OSError when it cannot be written."""
    rel = f"volumes/{name}.npy"
    with atomic_target(folder / rel, ".npy") as tmp:
        np.save(tmp, encode_grid(grid, dtype))
    return rel


# ---------------------------------------------------------------- a cache opened for reading
@dataclass(frozen=True)
class Cache:
    """A preprocess cache checked against a run's config. ``rows`` are the manifest's ok rows whose volume is a
    regular file in the cache (every cell as text: patient_id, series_uid, path, ...); ``broken`` the ok rows whose
    volume is not; ``manifest`` every row."""

    root: Path
    size: int
    recorded: dict[str, Any]
    manifest: tuple[dict[str, str], ...]
    rows: tuple[dict[str, str], ...]
    broken: tuple[dict[str, str], ...]

    def __len__(self) -> int:
        return len(self.rows)

    def path_of(self, index: int) -> Path:
        """The volume file of ok row ``index``."""
        return self.root / self.rows[index]["path"]

    def load(self, index: int) -> np.ndarray:
        """Volume ``index`` as float32 (S, S, S) in [-1, 1]; SeriesError naming the file when it is not usable."""
        return load_grid(self.path_of(index), self.size, str(self.path_of(index)))

    def require_volumes(self) -> None:
        """HaganError when an ok row's volume is missing, not a regular file, or outside the cache."""
        if self.broken:
            rel = short_repr(self.broken[0]["path"], 80)
            raise HaganError(
                f"{len(self.broken)} volume(s) of {self.root / 'manifest.csv'} are missing, not regular files or "
                f"outside the cache, e.g. {rel}: preprocess again"
            )


def open_cache(path: str | Path, cfg: Config, by: str = "this run") -> Cache:
    """The preprocess cache at ``path``, checked against ``cfg`` (the data contract and every setting cache.json
    records; ``by`` names whose config it is in a refusal). HaganError in one line when it is no readable cache or
    was made at other settings."""
    root = Path(path)
    if not root.is_dir():
        raise HaganError(f"preprocess cache not found: {root}")
    recorded = read_settings(root)
    manifest = tuple(read_manifest(root))  # a damaged manifest is said before the settings are compared
    check_settings(root, recorded, cfg, by)
    ok = [row for row in manifest if row["status"] == "ok"]
    rows = tuple(row for row in ok if cached_file(root, row["path"]) is not None)
    broken = tuple(row for row in ok if cached_file(root, row["path"]) is None)
    return Cache(root, cfg.model.size, recorded, manifest, rows, broken)
