"""Training data: a folder of volumes on the model's grid, an optional table with labels, a seeded sharded sampler.

Volumes are ``.npy`` arrays (D, H, W) already on the model's grid in [-1, 1] (float16/float32, or int16 fixed
point x 32767: what the preprocessing cache writes; they must be S x S x S), or NIfTI scans in scanner units (HU
for CT) of any size, which are read and preprocessed exactly as ``encode`` reads them (the one NIfTI reader, then
the data contract's preprocessing, rounded to float16 like the cache): a scan reaches the model the same way in
training and in encoding. Preprocessing a NIfTI folder once with ``hagan-clinic preprocess`` gives the same
volumes and saves that work at every epoch. The folder is checked once before training starts (.npy files from
their headers; NIfTI scans by reading and preprocessing each, so that no scan can stop a run half way): a problem
is reported with the file that has it. A preprocess cache given without a table trains on its manifest's ok rows;
a cache made at other settings than the config's (data contract, crop, ...) is refused, with or without a table.

The sampler shuffles with a generator seeded by (seed, epoch), so the order is a pure function of the seed and
the position: resuming needs only (epoch, position). Under torchrun each rank reads a disjoint shard
(every world_size-th item of the epoch's permutation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .errors import HaganError
from .io.cache import load_grid, looks_like_cache, open_cache
from .io.files import read_csv_table
from .io.nifti import read_scan
from .io.volume import SeriesError
from .preprocessing import model_input

SUFFIXES = (".npy", ".nii", ".nii.gz")


class DataError(HaganError):
    """Unusable training data; the message names the folder or file."""


def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SUFFIXES) and not path.name.startswith(".")


def _is_nifti(path: Path) -> bool:
    return path.name.endswith((".nii", ".nii.gz"))


@dataclass(frozen=True)
class VolumeFolder:
    """The checked list of training volumes, with labels when the model is conditional."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...] | None
    config: Config
    ids: tuple[tuple[str, str], ...] | None = None  # (patient_id, series_uid) per file, from the table
    table: Path | None = None  # the table (or cache manifest) the files came from

    @classmethod
    def from_config(cls, cfg: Config, data_dir: str | Path | None = None) -> VolumeFolder:
        given = str(data_dir or cfg.data.dir or "")
        root = Path(given)  # Path("") is "." (the current folder): test the string, not the path
        if not given or not root.is_dir():
            raise DataError(f"data folder not found: '{given}' (give --data DIR or data.dir)")
        files, labels, ids, table = _listing(cfg, root)
        if not files:
            raise DataError(f"{root}: no volumes (.npy, .nii, .nii.gz) found")
        size = cfg.model.size
        for f in files:
            if _is_nifti(f):  # a scan of any size: preprocessed when loaded, as encode does; checked by doing it
                try:
                    model_input(read_scan(f, cfg.data.modality), cfg)
                except SeriesError as err:
                    raise DataError(f"{f}: {err}") from None
                continue
            try:
                shape = tuple(np.load(f, mmap_mode="r").shape)
            except Exception as err:  # unreadable header: name the file
                raise DataError(f"{f}: not a readable volume ({' '.join(str(err).split())[:120]})") from None
            if shape != (size, size, size):
                raise DataError(f"{f}: shape {shape}, but the model needs {size}^3 volumes (preprocess them first)")
        return cls(root, tuple(files), labels, cfg, ids, table)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> np.ndarray:
        """Volume ``index`` as float32 (D, H, W) in [-1, 1]."""
        path = self.files[index]
        try:
            if not _is_nifti(path):  # as the cache stores it: checked for shape, dtype and finite values
                return load_grid(path, self.config.model.size, path.name)
            return model_input(read_scan(path, self.config.data.modality), self.config)
        except SeriesError as err:
            raise DataError(f"{path}: {err}") from None

    def training_record(self) -> dict:
        """What a model trained on this folder saw, for its checkpoints: the patient IDs and series UIDs of its
        volumes (as the table gives them: pseudonyms where the cache holds pseudonyms), the number of volumes,
        the files (relative to the data folder) and SHA-256 digests of the table and of the file list. Lets
        ``augment`` and ``evaluate`` tell training patients from held-out ones."""
        import hashlib

        rel = [str(f.relative_to(self.root)) if f.is_relative_to(self.root) else str(f) for f in self.files]
        record = {
            "n_volumes": len(self.files),
            "data_dir": str(self.root.resolve()),
            "files": rel,
            "files_sha256": hashlib.sha256("\n".join(rel).encode()).hexdigest(),
            "patient_ids": sorted({p for p, _ in self.ids}) if self.ids else [],
            "series_uids": sorted({s for _, s in self.ids if s}) if self.ids else [],
            "table": "" if self.table is None else str(self.table.resolve()),
            "table_sha256": "" if self.table is None else hashlib.sha256(self.table.read_bytes()).hexdigest(),
        }
        return record

    def summary(self) -> str:
        text = f"{len(self)} volumes in {self.root}"
        if self.labels is not None:
            counts = np.bincount(np.asarray(self.labels))
            text += ", labels " + ", ".join(f"{k}: {c}" for k, c in enumerate(counts))
        return text


def _listing(cfg: Config, root: Path):
    """(files, labels or None, (patient_id, series_uid) per file or None, the table's path or None). A preprocess
    cache as the folder must have been made at the config's settings (any other is refused in one line)."""
    conditional = cfg.model.num_classes > 0
    cache = None
    if looks_like_cache(root):
        try:
            cache = open_cache(root, cfg)
        except HaganError as err:
            raise DataError(str(err)) from None
    if cfg.data.table is None:
        if conditional:
            raise DataError("a conditional model needs data.table with data.label_column")
        if cache is not None:  # its volumes are the manifest's ok rows (not the --nifti views beside them)
            try:
                cache.require_volumes()  # a FIFO put in a volume's place would block the reader
            except HaganError as err:
                raise DataError(str(err)) from None
            files = [cache.path_of(i) for i in range(len(cache))]
            named = bool(cache.manifest) and "patient_id" in cache.manifest[0]
            ids = tuple((r["patient_id"], r.get("series_uid", "")) for r in cache.rows) if named else None
            return files, None, ids, root / "manifest.csv"
        return sorted(p for p in root.rglob("*") if _is_volume(p)), None, None, None
    import pandas as pd

    table_path = Path(cfg.data.table)
    if not table_path.is_file():
        raise DataError(f"data table not found: {table_path}")
    table = read_csv_table(table_path, "data table", dtype={"patient_id": str, "series_uid": str})
    need = [cfg.data.path_column] + ([cfg.data.label_column] if conditional else [])
    if conditional and cfg.data.label_column is None:
        raise DataError("a conditional model needs data.label_column")
    for col in need:
        if col not in table.columns:
            raise DataError(f"{table_path.name}: no column '{col}'")
    if "status" in table.columns:  # a preprocessing manifest: train on what was processed
        table = table[table["status"].astype(str) == "ok"]
    files = [root / str(p) for p in table[cfg.data.path_column]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) of {table_path.name} not found, e.g. {missing[0]}")
    ids = _ids(table)
    if not conditional:
        return files, None, ids, table_path
    raw = pd.to_numeric(table[cfg.data.label_column], errors="coerce")
    keep = raw.notna() & (raw >= 0)  # the reference let -1 ("no label") reach one_hot; we leave those out
    values = raw[keep]
    if ((values % 1) != 0).any() or (values >= cfg.model.num_classes).any():
        bad = values[((values % 1) != 0) | (values >= cfg.model.num_classes)].iloc[0]
        raise DataError(
            f"{table_path.name}: label {bad} in '{cfg.data.label_column}' is not a class in "
            f"[0, {cfg.model.num_classes - 1}]"
        )
    kept = [f for f, k in zip(files, keep) if k]
    kept_ids = None if ids is None else tuple(i for i, k in zip(ids, keep) if k)
    return kept, tuple(int(v) for v in values), kept_ids, table_path


def _ids(table) -> tuple[tuple[str, str], ...] | None:
    """(patient_id, series_uid) per row of a table that has a patient_id column (a cache manifest has both)."""
    if "patient_id" not in table.columns:
        return None
    series = table["series_uid"] if "series_uid" in table.columns else [""] * len(table)
    return tuple((str(p), "" if str(s) == "nan" else str(s)) for p, s in zip(table["patient_id"], series))


class ShardedSampler:
    """Endless seeded shuffling over ``n`` items; rank ``rank`` of ``world`` reads a disjoint shard of each epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n < world:
            raise DataError(f"{n} volumes cannot be split over {world} processes")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.position = 0, 0
        self._order = self._shard(0)

    def _shard(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        # every rank gets the same count, so no rank waits for another at the epoch's end
        per_rank = self.n // self.world
        return perm[self.rank :: self.world][:per_rank]

    def next_indices(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shard(self.epoch)
            take = min(count - len(out), len(self._order) - self.position)
            out.extend(int(i) for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n") != self.n or state.get("world") != self.world:
            raise DataError(
                f"the saved data position is for {state.get('n')} volumes over {state.get('world')} process(es), "
                f"not {self.n} over {self.world}: resume with the same data and process count"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shard(self.epoch)
